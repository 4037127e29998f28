//! What the training loop calls: batches, evaluation, checkpoints, logging and the end of a run.

use super::metrics::{append_jsonl, write_plot};
use super::setup::Run;
use super::state::TrainError;
use crate::checkpoint::saver::SaveMode;
use crate::checkpoint::{self, ModelFiles, SaveInfo};
use crate::interop::hf_model;
use crate::zero::StepStats;
use std::ops::ControlFlow;
use std::time::Instant;
use tch::Tensor;
use tracing::info;

/// Peak dense fp16/bf16 tensor throughput of an H100/H200 SXM, the MFU denominator nanoGPT and
/// llm.c use for these GPUs.
const PEAK_FLOPS: f64 = 989e12;

/// Salt that separates the training-split batches used for evaluation from training batches.
const EVAL_SALT: u64 = 0x9e37_79b9_7f4a_7c15;

/// Where the batches stand in a checkpoint (`data` in its manifest).
#[derive(serde::Serialize)]
struct DataPosition {
    seed: u64,
    next_step: u64,
    batch_size: usize,
    gradient_accumulation_steps: usize,
}

impl Run {
    /// x and y of micro-step `micro` of the current step on this rank. Row g of the global
    /// batch is drawn from its own stream (seed, g, step), so the global batch does not depend
    /// on how it is split into ranks and micro-batches, and resuming recomputes it exactly.
    pub fn train_batch(&self, micro: usize) -> Result<(Tensor, Tensor), TrainError> {
        let (b, t) = (self.cfg.batch_size, self.cfg.block_size);
        let (mut xs, mut ys) = (Vec::with_capacity(b * t), Vec::with_capacity(b * t));
        for row in 0..b {
            let g = (micro * self.world + self.rank) * b + row;
            let (x, y) = self.train.random_batch(self.cfg.seed, g, self.state.step, 1, t)?;
            xs.extend(x);
            ys.extend(y);
        }
        Ok((self.tensor(&xs)?, self.tensor(&ys)?))
    }

    /// A [batch_size, block_size] batch of token ids on the device, copied without waiting: a
    /// copy from pageable memory would hold the host until the device has finished the step
    /// before (its optimizer update), and the device would then idle while the host queues the
    /// forward.
    fn tensor(&self, ids: &[i64]) -> Result<Tensor, TrainError> {
        let t = Tensor::from_slice(ids).view([self.cfg.batch_size as i64, self.cfg.block_size as i64]);
        Ok(crate::zero::host::to_device_async(&t, self.device).map_err(crate::zero::ZeroError::from)?)
    }

    /// Whether this step is evaluated: every eval_interval and at the end (eval_iters = 0 turns
    /// evaluation and checkpointing off, for benchmarks); a resumed run's first step was
    /// evaluated (and saved) by the run it continues.
    pub fn eval_due(&self) -> bool {
        let step = self.state.step;
        let resumed_here = self.resumed_from.is_some() && step == self.start;
        self.cfg.eval_iters > 0 && !resumed_here && (step % self.cfg.eval_interval == 0 || step == self.cfg.max_iters)
    }

    /// Mean loss over eval_iters batches of each split, averaged over ranks.
    fn evaluate(&mut self) -> Result<(f64, f64), TrainError> {
        let (b, t) = (self.cfg.batch_size, self.cfg.block_size);
        let mut sums = [0.0f64; 2];
        for k in 0..self.cfg.eval_iters {
            let index = k * self.world as u64 + self.rank as u64;
            let batches = [
                self.train.random_batch(self.cfg.seed ^ EVAL_SALT, self.rank, k, b, t)?,
                self.val.sequential_batch(index, b, t)?,
            ];
            for (i, (x, y)) in batches.into_iter().enumerate() {
                let (x, y) = (self.tensor(&x)?, self.tensor(&y)?);
                sums[i] += self.engine.eval_loss(&x, &y)?;
            }
            self.engine.comm().heartbeat();
        }
        self.engine.comm().all_reduce_scalars(&mut sums)?;
        let n = (self.cfg.eval_iters.max(1) * self.world as u64) as f64;
        Ok((sums[0] / n, sums[1] / n))
    }

    /// Evaluates, records and plots the losses, saves a checkpoint when the validation loss
    /// improved (or always_save_checkpoint), and says whether to stop early (patience).
    pub fn evaluate_and_save(&mut self, lr: f64) -> Result<ControlFlow<()>, TrainError> {
        if let Some(p) = &mut self.engine.profile {
            p.pause();
        }
        let (tl, vl) = self.evaluate()?;
        self.last_eval = Some((tl, vl));
        let step = self.state.step;
        info!("step {step}: train loss {tl:.4}, val loss {vl:.4}");
        if self.rank == 0 {
            self.tensorboard_scalars(step, &[("eval/train_loss", tl), ("eval/val_loss", vl)]);
            append_jsonl(&self.metrics_path, serde_json::json!({"step": step, "train_loss": tl, "val_loss": vl}))?;
            self.evals.0.push((step as f64, tl));
            self.evals.1.push((step as f64, vl));
            write_plot(&self.cfg.out_dir, &self.evals);
        }
        let improved = vl < self.state.best_val_loss.unwrap_or(f64::INFINITY);
        if improved {
            self.state.best_val_loss = Some(vl);
            self.state.stale_evals = 0;
        } else {
            self.state.stale_evals += 1;
        }
        if step > self.start && (improved || self.cfg.always_save_checkpoint) {
            if improved {
                self.state.best_tag = Some(checkpoint::tag_name(step));
            }
            let mode = match (self.cfg.async_save, self.cfg.offload_optimizer) {
                (false, _) => SaveMode::Blocking,
                (true, false) => SaveMode::Background,
                // The partition is in host memory already: no second host copy of it.
                (true, true) => SaveMode::InPlace,
            };
            self.save(&checkpoint::tag_name(step), lr, mode)?;
        }
        self.interval_start = Instant::now();
        if self.cfg.patience > 0 && self.state.stale_evals >= self.cfg.patience {
            info!("early stop: val loss has not improved for {} evaluations", self.state.stale_evals);
            return Ok(ControlFlow::Break(()));
        }
        Ok(ControlFlow::Continue(()))
    }

    /// What a save of the current step as `tag` records besides the state: the run's position,
    /// configuration and the last evaluation's losses.
    fn save_info(&self, tag: &str, lr: f64) -> SaveInfo {
        let (cfg, st) = (&self.cfg, &self.state);
        SaveInfo {
            tag: tag.to_string(),
            step: st.step,
            tokens_seen: st.tokens_seen,
            model_config: self.model_cfg.to_manifest(),
            config: serde_json::to_value(cfg).expect("config serializes"),
            init_dir: self.init_dir.clone(),
            lr,
            data: serde_json::to_value(DataPosition {
                seed: cfg.seed,
                next_step: st.step,
                batch_size: cfg.batch_size,
                gradient_accumulation_steps: cfg.gradient_accumulation_steps,
            })
            .expect("position serializes"),
            metrics: st.metrics(self.last_eval),
            keep_last: cfg.keep_last,
            best: st.best_tag.clone(),
        }
    }

    /// Saves the current step as `tag` (collective), with the last evaluation's losses; in the
    /// background, the save returns once the state is copied to host memory.
    fn save(&mut self, tag: &str, lr: f64, mode: SaveMode) -> Result<(), TrainError> {
        let info = self.save_info(tag, lr);
        self.settle()?;
        let tensors = self.engine.model_tensors()?;
        let state = self.engine.state();
        let model = tensors
            .map(|tensors| ModelFiles { tensors, hf_config: hf_model::config_json(&self.model_cfg, state.kind) });
        self.saver.save(self.engine.comm(), &state, model.as_ref(), &self.cfg.out_dir, info, mode)?;
        self.last_saved = Some((tag.to_string(), self.state.step));
        Ok(())
    }

    /// Before the optimizer step: a save writing the host partition in place must be done
    /// reading it (this rank's files written).
    pub fn release_saved_state(&mut self) {
        self.saver.release_state();
    }

    /// Between steps, while a save writes in the background: whether every rank's files are in
    /// (collective; a small control-plane exchange, no rank waits on another's disk). A save that
    /// failed in the background ends the run here.
    pub fn save_progress(&mut self) -> Result<(), TrainError> {
        Ok(self.saver.poll(self.engine.comm())?)
    }

    /// Waits for the background hashes of the checkpoint the run resumed from, if not done yet
    /// (collective): before the first save, which may replace or retire what was resumed from.
    fn settle(&mut self) -> Result<(), TrainError> {
        if let Some(h) = self.hashes.take() {
            h.settle(self.engine.comm().control())?;
            info!("the checkpoint resumed from matches its manifest's sha256");
        }
        Ok(())
    }

    /// With `profile`, a kernel-level trace of one step after a warm-up of three goes to
    /// out_dir/logs/trace_rankNNN_step_N.json (a Chrome trace; `tools/trace_summary.py` totals
    /// its kernels and lists the device's idle gaps). Called as each step ends: the trace starts
    /// after one and stops after the next. The traced step runs without the phase timer, whose
    /// synchronisations would leave gaps of their own, so its gaps are those of a run without
    /// `profile`; the phase averages leave that step out.
    fn trace_step(&mut self, step: u64) {
        const WARM_UP: u64 = 3;
        let traced = self.start + WARM_UP + 1;
        if !self.cfg.profile || !(step + 1 == traced || step == traced) {
            return;
        }
        let path = self.cfg.out_dir.join("logs").join(format!("trace_rank{:03}_step{step}.json", self.rank));
        let done = if step == traced {
            if let Some(mut p) = self.profile_aside.take() {
                p.pause();
                self.engine.profile = Some(p);
            }
            crate::device::trace_stop(&path)
        } else {
            self.profile_aside = self.engine.profile.take();
            crate::device::trace_start()
        };
        match done {
            Ok(()) if step == traced => info!("kernel trace of step {step}: {}", path.display()),
            Ok(()) => {}
            Err(e) => tracing::warn!("kernel trace of step {traced}: {e}"),
        }
    }

    /// Logs a step that just finished: its phase timings when profiling, and every
    /// log_interval steps and every skipped step its loss, speed and memory.
    pub fn log_step(&mut self, st: &StepStats, lr: f64) -> Result<(), TrainError> {
        let step = self.state.step;
        self.trace_step(step);
        exit_hook(self.rank, step);
        self.progress.inc(1);
        if step % self.cfg.log_interval != 0 && !st.skipped {
            return Ok(());
        }
        if let Some(report) = self.engine.profile.as_mut().and_then(|p| p.report()) {
            info!("profile at step {step}, mean per step {report}");
        }
        let dt =
            self.interval_start.elapsed().as_secs_f64() / (step - self.start).min(self.cfg.log_interval).max(1) as f64;
        let tok_s = self.tokens_per_step as f64 / dt;
        let cuda = self.device.is_cuda();
        let mfu = if cuda { 100.0 * tok_s / self.world as f64 * self.flops_per_token / PEAK_FLOPS } else { 0.0 };
        // Only fp16 scales its loss; in fp32 and bf16 a skipped step means the gradient itself
        // was NaN or Inf.
        let skipped = match (st.skipped, self.engine.loss_scale()) {
            (false, _) => String::new(),
            (true, Some(s)) => format!(" (step skipped: overflow, loss scale now {s})"),
            (true, None) => " (step skipped: non-finite gradient)".to_string(),
        };
        let mem_gib =
            if cuda { crate::device::gpu_memory_used() } else { None }.map(|b| b as f64 / (1u64 << 30) as f64);
        let mfu_txt = match mem_gib {
            Some(g) => format!(", mfu {mfu:.1}%, mem {g:.1} GiB"),
            None if cuda => format!(", mfu {mfu:.1}%"),
            None => String::new(),
        };
        info!(
            "iter {step}: loss {:.4}, time {:.1}ms, {:.0} tokens/s{mfu_txt}, lr {lr:.3e}, norm {:.3}{skipped}",
            st.loss,
            dt * 1e3,
            tok_s,
            st.grad_norm
        );
        self.progress.set_message(format!("loss {:.4}", st.loss));
        if self.rank == 0 {
            let mut scalars = vec![
                ("train/loss", st.loss),
                ("train/lr", lr),
                ("train/grad_norm", st.grad_norm),
                ("train/tokens_per_s", tok_s),
            ];
            if self.engine.loss_scale().is_some() {
                scalars.push(("train/loss_scale", st.loss_scale));
            }
            if cuda {
                scalars.push(("train/mfu", mfu));
            }
            scalars.extend(mem_gib.map(|g| ("train/gpu_mem_gib", g)));
            self.tensorboard_scalars(step, &scalars);
            append_jsonl(
                &self.metrics_path,
                serde_json::json!({"step": step, "loss": st.loss, "lr": lr, "time_ms": dt * 1e3, "tokens_per_s": tok_s, "mfu": mfu, "grad_norm": st.grad_norm, "loss_scale": st.loss_scale, "skipped": st.skipped, "gpu_mem_gib": mem_gib}),
            )?;
        }
        self.interval_start = Instant::now();
        Ok(())
    }

    /// Writes scalars to the TensorBoard event file, if there is one; a failed write is a
    /// warning and ends the file, not the run.
    fn tensorboard_scalars(&mut self, step: u64, values: &[(&str, f64)]) {
        if let Some(w) = &mut self.tensorboard {
            if let Err(e) = w.scalars(step, values) {
                tracing::warn!("{}: {e}; no more TensorBoard events this run", w.path().display());
                self.tensorboard = None;
            }
        }
    }

    /// Every run ends with the tag `final`, whatever its validation loss did, unless
    /// checkpointing is off (eval_iters = 0) or this process only reopened that same tag. When
    /// the last evaluation saved this very step, `final` links that tag's files (nothing is
    /// written twice); otherwise it is a blocking save (nothing is left to overlap it). Either
    /// comes after the save still writing, if any.
    fn save_final(&mut self) -> Result<(), TrainError> {
        let reopened = self.resumed_from.as_ref().is_some_and(|d| d.ends_with(checkpoint::FINAL_TAG));
        if self.cfg.eval_iters == 0 || (reopened && self.state.step == self.start) {
            return Ok(());
        }
        let lr = self.schedule.lr(self.state.step);
        match self.last_saved.clone() {
            // The last evaluation saved this very step: final takes that tag's files.
            Some((tag, step)) if step == self.state.step && tag != checkpoint::FINAL_TAG => {
                let info = self.save_info(checkpoint::FINAL_TAG, lr);
                self.settle()?;
                let state = self.engine.state();
                self.saver.link(self.engine.comm(), &state, &self.cfg.out_dir, &tag, info)?;
                self.last_saved = Some((checkpoint::FINAL_TAG.to_string(), step));
                Ok(())
            }
            _ => self.save(checkpoint::FINAL_TAG, lr, SaveMode::Blocking),
        }
    }

    /// The end of a run: the final tag, every save complete, the resumed checkpoint's hashes
    /// settled (a run that never saved still says whether what it resumed from was intact), every
    /// rank done, and rank 0's sample.
    pub fn finish(mut self) -> Result<(), TrainError> {
        self.progress.finish_and_clear();
        self.save_final()?;
        self.saver.wait(self.engine.comm())?;
        self.settle()?;
        self.engine.comm().barrier()?;
        if self.rank == 0 && self.cfg.sample_tokens > 0 && !self.engine.parameters_resident() {
            info!("no sample at ZeRO stage 3, where no rank holds the whole model: `train sample --from OUT_DIR` samples the checkpoint");
        } else if self.rank == 0 && self.cfg.sample_tokens > 0 {
            let c = &self.cfg;
            // Everything is saved by now: a tokenizer that cannot be read costs the sample, not
            // the run's exit status.
            match super::sample::Codec::for_model(None, Some(&c.dataset)) {
                Ok(codec) => {
                    let s = super::sample::sampling(c.sample_tokens, c.sample_temperature, c.sample_top_k, c.seed);
                    let text = super::sample::text(&self.engine.model, &codec, &c.sample_prompt, &s)?;
                    info!("sample:\n{text}");
                }
                Err(e) => tracing::warn!("no sample: {e}"),
            }
        }
        Ok(())
    }
}

/// Test hook: ZEROKIT_TEST_EXIT=RANK:STEP makes that rank exit with status 3 after that step,
/// as a crashed rank would (CI checks that the job then ends with a message naming it).
fn exit_hook(rank: usize, step: u64) {
    if let Ok(v) = std::env::var("ZEROKIT_TEST_EXIT") {
        if v.split_once(':').and_then(|(r, s)| Some((r.parse::<usize>().ok()?, s.parse::<u64>().ok()?)))
            == Some((rank, step))
        {
            std::process::exit(3);
        }
    }
}
