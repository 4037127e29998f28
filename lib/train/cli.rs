//! The `train` command line: fit (the default), sample or eval, and the panic hook that turns
//! libtorch's failures into errors with the way out.

use super::state::TrainError;
use super::{eval, fit, sample};
use crate::config::TrainConfig;
use crate::launch::{self, LaunchArgs};
use crate::model::Sampling;
use std::path::PathBuf;

/// `train`: fit (the default) or sample.
#[derive(Debug, clap::Parser)]
#[command(
    name = "train",
    version,
    about = "Train GPT-2, Llama and Gemma with ZeRO data parallelism (nanoGPT's train.py, natively)",
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
    /// Generate text from a checkpoint or a Hugging Face directory.
    Sample(SampleArgs),
    /// Loss and perplexity of a checkpoint or a Hugging Face directory on a token split.
    Eval(EvalArgs),
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
    /// Continue from this tag of out_dir (e.g. step_00000300, final), this tag directory, or a
    /// DeepSpeed ZeRO checkpoint (root or global_stepN): the same as --set init_from=resume
    /// --set resume_from=TAG.
    #[arg(long = "resume-from", value_name = "TAG|DIR")]
    pub resume_from: Option<String>,
    /// Log where each step's time goes, averaged over each log interval: the same as
    /// --set profile=true.
    #[arg(long)]
    pub profile: bool,
    #[command(flatten)]
    pub launch: LaunchArgs,
}

#[derive(Debug, Clone, clap::Args)]
pub struct EvalArgs {
    /// Checkpoint root (its latest tag), tag directory, or Hugging Face GPT-2, Llama or Gemma directory.
    pub checkpoint: PathBuf,
    /// Directory with the split files (from `prepare`).
    #[arg(long, default_value = "data/shakespeare")]
    pub dataset: PathBuf,
    /// A split of --dataset (val, test, train: DIR/SPLIT.bin) or a .bin token file.
    #[arg(long, default_value = "val")]
    pub split: String,
    /// Tokens of context per window (default: the checkpoint's training block_size, else the
    /// model's positions, which are also the maximum).
    #[arg(long)]
    pub block_size: Option<usize>,
    /// Windows per forward pass.
    #[arg(long, default_value_t = 8)]
    pub batch_size: usize,
    #[arg(long, default_value = "auto")]
    pub device: String,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Clone, clap::Args)]
pub struct SampleArgs {
    /// Checkpoint root (its latest tag), tag directory, or Hugging Face GPT-2, Llama or Gemma directory.
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
    /// Recompute the whole context for each new token instead of caching keys and values (the
    /// same tokens, slower; for comparison).
    #[arg(long)]
    pub no_kv_cache: bool,
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
            // libtorch's own sentence ("CUDA out of memory. Tried to allocate 512.00 MiB."),
            // without the Result wrapping tch puts around it.
            let oom = what.find("CUDA out of memory").map(|i| &what[i..]);
            let said = oom.map_or(first, |s| s.find(" GPU ").map_or(s.lines().next().unwrap_or(s), |j| &s[..j]));
            format!(
                "error: the GPU ran out of memory ({said}). `ckpt estimate` gives the memory per stage and \
                 the largest micro-batch that fits (--gpu-memory); lower batch_size, raise zero_stage, set \
                 activation_checkpointing = true or offload_optimizer = true"
            )
        } else {
            let at = info.location().map(|l| format!(" at {}:{}", l.file(), l.line())).unwrap_or_default();
            format!("error: internal failure{at}: {first}")
        };
        crate::logging::report(&msg);
    }));
}

/// Whether this process is rank 0 of a launched job (torchrun, srun, DeepSpeed's launcher), or
/// runs alone.
fn is_rank0() -> bool {
    crate::comm::Rendezvous::from_env(std::time::Duration::from_secs(1)).map_or(true, |r| r.rank == 0)
}

/// The `train` binary's one call.
pub fn run_cli(cli: TrainCli) -> Result<(), TrainError> {
    install_panic_hook();
    match cli.command {
        // Under a launcher every rank runs the command; rank 0 alone answers.
        Some(TrainCommand::Sample(_) | TrainCommand::Eval(_)) if !is_rank0() => Ok(()),
        Some(TrainCommand::Eval(a)) => {
            let loaded = eval::load_model(&a.checkpoint, &a.device)?;
            let e = eval::evaluate(&loaded, &a.dataset, &a.split, a.block_size, a.batch_size)?;
            match a.json {
                true => println!("{}", serde_json::to_string_pretty(&e).expect("an evaluation serializes")),
                false => println!("{}", eval::render(&e)),
            }
            Ok(())
        }
        Some(TrainCommand::Sample(a)) => {
            let prompt = a.prompt.replace("\\n", "\n");
            let s = Sampling { kv_cache: !a.no_kv_cache, ..sample::sampling(a.tokens, a.temperature, a.top_k, a.seed) };
            let text = sample::from_checkpoint(&a.checkpoint, &prompt, &s, &a.device)?;
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
    if a.profile {
        set.push("profile=true".into());
    }
    let cfg = TrainConfig::load(a.config.as_deref(), a.deepspeed.as_deref(), &set)?;
    if a.launch.launches() && !launch::is_launched_rank() {
        return launch::spawn_local_ranks(&a.launch).map_err(|e| TrainError::Other(e.to_string()));
    }
    fit(cfg)
}
