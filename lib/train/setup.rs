//! Everything before the first step: ranks and the control plane, the run lock, logging,
//! recovery of what a crash left, device and dtype, the model, the engine, and the state a
//! resumed run continues from.

use super::metrics::{append_jsonl, earlier_evals, Evals};
use super::state::{TrainError, TrainState};
use crate::checkpoint::saver::Saver;
use crate::checkpoint::{self, Manifest, ResumeHashes};
use crate::ckpt::{self, Format, Target};
use crate::comm::{Collectives, ControlPlane, CpuComm, Rendezvous};
use crate::config::TrainConfig;
use crate::data::dataset::TokenDataset;
use crate::formats::tfevents::EventWriter;
use crate::interop::deepspeed_resume::DeepSpeedResume;
use crate::interop::hf_model;
use crate::lock::RunLock;
use crate::memory;
use crate::model::{AnyModel, GptConfig, ModelConfig};
use crate::optim::LrSchedule;
use crate::zero::Engine;
use indicatif::ProgressBar;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use tch::{Device, Kind, Tensor};
use tracing::info;

/// A training run on this rank: what the loop in [`super::fit`] works with.
pub(super) struct Run {
    pub cfg: TrainConfig,
    pub rank: usize,
    pub world: usize,
    pub device: Device,
    pub engine: Engine<AnyModel>,
    pub model_cfg: ModelConfig,
    /// The Hugging Face directory the weights started from, as manifests record it
    /// (`checkpoint::Manifest::init_dir`).
    pub init_dir: Option<String>,
    pub state: TrainState,
    /// The step this process started at (the resumed checkpoint's, or 0).
    pub start: u64,
    /// The checkpoint this run resumed from.
    pub resumed_from: Option<PathBuf>,
    /// The sha256 check of that checkpoint, running beside training until settled.
    pub hashes: Option<ResumeHashes>,
    /// Checkpoint saves, the one still writing in the background included.
    pub saver: Saver,
    /// The tag this run saved last and its step (`final` links to its files when the run ends
    /// at that step).
    pub last_saved: Option<(String, u64)>,
    pub train: TokenDataset,
    pub val: TokenDataset,
    pub schedule: LrSchedule,
    pub tokens_per_step: u64,
    pub flops_per_token: f64,
    pub metrics_path: PathBuf,
    /// Evaluated losses by step, (train, val), for the plot.
    pub evals: Evals,
    pub progress: ProgressBar,
    /// When the current logging interval started.
    pub interval_start: Instant,
    /// The losses (train, val) of this process's last evaluation.
    pub last_eval: Option<(f64, f64)>,
    /// Rank 0's TensorBoard event file (`tensorboard_dir`).
    pub tensorboard: Option<EventWriter>,
    /// The engine's phase timer while the kernel trace's step runs without it.
    pub profile_aside: Option<crate::zero::profile::PhaseTimer>,
    /// Held by rank 0 for the whole run.
    _lock: Option<RunLock>,
}

impl Run {
    pub fn start(mut cfg: TrainConfig) -> Result<Run, TrainError> {
        let rdv = Rendezvous::from_env(Duration::from_secs(cfg.comm_timeout))?;
        cfg.resolve_batch(rdv.world)?;
        let (rank, world) = (rdv.rank, rdv.world);
        let mut ctl = if world == 1 { ControlPlane::single() } else { ControlPlane::connect(&rdv)? };
        let lock = take_out_dir(&cfg, &mut ctl)?;
        crate::logging::init(rank, Some(&cfg.out_dir.join("logs").join(format!("rank{rank:03}.log"))))
            .map_err(|e| TrainError::Other(format!("{}: cannot open the log file: {e}", cfg.out_dir.display())))?;
        recover(&cfg, &mut ctl)?;
        let (device, kind) = resolve_device(&cfg, rdv.local_rank)?;
        if device.is_cuda() {
            crate::device::prefer_attention(&cfg.attention).map_err(TrainError::Other)?;
        }
        if cfg.deterministic {
            crate::device::set_deterministic(true).map_err(TrainError::Other)?;
        }
        if device.is_cuda() && world > 1 {
            crate::comm::nccl::use_torch_nccl()?;
        }
        tch::manual_seed(cfg.seed as i64);
        let context_bytes = context_memory(device);
        info!("zerokit train: {world} rank(s), device {device:?}, dtype {kind:?}, ZeRO stage {}", cfg.zero_stage);
        if device == Device::Cpu {
            // Every rank's file says it; the launcher divides the cores among local ranks.
            tracing::debug!("intra-op threads: {}", tch::get_num_threads());
            if kind == Kind::Half {
                tracing::warn!(
                    "fp16 on CPU is slow (CPUs have no fast fp16 matmuls): bf16 or fp32 is what CPU runs want"
                );
            }
        }

        let mut resume = resume_point(&cfg)?;
        let shape = initial_shape(&cfg, resume.as_ref())?;
        check_host_memory(&cfg, &shape, &rdv, device, kind, &mut ctl)?;
        let model = initial_model(&cfg, shape)?;
        let model_cfg = model.config();
        if let Some(Resume::DeepSpeed(ds)) = &mut resume {
            ds.check(&model_cfg.param_specs())?;
        }
        let positions = model_cfg.positions();
        if cfg.block_size > positions {
            let from = resume.as_ref().map_or(cfg.init_from.clone(), |r| r.dir().display().to_string());
            return Err(TrainError::Other(format!(
                "block_size {} is larger than the model's {positions} positions ({from}): set block_size to at most {positions}",
                cfg.block_size
            )));
        }
        // The configuration as in effect, printed and saved: a preset's or a loaded model's shape,
        // not the custom-model defaults it replaced.
        ((cfg.n_layer, cfg.n_head, cfg.n_embd), cfg.vocab_size) = (model_cfg.dims(), model_cfg.vocab_size());
        info!("resolved configuration:\n{}", cfg.to_toml());
        info!("model: {}", model_cfg.summary());

        // Carried over resumes, so that the tokenizer of the model a run started from stays known.
        let init_dir = match &resume {
            Some(Resume::Zerokit(_, m)) => m.init_dir.clone(),
            Some(Resume::DeepSpeed(_)) => None,
            None => init_dir(&cfg)?.map(|d| std::fs::canonicalize(&d).unwrap_or(d).display().to_string()),
        };
        let comm = collectives(ctl, device)?;
        let mut engine = Engine::new(model, cfg.engine(device, kind), comm)?;
        let mut state = TrainState { step: 0, tokens_seen: 0, best_val_loss: None, best_tag: None, stale_evals: 0 };
        let mut hashes = None;
        match &resume {
            Some(Resume::Zerokit(dir, _)) => {
                let (resumed, h) = resume_engine(&mut engine, dir, rank)?;
                state = resumed;
                hashes = Some(h);
            }
            Some(Resume::DeepSpeed(ds)) => state = resume_deepspeed(&mut engine, ds, &cfg)?,
            None => {}
        }

        let train = TokenDataset::open(&cfg.dataset, "train", model_cfg.vocab_size())?;
        let val = TokenDataset::open(&cfg.dataset, "val", model_cfg.vocab_size())?;
        let start = state.step;
        let metrics_path = cfg.out_dir.join("metrics.jsonl");
        // The plot continues the curve of the run being resumed.
        let evals = if resume.is_some() { earlier_evals(&metrics_path, start) } else { Default::default() };
        let progress = crate::logging::progress_bar(
            cfg.max_iters - start.min(cfg.max_iters),
            "{bar:30} {pos}/{len} steps [{elapsed_precise}<{eta_precise}] {msg}",
        );
        let tensorboard = match (cfg.tensorboard_dir.as_str(), rank) {
            ("", _) | (_, 1..) => None,
            (dir, _) => {
                let w = EventWriter::create(Path::new(dir), &crate::launch::hostname())
                    .map_err(|e| TrainError::Other(format!("tensorboard_dir {dir}: {e}")))?;
                info!("TensorBoard events: {}", w.path().display());
                Some(w)
            }
        };
        if let (Some(b), 0) = (context_bytes, rank) {
            let gib = b as f64 / (1u64 << 30) as f64;
            info!("GPU memory in use before the model: {gib:.2} GiB (CUDA context)");
            append_jsonl(&metrics_path, serde_json::json!({"step": start, "gpu_context_gib": gib}))?;
        }
        Ok(Run {
            schedule: cfg.lr_schedule(),
            tokens_per_step: (cfg.batch_size * cfg.block_size * cfg.gradient_accumulation_steps * world) as u64,
            flops_per_token: model_cfg.flops_per_token(cfg.block_size),
            cfg,
            rank,
            world,
            device,
            engine,
            model_cfg,
            init_dir,
            state,
            start,
            resumed_from: resume.map(|r| r.dir().to_path_buf()),
            hashes,
            saver: Saver::new(),
            last_saved: None,
            train,
            val,
            metrics_path,
            evals,
            progress,
            interval_start: Instant::now(),
            last_eval: None,
            tensorboard,
            profile_aside: None,
            _lock: lock,
        })
    }
}

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

/// GPT-2's vocabulary in a scratch run when `vocab_size` is 0: nanoGPT's 50304, the tokenizer's
/// 50257 padded to a multiple of 64 for faster matrix products.
pub const GPT2_PADDED_VOCAB: usize = 50304;

/// The model shape the configuration asks for: `custom` (a GPT-2 of n_layer, n_head, n_embd), a
/// preset (GPT-2's, Llama's or Gemma's layers and widths, and for GPT-2 its block_size as the
/// positions), or else a Hugging Face config.json (a file ending in .json, or a directory holding
/// one), taken as it is. `vocab_size` 0 keeps the model's own vocabulary: a Llama or Gemma
/// preset's, and for GPT-2 nanoGPT's 50304 (50257 padded to a multiple of 64); any other value
/// replaces it.
pub fn model_config(cfg: &TrainConfig) -> Result<ModelConfig, TrainError> {
    let path = Path::new(&cfg.model);
    let mut m = match ModelConfig::preset(&cfg.model) {
        _ if cfg.model == "custom" => ModelConfig::Gpt2(GptConfig {
            n_layer: cfg.n_layer,
            n_head: cfg.n_head,
            n_embd: cfg.n_embd,
            block_size: cfg.block_size,
            vocab_size: GPT2_PADDED_VOCAB,
        }),
        Ok(m) => m,
        Err(_) if cfg.model.ends_with(".json") || path.is_dir() => {
            let m = hf_model::read_config(path)?;
            m.validate().map_err(|e| TrainError::Other(format!("model = {:?}: {e}", cfg.model)))?;
            return Ok(m);
        }
        Err(e) => return Err(e.into()),
    };
    if let ModelConfig::Gpt2(c) = &mut m {
        c.block_size = cfg.block_size;
        c.vocab_size = GPT2_PADDED_VOCAB;
    }
    if cfg.vocab_size != 0 {
        m.set_vocab_size(cfg.vocab_size);
    }
    Ok(m)
}

fn collectives(ctl: ControlPlane, device: Device) -> Result<Box<dyn Collectives>, TrainError> {
    Ok(match device {
        Device::Cuda(i) if ctl.world() > 1 => Box::new(crate::comm::nccl::NcclComm::new(ctl, i)?),
        _ => Box::new(CpuComm::new(ctl)),
    })
}

/// What the device holds before zerokit allocates anything (the CUDA context, mostly), so that
/// measured peaks can be set against `ckpt estimate`, which leaves it out.
fn context_memory(device: Device) -> Option<u64> {
    if !device.is_cuda() {
        return None;
    }
    let _ = Tensor::zeros([1], (Kind::Float, device));
    crate::device::gpu_memory_used()
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

/// What a crashed run left (an interrupted save, a half-retired tag) is cleared by rank 0 under
/// the lock before any rank reads the root.
fn recover(cfg: &TrainConfig, ctl: &mut ControlPlane) -> Result<(), TrainError> {
    if ctl.rank() == 0 {
        match checkpoint::recover_root(&cfg.out_dir) {
            Ok(done) => done.iter().for_each(|d| info!("recovered: {d}")),
            Err(e) => {
                ctl.abort(&e.to_string());
                return Err(e.into());
            }
        }
    }
    ctl.barrier("start-up recovery")?;
    Ok(())
}

/// What a resumed run continues from.
enum Resume {
    /// A zerokit tag and its manifest.
    Zerokit(PathBuf, Manifest),
    /// A DeepSpeed ZeRO checkpoint's tag.
    DeepSpeed(DeepSpeedResume),
}

impl Resume {
    fn dir(&self) -> &Path {
        match self {
            Resume::Zerokit(d, _) => d,
            Resume::DeepSpeed(ds) => ds.dir(),
        }
    }
}

/// The tag a resumed run continues from (`resume_from`, else the one `latest` names): a zerokit
/// tag with its manifest, or a DeepSpeed checkpoint (a `global_stepN` directory or the root whose
/// `latest` names one, told apart as `ckpt` tells them). A zerokit tag's sizes and headers (each
/// file's identity included) are checked before anything else, so a damaged or misplaced file
/// stops the run here; the hashes follow in the background ([`resume_engine`]).
fn resume_point(cfg: &TrainConfig) -> Result<Option<Resume>, TrainError> {
    if cfg.init_from != "resume" {
        return Ok(None);
    }
    let dir = match cfg.resume_from.as_str() {
        "" => checkpoint::resolve(&cfg.out_dir, None)?,
        d if Path::new(d).join("manifest.json").is_file() => PathBuf::from(d),
        d if Path::new(d).is_dir() => match ckpt::detect(Path::new(d)) {
            Ok(Target::Tag(Format::Deepspeed, dir)) => return deepspeed_point(&dir),
            Ok(Target::Root(Format::Deepspeed, root)) => {
                let dir = crate::convert::resolve_tag_dir(&root, None).map_err(|e| TrainError::Other(e.to_string()))?;
                return deepspeed_point(&dir);
            }
            _ => checkpoint::resolve(&cfg.out_dir, Some(d))?,
        },
        tag => checkpoint::resolve(&cfg.out_dir, Some(tag))?,
    };
    let m = checkpoint::read_manifest(&dir)?;
    checkpoint::check_tag(&dir, &m)?;
    Ok(Some(Resume::Zerokit(dir, m)))
}

fn deepspeed_point(dir: &Path) -> Result<Option<Resume>, TrainError> {
    Ok(Some(Resume::DeepSpeed(DeepSpeedResume::open(dir)?)))
}

/// The shape of the model a run starts from: the resumed checkpoint's, or the configuration's.
fn initial_shape(cfg: &TrainConfig, resume: Option<&Resume>) -> Result<ModelConfig, TrainError> {
    Ok(match resume {
        Some(Resume::Zerokit(dir, m)) => ModelConfig::from_manifest(&m.model_config)
            .map_err(|e| TrainError::Other(format!("{}: model_config: {e}", dir.display())))?,
        // DeepSpeed checkpoints are read with GPT-2's parameter names (interop::deepspeed_resume).
        Some(Resume::DeepSpeed(ds)) => match model_config(cfg)? {
            ModelConfig::Gpt2(g) => ModelConfig::Gpt2(ds.model_config(g)?),
            other => {
                return Err(TrainError::Other(format!(
                    "{}: resuming a DeepSpeed checkpoint is implemented for GPT-2 models, not {}",
                    ds.dir().display(),
                    other.family()
                )))
            }
        },
        None if init_dir(cfg)?.is_some() => hf_model::read_config(&init_dir(cfg)?.expect("checked"))?,
        None => model_config(cfg)?,
    })
}

/// Before any rank builds its model: what this node's ranks will hold in host memory (the
/// estimate's figures, `memory::host`) against what the machine has. Every rank checks (they
/// read the same machine) and the ranks agree, so that all stop when one node is too small.
fn check_host_memory(
    cfg: &TrainConfig,
    shape: &ModelConfig,
    rdv: &Rendezvous,
    device: Device,
    kind: Kind,
    ctl: &mut ControlPlane,
) -> Result<(), TrainError> {
    let setup = memory::Setup {
        model: memory::ModelShape(shape.clone()),
        // The per-rank figures depend on the world size alone; the node's ranks are counted below.
        gpus_per_node: rdv.world as u64,
        nodes: 1,
        dtype: match kind {
            Kind::Half => memory::Dtype::Fp16,
            Kind::BFloat16 => memory::Dtype::Bf16,
            _ => memory::Dtype::Fp32,
        },
        micro_batch: cfg.batch_size as u64,
        seq_len: cfg.block_size as u64,
        activation_checkpointing: cfg.activation_checkpointing,
        dropout: false,
        bucket_elems: 0,
        grad_accum: cfg.gradient_accumulation_steps as u64,
        prefetch_elems: cfg.stage3_prefetch_bucket_size,
        persistence_threshold: cfg.stage3_param_persistence_threshold,
        // Runs that never save (eval_iters = 0) keep no save buffers.
        async_save: cfg.async_save && cfg.eval_iters > 0,
    };
    let node = memory::host::Node {
        stage: cfg.zero_stage,
        offload: memory::Offload::from_flags(cfg.offload_optimizer, cfg.offload_param),
        local_ranks: rdv.local_world as u64,
        rank0: rdv.rank == rdv.local_rank,
        gpu: device.is_cuda(),
        saves: cfg.eval_iters > 0,
    };
    let verdict = memory::host::read_available().and_then(|have| memory::host::check(&setup, node, &have));
    let mut failed = [f64::from(u8::from(verdict.is_err()))];
    ctl.all_reduce_f64(&mut failed, "host memory check")?;
    match verdict {
        Ok(need) => {
            info!(
                "host memory: this node's {} rank(s) need {} (per rank {} steady, {} at start-up)",
                rdv.local_world,
                crate::units::human_bytes(need.total),
                crate::units::human_bytes(need.per_rank.steady() + need.compute),
                crate::units::human_bytes(need.per_rank.startup)
            );
            if failed[0] > 0.0 {
                return Err(TrainError::Other(
                    "the host memory check failed on another node (its log says what it needs)".into(),
                ));
            }
            Ok(())
        }
        Err(e) => Err(TrainError::Other(e.to_string())),
    }
}

/// The Hugging Face directory `init_from` names: a local directory, or a model id (ORG/NAME)
/// that is no local path, as its snapshot in the hub cache (an error when it is not there).
/// None for "scratch", "resume" and anything else (refused by `initial_model`).
fn init_dir(cfg: &TrainConfig) -> Result<Option<PathBuf>, TrainError> {
    Ok(match cfg.init_from.as_str() {
        "scratch" | "resume" => None,
        dir if Path::new(dir).is_dir() => Some(PathBuf::from(dir)),
        given => crate::hub::resolve(given)?,
    })
}

/// The model a run starts from, in fp32 on the host with identical weights on every rank (the
/// engine moves it to the device in the compute kind): fresh (from the seed) in `shape`, or a
/// Hugging Face directory's weights.
fn initial_model(cfg: &TrainConfig, shape: ModelConfig) -> Result<AnyModel, TrainError> {
    if let Some(dir) = init_dir(cfg)? {
        if dir != Path::new(&cfg.init_from) {
            info!("init_from = {:?}: the hub cache's snapshot {}", cfg.init_from, dir.display());
        }
        return Ok(hf_model::load(&dir, Device::Cpu, Kind::Float)?);
    }
    Ok(match cfg.init_from.as_str() {
        "scratch" | "resume" => shape.new_model(Device::Cpu, Kind::Float, cfg.seed)?,
        dir if !Path::new(dir).is_dir() => {
            return Err(TrainError::Other(format!(
                "init_from = {dir:?}: not a directory. zerokit downloads nothing: give a local Hugging Face GPT-2, \
                 Llama, Mistral, Qwen2 or Gemma directory (config.json and model.safetensors or its sharded index), a model id \
                 (ORG/NAME) in the local hub cache, \"scratch\" or \"resume\""
            )))
        }
        dir => hf_model::load(Path::new(dir), Device::Cpu, Kind::Float)?,
    })
}

/// Loads the engine's partition from the tag at `dir` and starts the background sha256 check of
/// this rank's share of its files; returns where training stood.
fn resume_engine(
    engine: &mut Engine<AnyModel>,
    dir: &Path,
    rank: usize,
) -> Result<(TrainState, ResumeHashes), TrainError> {
    let want = engine.state();
    let device = engine.config().device;
    let (m, part) = {
        let comm = engine.comm();
        checkpoint::load(dir, &want.layout, want.partition, device, &mut || comm.heartbeat())?
    };
    drop(want);
    engine.load_state(part).map_err(|e| TrainError::Other(format!("{}: restoring the engine: {e}", dir.display())))?;
    let h = ResumeHashes::start(dir, &m, checkpoint::resume_hash_share(&m, engine.layout(), rank));
    info!("checking the sha256 of {} file(s) of {} in the background (rank 0's share)", h.files(), dir.display());
    let state = TrainState::resumed(&m).map_err(|e| TrainError::Other(format!("{}: {e}", dir.display())))?;
    info!(
        "resumed from {} at step {} (saved on {} rank(s), stage {})",
        dir.display(),
        state.step,
        m.world_size,
        m.zero_stage
    );
    Ok((state, h))
}

/// Loads the engine's partition from a DeepSpeed checkpoint (re-partitioned for this run's layout)
/// and logs what does not carry over; returns where training stood.
fn resume_deepspeed(
    engine: &mut Engine<AnyModel>,
    ds: &DeepSpeedResume,
    cfg: &TrainConfig,
) -> Result<TrainState, TrainError> {
    let want = engine.state();
    let part = {
        let ecfg = engine.config().clone();
        let comm = engine.comm();
        ds.load_partition(&want.layout, want.partition, &ecfg, &mut || comm.heartbeat())?
    };
    drop(want);
    let dir = ds.dir().display().to_string();
    engine.load_state(part).map_err(|e| TrainError::Other(format!("{dir}: restoring the engine: {e}")))?;
    let step = ds.step();
    let tokens_seen = ds.record().global_samples.unwrap_or(0) * cfg.block_size as u64;
    info!(
        "resumed from the DeepSpeed checkpoint {dir} ({}): step {step}, Adam step {}, {}; tokens seen counted as \
         global_samples x block_size = {tokens_seen}",
        ds.describe(),
        ds.optimizer_step(),
        engine.loss_scale().map_or("no loss scale".into(), |s| format!("loss scale {s}")),
    );
    for note in ds.not_carried_over(engine.config(), cfg.lr_schedule().lr(step)) {
        tracing::warn!("not carried over from DeepSpeed: {note}");
    }
    Ok(TrainState { step, tokens_seen, best_val_loss: None, best_tag: None, stale_evals: 0 })
}
