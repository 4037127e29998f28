//! The training loop: nanoGPT's train.py over the ZeRO engine. Every rank runs it; rank 0 alone
//! prints, writes metrics.jsonl and the loss plot, and coordinates checkpoints.
//!
//! `setup` does everything before the first step (ranks, the run lock, device, model, engine,
//! resume), `run` what the loop calls (batches, evaluation, checkpoints, logging), `metrics`
//! metrics.jsonl and the loss plot, `state` what a run carries between steps, `sample` text
//! generation, `eval` loss and perplexity on a split, `cli` the command line. [`fit`] is the loop itself.

mod cli;
pub mod eval;
mod metrics;
mod run;
pub mod sample;
mod setup;
mod state;

pub use cli::{run_cli, EvalArgs, FitArgs, SampleArgs, TrainCli, TrainCommand};
pub use sample::{from_checkpoint as sample_from_checkpoint, text as sample_text};
pub use setup::{model_config, resolve_device};
pub use state::{TrainError, TrainState};

use crate::config::TrainConfig;
use setup::Run;

/// Trains as configured. Every rank calls this (a launcher has set RANK etc. when world > 1).
pub fn fit(cfg: TrainConfig) -> Result<(), TrainError> {
    let mut run = Run::start(cfg)?;
    loop {
        let lr = run.schedule.lr(run.state.step);
        // Evaluate, plot and checkpoint; stop early when validation stopped improving.
        if run.eval_due() && run.evaluate_and_save(lr)?.is_break() {
            break;
        }
        if run.state.step >= run.cfg.max_iters {
            break;
        }
        // One optimizer step: micro-steps of forward and backward, then the ZeRO update.
        for micro in 0..run.cfg.gradient_accumulation_steps {
            let (x, y) = run.train_batch(micro)?;
            run.engine.forward_backward(&x, &y)?;
        }
        run.release_saved_state();
        let stats = run.engine.step(lr)?;
        run.state.step += 1;
        run.state.tokens_seen += run.tokens_per_step;
        run.log_step(&stats, lr)?;
        // A checkpoint writing in the background: are every rank's files in yet?
        run.save_progress()?;
    }
    run.finish()
}
