//! The training loop: nanoGPT's train.py over the ZeRO engine. Every rank runs it; rank 0 alone
//! prints, writes metrics.jsonl and the loss plot, and coordinates checkpoints.

use crate::checkpoint::{self, ResumeHashes, SaveInfo};
use crate::comm::{Collectives, ControlPlane, CpuComm, Rendezvous};
use crate::config::TrainConfig;
use crate::data::dataset::TokenDataset;
use crate::data::tokenize::{Encoding, Tokenizer};
use crate::launch::{self, LaunchArgs};
use crate::lock::RunLock;
use crate::model::{Gpt, GptConfig};
use crate::optim::AdamWConfig;
use crate::scaler::ScalerConfig;
use crate::zero::{Engine, EngineConfig};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use tch::{Device, Kind, Tensor};
use tracing::info;

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
    Fs(#[from] crate::fsutil::FsError),
    #[error(transparent)]
    Lock(#[from] crate::lock::LockError),
    #[error("{0}")]
    Other(String),
}

/// Peak dense fp16/bf16 tensor throughput of an H100/H200 SXM, the MFU denominator nanoGPT and
/// llm.c use for these GPUs.
const PEAK_FLOPS: f64 = 989e12;

/// Salt that separates the training-split batches used for evaluation from training batches.
const EVAL_SALT: u64 = 0x9e37_79b9_7f4a_7c15;

/// Resolves device and dtype names for this rank.
pub fn resolve_device(cfg: &TrainConfig, local_rank: usize) -> Result<(Device, Kind), TrainError> {
    // A rank sees either its one GPU (zerokit's launcher, Slurm) or all of the node's (torchrun).
    let gpu = || if tch::Cuda::device_count() == 1 { 0 } else { local_rank };
    let device = match cfg.device.as_str() {
        "auto" if crate::device::load_cuda() => Device::Cuda(gpu()),
        "cuda" if crate::device::load_cuda() => Device::Cuda(gpu()),
        spec => crate::device::parse_device(spec).map_err(TrainError::Other)?,
    };
    let kind = match (cfg.dtype.as_str(), device) {
        ("fp32", _) | ("auto", Device::Cpu) => Kind::Float,
        ("bf16", _) | ("auto", _) => Kind::BFloat16,
        ("fp16", _) => Kind::Half,
        (d, _) => return Err(TrainError::Other(format!("unknown dtype {d}"))),
    };
    Ok((device, kind))
}

pub fn model_config(cfg: &TrainConfig) -> Result<GptConfig, TrainError> {
    let mut m = if cfg.model == "custom" {
        GptConfig {
            n_layer: cfg.n_layer,
            n_head: cfg.n_head,
            n_embd: cfg.n_embd,
            block_size: cfg.block_size,
            vocab_size: cfg.vocab_size,
        }
    } else {
        GptConfig::preset(&cfg.model)?
    };
    m.block_size = cfg.block_size;
    m.vocab_size = cfg.vocab_size;
    Ok(m)
}

fn collectives(ctl: ControlPlane, device: Device) -> Result<Box<dyn Collectives>, TrainError> {
    Ok(match device {
        Device::Cuda(i) if ctl.world() > 1 => Box::new(crate::comm::nccl::NcclComm::new(ctl, i)?),
        _ => Box::new(CpuComm::new(ctl)),
    })
}

/// Rank 0 takes the run lock on `out_dir` and tells every rank whether the run goes on; the other
/// ranks wait for that answer before they write anything (their log files included), so a run
/// refused because another holds the directory leaves no trace in it. One rule whatever started
/// the ranks (zerokit's launcher, torchrun, srun) and however many nodes: the lock lives where
/// rank 0 runs, on the directory every node shares. A new run also refuses a directory holding an
/// earlier run's checkpoints: checked before the lock (read-only, so such a refusal touches
/// nothing) and again under it. Returns the lock on rank 0.
fn take_out_dir(cfg: &TrainConfig, ctl: &mut ControlPlane) -> Result<Option<RunLock>, TrainError> {
    const WHAT: &str = "run lock";
    if ctl.rank() != 0 {
        let answer = ctl.broadcast(None, WHAT)?;
        if answer.is_empty() {
            return Ok(None);
        }
        return Err(TrainError::Other(format!("rank 0 did not start the run: {}", String::from_utf8_lossy(&answer))));
    }
    let fresh = || match checkpoint::any_checkpoint(&cfg.out_dir) {
        // A new run never mixes its checkpoints with an earlier run's (retention and `latest`
        // would interleave them): nothing the user has is overwritten or removed.
        Some(old) if cfg.init_from != "resume" => Err(TrainError::Other(format!(
            "{} already holds checkpoints of an earlier run ({old}): continue it with --set init_from=resume, \
             or train into another out_dir",
            cfg.out_dir.display()
        ))),
        _ => Ok(()),
    };
    let taken = fresh()
        .and_then(|_| RunLock::acquire(&cfg.out_dir).map_err(TrainError::from))
        .and_then(|lock| fresh().map(|_| lock));
    match taken {
        Ok(lock) => {
            ctl.broadcast(Some(b""), WHAT)?;
            Ok(Some(lock))
        }
        Err(e) => {
            let _ = ctl.broadcast(Some(e.to_string().as_bytes()), WHAT);
            Err(e)
        }
    }
}

/// x and y of micro-step `micro` of optimizer step `step` on this rank. Row g of the global
/// batch is drawn from its own stream (seed, g, step), so the global batch does not depend on
/// how it is split into ranks and micro-batches, and resuming recomputes it exactly.
fn train_batch(
    ds: &TokenDataset,
    cfg: &TrainConfig,
    rank: usize,
    world: usize,
    step: u64,
    micro: usize,
    device: Device,
) -> Result<(Tensor, Tensor), TrainError> {
    let (b, t) = (cfg.batch_size, cfg.block_size);
    let (mut xs, mut ys) = (Vec::with_capacity(b * t), Vec::with_capacity(b * t));
    for row in 0..b {
        let g = (micro * world + rank) * b + row;
        let (x, y) = ds.random_batch(cfg.seed, g, step, 1, t)?;
        xs.extend(x);
        ys.extend(y);
    }
    let shape = [b as i64, t as i64];
    Ok((Tensor::from_slice(&xs).view(shape).to_device(device), Tensor::from_slice(&ys).view(shape).to_device(device)))
}

/// Mean loss over eval_iters batches of each split, averaged over ranks.
fn evaluate(
    engine: &mut Engine,
    train: &TokenDataset,
    val: &TokenDataset,
    cfg: &TrainConfig,
    device: Device,
) -> Result<(f64, f64), TrainError> {
    let (rank, world) = (engine.comm.rank(), engine.comm.world());
    let (b, t) = (cfg.batch_size, cfg.block_size);
    let mut sums = [0.0f64; 2];
    for k in 0..cfg.eval_iters {
        let index = k * world as u64 + rank as u64;
        let batches = [train.random_batch(cfg.seed ^ EVAL_SALT, rank, k, b, t)?, val.sequential_batch(index, b, t)?];
        for (i, (x, y)) in batches.into_iter().enumerate() {
            let shape = [b as i64, t as i64];
            let x = Tensor::from_slice(&x).view(shape).to_device(device);
            let y = Tensor::from_slice(&y).view(shape).to_device(device);
            sums[i] += engine.eval_loss(&x, &y);
        }
        engine.comm.heartbeat();
    }
    engine.comm.all_reduce_scalars(&mut sums)?;
    let n = (cfg.eval_iters.max(1) * world as u64) as f64;
    Ok((sums[0] / n, sums[1] / n))
}

/// Appends one JSON line. The line goes out in one write: formatted straight into the file, a
/// value is many small writes, and a run killed between two of them leaves half a line that the
/// next run's first line would be glued to (and lost with). A line left unfinished anyway (a
/// crash of an older zerokit) is ended first.
fn append_jsonl(path: &Path, v: serde_json::Value) -> Result<(), TrainError> {
    use std::os::unix::fs::FileExt;
    let io = |e| crate::fsutil::FsError::io(path, e);
    let mut f = std::fs::OpenOptions::new().create(true).read(true).append(true).open(path).map_err(io)?;
    let len = f.metadata().map_err(io)?.len();
    let mut last = [b'\n'];
    if len > 0 {
        f.read_exact_at(&mut last, len - 1).map_err(io)?;
    }
    let line = format!("{}{v}\n", if last[0] == b'\n' { "" } else { "\n" });
    f.write_all(line.as_bytes()).map_err(io)?;
    Ok(())
}

/// Trains as configured. Every rank calls this (a launcher has set RANK etc. when world > 1).
pub fn fit(mut cfg: TrainConfig) -> Result<(), TrainError> {
    let rdv = Rendezvous::from_env(Duration::from_secs(cfg.comm_timeout))?;
    cfg.resolve_batch(rdv.world)?;
    let (rank, world) = (rdv.rank, rdv.world);
    let mut ctl = if world == 1 { ControlPlane::single() } else { ControlPlane::connect(&rdv)? };
    let _lock = take_out_dir(&cfg, &mut ctl)?;
    crate::logging::init(rank, Some(&cfg.out_dir.join("logs").join(format!("rank{rank:03}.log"))))
        .map_err(|e| TrainError::Other(format!("{}: cannot open the log file: {e}", cfg.out_dir.display())))?;
    // What a crashed run left (an interrupted save, a half-retired tag) is cleared under the lock
    // before any rank reads the root.
    if rank == 0 {
        match checkpoint::recover_root(&cfg.out_dir) {
            Ok(done) => done.iter().for_each(|d| info!("recovered: {d}")),
            Err(e) => {
                ctl.abort(&e.to_string());
                return Err(e.into());
            }
        }
    }
    ctl.barrier("start-up recovery")?;
    let (device, kind) = resolve_device(&cfg, rdv.local_rank)?;
    if device.is_cuda() && world > 1 {
        crate::comm::nccl::use_torch_nccl()?;
    }
    tch::manual_seed(cfg.seed as i64);
    // What the device holds before zerokit allocates anything (the CUDA context, mostly), so that
    // measured peaks can be set against `ckpt estimate`, which leaves it out.
    let context_bytes = if device.is_cuda() {
        let _ = Tensor::zeros([1], (Kind::Float, device));
        crate::device::gpu_memory_used()
    } else {
        None
    };
    info!("zerokit train: {world} rank(s), device {device:?}, dtype {kind:?}, ZeRO stage {}", cfg.zero_stage);
    if device == Device::Cpu {
        // Every rank's file says it; the launcher divides the cores among local ranks.
        tracing::debug!("intra-op threads: {}", tch::get_num_threads());
        if kind == Kind::Half {
            tracing::warn!("fp16 on CPU is slow (CPUs have no fast fp16 matmuls): bf16 or fp32 is what CPU runs want");
        }
    }

    // The model starts in fp32 on the host of every rank with identical weights; the engine
    // moves it to the device in the compute kind.
    let resume_dir = (cfg.init_from == "resume").then(|| checkpoint::resolve(&cfg.out_dir, None)).transpose()?;
    // Sizes and headers (each file's identity included) before anything else: a damaged or
    // misplaced file stops the run here. The hashes follow in the background (below).
    let resume_manifest = match &resume_dir {
        Some(dir) => {
            let m = checkpoint::read_manifest(dir)?;
            checkpoint::check_tag(dir, &m)?;
            Some(m)
        }
        None => None,
    };
    let mcfg = match (&resume_dir, &resume_manifest) {
        (Some(dir), Some(m)) => serde_json::from_value(m.model_config.clone())
            .map_err(|e| TrainError::Other(format!("{}: model_config: {e}", dir.display())))?,
        _ => model_config(&cfg)?,
    };
    let model = match cfg.init_from.as_str() {
        "scratch" | "resume" => Gpt::new(&mcfg, Device::Cpu, Kind::Float, cfg.seed)?,
        hf if !Path::new(hf).is_dir() => {
            return Err(TrainError::Other(format!(
                "init_from = {hf:?}: not a directory. zerokit downloads nothing: give a local Hugging Face GPT-2 \
                 directory (config.json and model.safetensors), \"scratch\" or \"resume\""
            )))
        }
        hf => Gpt::load_hf(Path::new(hf), Device::Cpu, Kind::Float)?.0,
    };
    let mcfg = *model.config();
    if cfg.block_size > mcfg.block_size {
        let from = resume_dir.as_ref().map_or(cfg.init_from.clone(), |d| d.display().to_string());
        return Err(TrainError::Other(format!(
            "block_size {} is larger than the model's {} positions ({from}): set block_size to at most {}",
            cfg.block_size, mcfg.block_size, mcfg.block_size
        )));
    }
    // The configuration as in effect, printed and saved: a preset's or a loaded model's shape,
    // not the custom-model defaults it replaced.
    (cfg.n_layer, cfg.n_head, cfg.n_embd, cfg.vocab_size) = (mcfg.n_layer, mcfg.n_head, mcfg.n_embd, mcfg.vocab_size);
    info!("resolved configuration:\n{}", cfg.to_toml());
    let n_params = mcfg.num_params();
    info!(
        "model: {} layers, {} heads, {} embd, block {}, vocab {}: {:.2}M parameters",
        mcfg.n_layer,
        mcfg.n_head,
        mcfg.n_embd,
        mcfg.block_size,
        mcfg.vocab_size,
        n_params as f64 / 1e6
    );

    let ecfg = EngineConfig {
        stage: cfg.zero_stage,
        grad_accum: cfg.gradient_accumulation_steps,
        grad_clip: cfg.grad_clip,
        activation_checkpointing: cfg.activation_checkpointing,
        kind,
        device,
        adamw: AdamWConfig {
            lr: cfg.learning_rate,
            betas: (cfg.beta1, cfg.beta2),
            eps: cfg.eps,
            weight_decay: cfg.weight_decay,
        },
        scaler: ScalerConfig {
            loss_scale: cfg.loss_scale,
            initial_scale_power: cfg.initial_scale_power,
            loss_scale_window: cfg.loss_scale_window,
            hysteresis: cfg.hysteresis,
            consecutive_hysteresis: cfg.consecutive_hysteresis,
            min_loss_scale: cfg.min_loss_scale,
            // Training keeps going at the minimum scale, skipping overflowing steps, and says so.
            raise_error_at_min_scale: false,
        },
    };
    let comm = collectives(ctl, device)?;
    let mut engine = Engine::new(model, ecfg, comm)?;
    let mut start = 0u64;
    let mut best_val = f64::INFINITY;
    let mut best_tag: Option<String> = None;
    let mut stale_evals = 0;
    let mut tokens_seen = 0u64;
    let mut hashes: Option<ResumeHashes> = None;
    if let Some(dir) = &resume_dir {
        let m = checkpoint::load(&mut engine, dir)?;
        let share = checkpoint::resume_hash_share(&m, &engine.layout, rank);
        let h = ResumeHashes::start(dir, &m, share);
        info!("checking the sha256 of {} file(s) of {} in the background (rank 0's share)", h.files(), dir.display());
        hashes = Some(h);
        start = m.step;
        tokens_seen = m.tokens_seen;
        best_val = m.metrics.get("best_val_loss").and_then(|v| v.as_f64()).unwrap_or(f64::INFINITY);
        best_tag = m.metrics.get("best_tag").and_then(|v| v.as_str()).map(String::from);
        stale_evals = m.metrics.get("stale_evals").and_then(|v| v.as_u64()).unwrap_or(0);
        info!(
            "resumed from {} at step {start} (saved on {} rank(s), stage {})",
            dir.display(),
            m.world_size,
            m.zero_stage
        );
    }

    let train = TokenDataset::open(&cfg.dataset, "train", mcfg.vocab_size)?;
    let val = TokenDataset::open(&cfg.dataset, "val", mcfg.vocab_size)?;
    let schedule = cfg.lr_schedule();
    let tokens_per_step = (cfg.batch_size * cfg.block_size * cfg.gradient_accumulation_steps * world) as u64;
    let flops_per_token = 6.0 * n_params as f64 + 12.0 * (mcfg.n_layer * mcfg.n_embd * mcfg.block_size) as f64;
    let metrics_path = cfg.out_dir.join("metrics.jsonl");
    // The plot continues the curve of the run being resumed.
    let mut evals = if resume_dir.is_some() { earlier_evals(&metrics_path, start) } else { (Vec::new(), Vec::new()) };
    let pb = crate::logging::progress_bar(
        cfg.max_iters - start.min(cfg.max_iters),
        "{bar:30} {pos}/{len} steps [{elapsed_precise}<{eta_precise}] {msg}",
    );
    if let (Some(b), 0) = (context_bytes, rank) {
        let gib = b as f64 / (1u64 << 30) as f64;
        info!("GPU memory in use before the model: {gib:.2} GiB (CUDA context)");
        append_jsonl(&metrics_path, serde_json::json!({"step": start, "gpu_context_gib": gib}))?;
    }
    let mut t0 = Instant::now();
    let mut step = start;
    loop {
        let lr = schedule.lr(step);
        // Evaluate, plot and checkpoint.
        // eval_iters = 0 turns evaluation and checkpointing off (benchmarks).
        // A resumed run's first step was evaluated (and saved) by the run it continues.
        let resumed_here = resume_dir.is_some() && step == start;
        if cfg.eval_iters > 0 && !resumed_here && (step % cfg.eval_interval == 0 || step == cfg.max_iters) {
            let (tl, vl) = evaluate(&mut engine, &train, &val, &cfg, device)?;
            info!("step {step}: train loss {tl:.4}, val loss {vl:.4}");
            let improved = vl < best_val;
            if rank == 0 {
                append_jsonl(&metrics_path, serde_json::json!({"step": step, "train_loss": tl, "val_loss": vl}))?;
                evals.0.push((step as f64, tl));
                evals.1.push((step as f64, vl));
                write_plot(&cfg.out_dir, &evals);
            }
            if improved {
                best_val = vl;
                stale_evals = 0;
            } else {
                stale_evals += 1;
            }
            if step > start && (improved || cfg.always_save_checkpoint) {
                let tag = checkpoint::tag_name(step);
                if improved {
                    best_tag = Some(tag.clone());
                }
                let info = SaveInfo {
                    step,
                    tokens_seen,
                    model_config: serde_json::to_value(mcfg).expect("config serializes"),
                    config: serde_json::to_value(&cfg).expect("config serializes"),
                    lr,
                    data: serde_json::json!({"seed": cfg.seed, "next_step": step, "batch_size": cfg.batch_size, "gradient_accumulation_steps": cfg.gradient_accumulation_steps}),
                    metrics: serde_json::json!({"train_loss": tl, "val_loss": vl, "best_val_loss": best_val, "best_tag": best_tag, "stale_evals": stale_evals}),
                    keep_last: cfg.keep_last,
                    best: best_tag.clone(),
                };
                settle(&mut hashes, &mut engine)?;
                let dir = checkpoint::save(&mut engine, &cfg.out_dir, &info)?;
                info!("saved checkpoint {}", dir.display());
            }
            if cfg.patience > 0 && stale_evals >= cfg.patience {
                info!("early stop: val loss has not improved for {stale_evals} evaluations");
                break;
            }
            t0 = Instant::now();
        }
        if step >= cfg.max_iters {
            break;
        }

        // One optimizer step: micro-steps of forward and backward, then the ZeRO update.
        for micro in 0..cfg.gradient_accumulation_steps {
            let (x, y) = train_batch(&train, &cfg, rank, world, step, micro, device)?;
            engine.forward_backward(&x, &y)?;
        }
        let st = engine.step(lr)?;
        if let Some(p) = &mut engine.profile {
            info!("step {}: {}", step + 1, p.take());
        }
        step += 1;
        tokens_seen += tokens_per_step;
        exit_hook(rank, step);
        pb.inc(1);

        if step % cfg.log_interval == 0 || st.skipped {
            let dt = t0.elapsed().as_secs_f64() / (step - start).min(cfg.log_interval).max(1) as f64;
            let tok_s = tokens_per_step as f64 / dt;
            let mfu = if device.is_cuda() { 100.0 * tok_s / world as f64 * flops_per_token / PEAK_FLOPS } else { 0.0 };
            // Only fp16 scales its loss; in fp32 and bf16 a skipped step means the gradient
            // itself was NaN or Inf.
            let skipped = match (st.skipped, &engine.scaler) {
                (false, _) => String::new(),
                (true, Some(s)) => format!(" (step skipped: overflow, loss scale now {})", s.scale()),
                (true, None) => " (step skipped: non-finite gradient)".to_string(),
            };
            let mem = if device.is_cuda() { crate::device::gpu_memory_used() } else { None };
            let mem_gib = mem.map(|b| b as f64 / (1u64 << 30) as f64);
            let mfu_txt = match mem_gib {
                Some(g) => format!(", mfu {mfu:.1}%, mem {g:.1} GiB"),
                None if device.is_cuda() => format!(", mfu {mfu:.1}%"),
                None => String::new(),
            };
            info!(
                "iter {step}: loss {:.4}, time {:.1}ms, {:.0} tokens/s{mfu_txt}, lr {lr:.3e}, norm {:.3}{skipped}",
                st.loss,
                dt * 1e3,
                tok_s,
                st.grad_norm
            );
            pb.set_message(format!("loss {:.4}", st.loss));
            if rank == 0 {
                append_jsonl(
                    &metrics_path,
                    serde_json::json!({"step": step, "loss": st.loss, "lr": lr, "time_ms": dt * 1e3, "tokens_per_s": tok_s, "mfu": mfu, "grad_norm": st.grad_norm, "loss_scale": st.loss_scale, "skipped": st.skipped, "gpu_mem_gib": mem_gib}),
                )?;
            }
            t0 = Instant::now();
        }
    }
    pb.finish_and_clear();
    // A run that never saved still says whether what it resumed from was intact.
    settle(&mut hashes, &mut engine)?;
    engine.comm.barrier()?;
    if rank == 0 && cfg.sample_tokens > 0 {
        let text = sample_text(
            &engine.model,
            &cfg.sample_prompt,
            cfg.sample_tokens,
            cfg.sample_temperature,
            cfg.sample_top_k,
            cfg.seed,
        )?;
        info!("sample:\n{text}");
    }
    Ok(())
}

/// Waits for the background hashes of the checkpoint the run resumed from, if not done yet
/// (collective): before the first save, which may replace or retire what was resumed from.
fn settle(hashes: &mut Option<ResumeHashes>, engine: &mut Engine) -> Result<(), TrainError> {
    if let Some(h) = hashes.take() {
        h.settle(engine.comm.control())?;
        info!("the checkpoint resumed from matches its manifest's sha256");
    }
    Ok(())
}

/// Evaluated losses by step, (train, val).
type Evals = (Vec<(f64, f64)>, Vec<(f64, f64)>);

/// The evaluations (train, val) that metrics.jsonl holds up to `upto`, for the plot of a resumed run.
fn earlier_evals(path: &Path, upto: u64) -> Evals {
    let mut evals = (Vec::new(), Vec::new());
    for v in std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
    {
        if let (Some(s), Some(t), Some(vl)) = (v["step"].as_u64(), v["train_loss"].as_f64(), v["val_loss"].as_f64()) {
            if s <= upto {
                evals.0.push((s as f64, t));
                evals.1.push((s as f64, vl));
            }
        }
    }
    evals
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

fn write_plot(out_dir: &Path, evals: &Evals) {
    use crate::plot::{write_loss_plot, Series};
    let series = [
        Series { label: "train".into(), color: [31, 119, 180], points: evals.0.clone() },
        Series { label: "val".into(), color: [255, 127, 14], points: evals.1.clone() },
    ];
    if let Err(e) = write_loss_plot(&out_dir.join("loss.png"), "loss", &series, 800, 500) {
        tracing::warn!("loss plot not written: {e}");
    }
}

/// Generates text from `model` with nanoGPT's sampling (temperature, top-k, seeded).
pub fn sample_text(
    model: &Gpt,
    prompt: &str,
    tokens: usize,
    temperature: f64,
    top_k: usize,
    seed: u64,
) -> Result<String, TrainError> {
    let bpe = Tokenizer::new(Encoding::R50kBase)?;
    let mut ids: Vec<i64> = bpe.encode_ordinary(prompt).into_iter().map(|t| t as i64).collect();
    if ids.is_empty() {
        ids.push(50256);
    }
    let idx = Tensor::from_slice(&ids).view([1, -1]).to_device(model.device());
    let top_k = (top_k > 0).then_some(top_k);
    let out = tch::no_grad(|| model.generate(&idx, tokens, temperature, top_k, seed))?;
    let out: Vec<i64> = Vec::<i64>::try_from(out.view(-1).to_device(Device::Cpu))
        .map_err(|e: tch::TchError| TrainError::Other(e.to_string()))?;
    // Padded vocabulary rows (>= 50257) are not tokens: they are dropped from the text.
    let ids: Vec<u32> =
        out.iter().filter(|&&t| (t as usize) < bpe.encoding().vocab_size()).map(|&t| t as u32).collect();
    Ok(String::from_utf8_lossy(&bpe.decode_bytes(&ids)?).into_owned())
}

/// `train sample`: text from a checkpoint (a root, its `latest` followed, or a tag directory).
pub fn sample_from_checkpoint(
    path: &Path,
    prompt: &str,
    tokens: usize,
    temperature: f64,
    top_k: usize,
    seed: u64,
    device: &str,
) -> Result<String, TrainError> {
    // A tag directory is also a Hugging Face model directory (config.json + model.safetensors).
    let dir = checkpoint::resolve(path, None)?;
    checkpoint::check_tag(&dir, &checkpoint::read_manifest(&dir)?)?;
    let device = crate::device::parse_device(device).map_err(TrainError::Other)?;
    let (model, _) = Gpt::load_hf(&dir, device, Kind::Float)?;
    sample_text(&model, prompt, tokens, temperature, top_k, seed)
}

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
                sample_from_checkpoint(&a.checkpoint, &prompt, a.tokens, a.temperature, a.top_k, a.seed, &a.device)?;
            println!("{text}");
            Ok(())
        }
        Some(TrainCommand::Fit(a)) => run_fit(a),
        None => run_fit(cli.fit),
    }
}

fn run_fit(a: FitArgs) -> Result<(), TrainError> {
    let cfg = TrainConfig::load(a.config.as_deref(), a.deepspeed.as_deref(), &a.set)?;
    if a.launch.launches() && !launch::is_launched_rank() {
        return launch::spawn_local_ranks(&a.launch).map_err(|e| TrainError::Other(e.to_string()));
    }
    fit(cfg)
}
