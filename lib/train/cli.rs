//! The `train` command line: fit (the default) or sample, and the panic hook that turns
//! libtorch's failures into errors with the way out.

use super::state::TrainError;
use super::{fit, sample};
use crate::config::TrainConfig;
use crate::launch::{self, LaunchArgs};
use std::path::PathBuf;

/// `train`: fit (the default) or sample.
#[derive(Debug, clap::Parser)]
#[command(
    name = "train",
    version,
    about = "Train GPT-2 with ZeRO data parallelism (nanoGPT's train.py, natively)",
    args_conflicts_with_subcommands = true
)]
pub struct TrainCli {
    #[command(subcommand)]
    pub command: Option<TrainCommand>,
    #[command(flatten)]
    pub fit: FitArgs,
}

#[derive(Debug, clap::Subcommand)]
pub enum TrainCommand {
    /// Train (the default when no subcommand is given).
    Fit(FitArgs),
    /// Generate text from a checkpoint.
    Sample(SampleArgs),
}

#[derive(Debug, Clone, clap::Args)]
pub struct FitArgs {
    /// Configuration file (TOML; every key is optional). Omitted: the defaults.
    pub config: Option<PathBuf>,
    /// A DeepSpeed JSON config applied on top of CONFIG (batch, fp16/bf16, ZeRO stage, AdamW, scheduler).
    #[arg(long)]
    pub deepspeed: Option<PathBuf>,
    /// Override a key, e.g. --set max_iters=100 --set dtype=fp16 (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub set: Vec<String>,
    /// Passed by DeepSpeed's launcher (`--local_rank=N`) and by torch.distributed.launch; the
    /// environment (LOCAL_RANK) already carries the rank, so it is accepted and not used.
    #[arg(long = "local_rank", alias = "local-rank", hide = true)]
    pub local_rank: Option<usize>,
    /// Continue from this tag of out_dir (e.g. step_00000300, final) or this tag directory:
    /// the same as --set init_from=resume --set resume_from=TAG.
    #[arg(long = "resume-from", value_name = "TAG|DIR")]
    pub resume_from: Option<String>,
    #[command(flatten)]
    pub launch: LaunchArgs,
}

#[derive(Debug, Clone, clap::Args)]
pub struct SampleArgs {
    /// Checkpoint root (its latest tag) or tag directory.
    pub checkpoint: PathBuf,
    #[arg(long, default_value = "\n")]
    pub prompt: String,
    #[arg(long, default_value_t = 200)]
    pub tokens: usize,
    #[arg(long, default_value_t = 0.8)]
    pub temperature: f64,
    #[arg(long, default_value_t = 200)]
    pub top_k: usize,
    #[arg(long, default_value_t = 1337)]
    pub seed: u64,
    #[arg(long, default_value = "auto")]
    pub device: String,
}

/// libtorch reports failures inside tensor ops (CUDA out of memory above all) as panics through
/// tch: end them as errors, with the way out, in the console and the rank's log.
fn install_panic_hook() {
    std::panic::set_hook(Box::new(|info| {
        let what = info
            .payload()
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| info.payload().downcast_ref::<&str>().copied())
            .unwrap_or("unknown failure");
        let first = what.lines().next().unwrap_or(what);
        let msg = if what.contains("out of memory") {
            format!(
                "error: the GPU ran out of memory ({first}). `ckpt estimate` gives the memory per stage and \
                 the largest micro-batch that fits (--gpu-memory); lower batch_size, raise zero_stage or set \
                 activation_checkpointing = true"
            )
        } else {
            let at = info.location().map(|l| format!(" at {}:{}", l.file(), l.line())).unwrap_or_default();
            format!("error: internal failure{at}: {first}")
        };
        crate::logging::report(&msg);
    }));
}

/// The `train` binary's one call.
pub fn run_cli(cli: TrainCli) -> Result<(), TrainError> {
    install_panic_hook();
    match cli.command {
        Some(TrainCommand::Sample(a)) => {
            let prompt = a.prompt.replace("\\n", "\n");
            let text =
                sample::from_checkpoint(&a.checkpoint, &prompt, a.tokens, a.temperature, a.top_k, a.seed, &a.device)?;
            println!("{text}");
            Ok(())
        }
        Some(TrainCommand::Fit(a)) => run_fit(a),
        None => run_fit(cli.fit),
    }
}

fn run_fit(a: FitArgs) -> Result<(), TrainError> {
    let mut set = a.set.clone();
    if let Some(tag) = &a.resume_from {
        set.extend(["init_from=resume".to_string(), format!("resume_from={tag}")]);
    }
    let cfg = TrainConfig::load(a.config.as_deref(), a.deepspeed.as_deref(), &set)?;
    if a.launch.launches() && !launch::is_launched_rank() {
        return launch::spawn_local_ranks(&a.launch).map_err(|e| TrainError::Other(e.to_string()));
    }
    fit(cfg)
}
