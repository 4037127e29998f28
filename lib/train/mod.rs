//! The training loop: nanoGPT's train.py over the ZeRO engine. Every rank runs it; rank 0 alone
//! prints, writes metrics.jsonl and the loss plot, and coordinates checkpoints.
//!
//! `setup` does everything before the first step (ranks, the run lock, device, model, engine,
//! resume), `run` what the loop calls (batches, evaluation, checkpoints, logging), `sample`
//! text generation, `cli` the command line. [`fit`] is the loop itself.

mod cli;
mod run;
mod sample;
mod setup;

pub use cli::{run_cli, FitArgs, SampleArgs, TrainCli, TrainCommand};
pub use sample::{from_checkpoint as sample_from_checkpoint, text as sample_text};
pub use setup::{model_config, resolve_device};

use crate::config::TrainConfig;
use serde::{Deserialize, Serialize};
use setup::Run;

#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error(transparent)]
    Rendezvous(#[from] crate::comm::RendezvousError),
    #[error(transparent)]
    Comm(#[from] crate::comm::CommError),
    #[error(transparent)]
    Zero(#[from] crate::zero::ZeroError),
    #[error(transparent)]
    Checkpoint(#[from] crate::checkpoint::CheckpointError),
    #[error(transparent)]
    Data(#[from] crate::data::DataError),
    #[error(transparent)]
    Model(#[from] crate::model::ModelError),
    #[error(transparent)]
    Hf(#[from] crate::interop::hf::HfError),
    #[error(transparent)]
    Fs(#[from] crate::fsutil::FsError),
    #[error(transparent)]
    Lock(#[from] crate::lock::LockError),
    #[error("{0}")]
    Other(String),
}

/// Where training stands besides the engine's state: what a checkpoint records of the run and
/// resuming restores (checkpoint manifests keep `step` and `tokens_seen` at the top and the
/// rest under `metrics`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainState {
    /// Optimizer steps taken.
    pub step: u64,
    pub tokens_seen: u64,
    /// The best validation loss so far and the tag saved at it.
    pub best_val_loss: Option<f64>,
    pub best_tag: Option<String>,
    /// Evaluations since the validation loss last improved (for `patience`).
    pub stale_evals: u64,
}

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
        let stats = run.engine.step(lr)?;
        run.state.step += 1;
        run.state.tokens_seen += run.tokens_per_step;
        run.log_step(&stats, lr)?;
    }
    run.finish()
}
