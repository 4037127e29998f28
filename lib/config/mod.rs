//! The training configuration: one TOML file holding every knob (nanoGPT's names), overridable
//! with `--set key=value`, printed back resolved at start. Unknown keys are errors that name the
//! key. A DeepSpeed JSON config is translated into the same structure (`from_deepspeed_json`).

mod deepspeed;
pub mod files;

pub use deepspeed::{from_deepspeed_json, from_deepspeed_value};

use crate::optim::{AdamWConfig, Decay, LrSchedule};
use crate::scaler::ScalerConfig;
use crate::zero::EngineConfig;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path}: {msg}")]
    Parse { path: PathBuf, msg: String },
    #[error("--set {0}: expected KEY=VALUE")]
    Override(String),
    #[error("--set {arg}: {msg}")]
    BadOverride { arg: String, msg: String },
    #[error("{0}")]
    Invalid(String),
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct TrainConfig {
    // I/O
    /// Directory with train.bin / val.bin (from `prepare`).
    pub dataset: PathBuf,
    /// Checkpoints, logs, metrics.jsonl and the loss plot go here.
    pub out_dir: PathBuf,
    /// "scratch", "resume" (latest checkpoint in out_dir) or a Hugging Face GPT-2 directory.
    pub init_from: String,
    /// With init_from = "resume": the tag to continue from, a tag name under out_dir
    /// ("step_00000300", "final") or a tag directory anywhere, or a DeepSpeed ZeRO checkpoint
    /// (its root or a `global_stepN` directory); empty: the tag `latest` names.
    pub resume_from: String,
    pub eval_interval: u64,
    pub log_interval: u64,
    pub eval_iters: u64,
    /// Save at every evaluation, not only when val loss improves.
    pub always_save_checkpoint: bool,
    /// Stop after this many evaluations without improvement (0: never).
    pub patience: u64,
    /// Checkpoints kept besides the best one.
    pub keep_last: usize,
    /// Save in the background: copy the state to host memory (twice the state's size in host
    /// memory while training), let training go on while the files are written. false: training
    /// waits for every save, with no host copy.
    pub async_save: bool,
    /// TensorBoard event files go here when set (loss, lr, grad norm, loss scale, tokens/s,
    /// MFU, memory, eval losses); empty: none.
    pub tensorboard_dir: String,
    // model
    /// "custom" (a GPT-2 of n_layer, n_head, n_embd), a preset (gpt2, gpt2-medium, gpt2-large,
    /// gpt2-xl, llama-3.2-1b, llama-3.2-3b, llama-3.1-8b, llama-tiny, mistral-7b, qwen2.5-0.5b,
    /// gemma-2-2b, gemma-3-27b, gemma-tiny), or a Hugging Face
    /// config.json (a path ending in .json, or a directory holding one).
    pub model: String,
    pub n_layer: usize,
    pub n_head: usize,
    pub n_embd: usize,
    pub block_size: usize,
    /// Embedding rows; 0: the model's own (a Llama or Gemma preset's, 50304 for GPT-2).
    pub vocab_size: usize,
    // batch
    /// Micro-batch per rank (0: derived from train_batch_size).
    pub batch_size: usize,
    /// Global batch in sequences, DeepSpeed's train_batch_size (0: not set).
    pub train_batch_size: usize,
    pub gradient_accumulation_steps: usize,
    pub max_iters: u64,
    // AdamW and schedule
    pub learning_rate: f64,
    pub weight_decay: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub grad_clip: f64,
    pub decay_lr: bool,
    pub warmup_iters: u64,
    pub lr_decay_iters: u64,
    pub min_lr: f64,
    /// A DeepSpeed scheduler (set from a DeepSpeed config's "scheduler" block); replaces the
    /// nanoGPT schedule above when present.
    pub lr_schedule: Option<LrSchedule>,
    // system
    /// "auto", "cpu", "cuda" or "cuda:N".
    pub device: String,
    /// "auto" (bf16 on a CUDA device, fp32 on CPU), "fp32", "bf16" or "fp16".
    pub dtype: String,
    pub zero_stage: u8,
    /// Keep the fp32 master weights and Adam's moments in host memory and run AdamW on the host
    /// cores (DeepSpeed's offload_optimizer with device "cpu"); stages 1, 2 and 3.
    pub offload_optimizer: bool,
    /// Keep the parameter partitions in host memory between uses (DeepSpeed's offload_param with
    /// device "cpu"); stage 3 only.
    pub offload_param: bool,
    /// Host buffers of offloading are page-locked, so copies overlap compute (DeepSpeed's
    /// pin_memory). Without it the copies are synchronous.
    pub pin_memory: bool,
    /// Stage 3: elements of parameters gathered ahead of the block that uses them
    /// (DeepSpeed's stage3_prefetch_bucket_size); 0 gathers each block only when it runs.
    pub stage3_prefetch_bucket_size: u64,
    /// Stage 3: buckets of at most this many elements stay gathered for the whole step
    /// (DeepSpeed's stage3_param_persistence_threshold, applied to zerokit's buckets).
    pub stage3_param_persistence_threshold: u64,
    pub activation_checkpointing: bool,
    pub seed: u64,
    /// Seconds a rank waits for the others before the job is ended.
    pub comm_timeout: u64,
    /// Attention kernels tried first on CUDA: "auto" (libtorch's order: flash attention first),
    /// "flash", "cudnn", "efficient" or "math".
    pub attention: String,
    /// Bitwise-reproducible runs: the same seed, world size and configuration give the same
    /// losses and weights (libtorch's deterministic kernels, cuBLAS's fixed workspace).
    pub deterministic: bool,
    /// Log where each step's time goes (data, forward, head and loss, backward, communication
    /// wait, gradient norm, AdamW, weight all-gather), averaged over each log interval. The device
    /// is synchronized at each phase boundary, which costs some speed.
    pub profile: bool,
    // fp16 loss scaling (DeepSpeed's fp16 block). The same fields as scaler::ScalerConfig, kept
    // flat here so they are top-level keys: serde's flatten cannot be combined with
    // deny_unknown_fields, which names unknown keys.
    /// A static loss scale when > 0; dynamic scaling when 0.
    pub loss_scale: f64,
    pub initial_scale_power: u32,
    pub loss_scale_window: u64,
    pub hysteresis: u32,
    pub consecutive_hysteresis: bool,
    pub min_loss_scale: f64,
    // sampling after training
    pub sample_tokens: usize,
    pub sample_prompt: String,
    pub sample_temperature: f64,
    pub sample_top_k: usize,
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            dataset: "data/shakespeare".into(),
            out_dir: "out".into(),
            init_from: "scratch".into(),
            resume_from: String::new(),
            eval_interval: 250,
            log_interval: 10,
            eval_iters: 20,
            always_save_checkpoint: false,
            patience: 0,
            keep_last: 2,
            async_save: true,
            tensorboard_dir: String::new(),
            model: "custom".into(),
            n_layer: 4,
            n_head: 4,
            n_embd: 128,
            block_size: 128,
            vocab_size: 0,
            batch_size: 12,
            train_batch_size: 0,
            gradient_accumulation_steps: 1,
            max_iters: 2000,
            learning_rate: 6e-4,
            weight_decay: 0.1,
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            grad_clip: 1.0,
            decay_lr: true,
            warmup_iters: 100,
            lr_decay_iters: 2000,
            min_lr: 6e-5,
            lr_schedule: None,
            device: "auto".into(),
            dtype: "auto".into(),
            zero_stage: 0,
            offload_optimizer: false,
            offload_param: false,
            pin_memory: true,
            stage3_prefetch_bucket_size: 50_000_000,
            stage3_param_persistence_threshold: 100_000,
            activation_checkpointing: false,
            seed: 1337,
            comm_timeout: 300,
            attention: "auto".into(),
            deterministic: false,
            profile: false,
            loss_scale: 0.0,
            initial_scale_power: 16,
            loss_scale_window: 1000,
            hysteresis: 2,
            consecutive_hysteresis: false,
            min_loss_scale: 1.0,
            sample_tokens: 200,
            sample_prompt: "\n".into(),
            sample_temperature: 0.8,
            sample_top_k: 200,
        }
    }
}

/// The type every key has, from the defaults (all keys but `lr_schedule`, which is `None`).
fn default_table() -> toml::Table {
    match toml::Value::try_from(TrainConfig::default()) {
        Ok(toml::Value::Table(t)) => t,
        _ => unreachable!("TrainConfig serializes to a table"),
    }
}

fn type_name(v: &toml::Value) -> &'static str {
    match v {
        toml::Value::String(_) => "a string",
        toml::Value::Integer(_) => "an integer",
        toml::Value::Float(_) => "a number",
        toml::Value::Boolean(_) => "true or false",
        toml::Value::Datetime(_) => "a date",
        toml::Value::Array(_) => "an array",
        toml::Value::Table(_) => "a table",
    }
}

/// "unknown key" with the nearest valid key when one is close (a typo), and every valid key.
fn unknown_key(key: &str, defaults: &toml::Table) -> String {
    let mut valid: Vec<&str> = defaults.keys().map(String::as_str).chain(["lr_schedule"]).collect();
    valid.sort_unstable();
    valid.dedup();
    let nearest = valid
        .iter()
        .map(|v| (edit_distance(&key.to_lowercase(), v), *v))
        .min()
        .filter(|(d, v)| *d <= 2.max(v.len() / 3))
        .map(|(_, v)| format!(" (did you mean `{v}`?)"))
        .unwrap_or_default();
    format!("unknown key `{key}`{nearest}; valid keys: {}", valid.join(", "))
}

/// Levenshtein distance (insertions, deletions, substitutions), for suggesting keys.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut diag = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let next = (row[j + 1] + 1).min(row[j] + 1).min(diag + usize::from(ca != *cb));
            diag = row[j + 1];
            row[j + 1] = next;
        }
    }
    row[b.len()]
}

/// Checks `value` against the type of `key`'s default. Integers are accepted for float keys
/// (`learning_rate = 1`). Err: what is wrong, naming the key.
fn check_type(key: &str, value: toml::Value, defaults: &toml::Table) -> Result<toml::Value, String> {
    use toml::Value as V;
    if key == "lr_schedule" {
        return match value {
            V::Table(_) => Ok(value),
            other => Err(format!("`lr_schedule` must be a table, got {}", type_name(&other))),
        };
    }
    let Some(default) = defaults.get(key) else {
        return Err(unknown_key(key, defaults));
    };
    match (default, value) {
        (V::Float(_), V::Integer(i)) => Ok(V::Float(i as f64)),
        (V::Integer(_), V::Integer(i)) if i < 0 => Err(format!("`{key}` = {i}: expected a non-negative integer")),
        (d, v) if std::mem::discriminant(d) == std::mem::discriminant(&v) => Ok(v),
        (d, v) => Err(format!("`{key}` = {v}: expected {}", type_name(d))),
    }
}

/// A `--set KEY=VALUE` value, typed by the key: string keys take the text as is (so
/// `out_dir=2024` is a directory name, `"quoted"` loses its quotes); other keys parse it as a
/// TOML value (numbers, booleans, inline tables).
fn override_value(key: &str, raw: &str, defaults: &toml::Table) -> Result<toml::Value, String> {
    let parsed = format!("v = {raw}").parse::<toml::Table>().ok().and_then(|mut t| t.remove("v"));
    if let Some(toml::Value::String(_)) = defaults.get(key) {
        return Ok(match parsed {
            Some(s @ toml::Value::String(_)) => s,
            _ => toml::Value::String(raw.to_string()),
        });
    }
    let value = parsed.unwrap_or_else(|| toml::Value::String(raw.to_string()));
    check_type(key, value, defaults)
}

impl TrainConfig {
    /// The ZeRO engine's settings, derived from this configuration on the resolved device and
    /// compute dtype.
    pub fn engine(&self, device: tch::Device, kind: tch::Kind) -> EngineConfig {
        EngineConfig {
            stage: self.zero_stage,
            grad_accum: self.gradient_accumulation_steps,
            grad_clip: self.grad_clip,
            activation_checkpointing: self.activation_checkpointing,
            kind,
            device,
            adamw: AdamWConfig {
                lr: self.learning_rate,
                betas: (self.beta1, self.beta2),
                eps: self.eps,
                weight_decay: self.weight_decay,
            },
            scaler: self.scaler(),
            profile: self.profile,
            offload_optimizer: self.offload_optimizer,
            offload_params: self.offload_param,
            pin_memory: self.pin_memory,
            prefetch_elems: self.stage3_prefetch_bucket_size as usize,
            persistence_threshold: self.stage3_param_persistence_threshold as usize,
        }
    }

    /// The loss scaler's settings: the keys this configuration shares by name with
    /// ScalerConfig (the same fields, kept flat here, see the struct), read through serde so that
    /// a field added to both is carried without being listed again. Training keeps going at the
    /// minimum scale, skipping overflowing steps, and says so (DeepSpeed would raise).
    pub fn scaler(&self) -> ScalerConfig {
        let table = toml::Table::try_from(self).expect("the configuration serializes to TOML");
        let scaler = ScalerConfig::deserialize(table).expect("the scaler keys have the scaler's types");
        ScalerConfig { raise_error_at_min_scale: false, ..scaler }
    }

    /// Loads `path` (TOML) or the defaults, then a DeepSpeed JSON config on top, then
    /// `KEY=VALUE` overrides, then validates.
    pub fn load(path: Option<&Path>, deepspeed: Option<&Path>, overrides: &[String]) -> Result<Self, ConfigError> {
        let defaults = default_table();
        let mut table = toml::Table::new();
        let mut embedded = None;
        if let Some(p) = path {
            let parse_err = |msg: String| ConfigError::Parse { path: p.into(), msg };
            let file = files::read(p)?;
            for (k, v) in file.table {
                let v = check_type(&k, v, &defaults).map_err(parse_err)?;
                table.insert(k, v);
            }
            embedded = file.deepspeed;
        }
        let ds = match (deepspeed, embedded) {
            (Some(p), Some((named, _))) => {
                return Err(ConfigError::Parse {
                    path: p.into(),
                    msg: format!("a second DeepSpeed config: {} already gives one", named.display()),
                })
            }
            (Some(p), None) => Some((p.to_path_buf(), files::deepspeed(p)?)),
            (None, embedded) => embedded,
        };
        if let Some((p, v)) = &ds {
            table.extend(from_deepspeed_value(p, v)?);
        }
        for o in overrides {
            let (k, v) = o.split_once('=').ok_or_else(|| ConfigError::Override(o.clone()))?;
            let (k, v) = (k.trim(), v.trim());
            let value =
                override_value(k, v, &defaults).map_err(|msg| ConfigError::BadOverride { arg: o.clone(), msg })?;
            table.insert(k.to_string(), value);
        }
        // As in DeepSpeed, a global batch with only one of its two factors given derives the
        // other: the defaults (batch_size 12, accumulation 1) must not contradict it.
        if table.get("train_batch_size").and_then(toml::Value::as_integer).is_some_and(|tb| tb > 0) {
            for k in ["batch_size", "gradient_accumulation_steps"] {
                table.entry(k).or_insert(toml::Value::Integer(0));
            }
        }
        let origin = path.or(deepspeed).map(Path::to_path_buf).unwrap_or_else(|| "(defaults)".into());
        // The schedule's rate parameters that DeepSpeed takes from the optimizer follow the
        // final learning_rate, --set included.
        let lr =
            table.get("learning_rate").and_then(toml::Value::as_float).unwrap_or(TrainConfig::default().learning_rate);
        if let Some(toml::Value::Table(sch)) = table.get_mut("lr_schedule") {
            complete_schedule(sch, lr).map_err(|msg| ConfigError::Parse { path: origin.clone(), msg })?;
        }
        let cfg: TrainConfig = toml::Value::Table(table)
            .try_into()
            .map_err(|e: toml::de::Error| ConfigError::Parse { path: origin, msg: e.message().to_string() })?;
        cfg.validate()?;
        Ok(cfg)
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |m: String| Err(ConfigError::Invalid(m));
        if !self.resume_from.is_empty() && self.init_from != "resume" {
            return bad(format!(
                "resume_from = {:?} needs init_from = \"resume\" (init_from is {:?}); `train --resume-from TAG` sets both",
                self.resume_from, self.init_from
            ));
        }
        // The device and dtype do not change which stages and offloads go together.
        self.engine(tch::Device::Cpu, tch::Kind::Float)
            .check()
            .map_err(|e| ConfigError::Invalid(format!("zero_stage = {}: {e}", self.zero_stage)))?;
        if (self.batch_size == 0 || self.gradient_accumulation_steps == 0) && self.train_batch_size == 0 {
            return bad("batch_size and gradient_accumulation_steps must be at least 1".into());
        }
        if self.block_size == 0 {
            return bad("block_size must be at least 1".into());
        }
        crate::device::attention_backend(&self.attention).map_err(ConfigError::Invalid)?;
        if !["auto", "fp32", "bf16", "fp16"].contains(&self.dtype.as_str()) {
            return bad(format!("dtype = {:?}: expected auto, fp32, bf16 or fp16", self.dtype));
        }
        if self.model == "custom" && self.n_embd % self.n_head.max(1) != 0 {
            return bad(format!("n_embd {} is not divisible by n_head {}", self.n_embd, self.n_head));
        }
        if self.eval_interval == 0 || self.log_interval == 0 {
            return bad("eval_interval and log_interval must be at least 1".into());
        }
        if let Some(s) = &self.lr_schedule {
            s.validate().map_err(|e| ConfigError::Invalid(format!("lr_schedule: {e}")))?;
        }
        Ok(())
    }

    /// Derives the one missing value of (batch_size, gradient_accumulation_steps) from
    /// train_batch_size and the world size, as DeepSpeed does, and rejects inconsistent triples.
    /// train_batch_size = 0 means "not set": the global batch is then batch_size x
    /// gradient_accumulation_steps x world.
    pub fn resolve_batch(&mut self, world: usize) -> Result<(), ConfigError> {
        let tb = self.train_batch_size;
        if tb == 0 {
            self.train_batch_size = self.batch_size * self.gradient_accumulation_steps * world;
            return Ok(());
        }
        let split = |by: usize, what: String| {
            if by == 0 || tb % by != 0 {
                Err(ConfigError::Invalid(format!("train_batch_size {tb} is not a multiple of {what}")))
            } else {
                Ok(tb / by)
            }
        };
        const MB: &str = "batch_size (DeepSpeed's train_micro_batch_size_per_gpu)";
        match (self.batch_size, self.gradient_accumulation_steps) {
            (0, 0) => {
                self.gradient_accumulation_steps = 1;
                self.batch_size = split(world, format!("the world size {world}"))?;
            }
            (0, ga) => {
                self.batch_size = split(ga * world, format!("gradient_accumulation_steps {ga} x world size {world}"))?
            }
            (mb, 0) => self.gradient_accumulation_steps = split(mb * world, format!("{MB} {mb} x world size {world}"))?,
            (mb, ga) => {
                if mb * ga * world != tb {
                    return Err(ConfigError::Invalid(format!(
                        "train_batch_size {tb} != {MB} {mb} x gradient_accumulation_steps {ga} x world size {world} \
                         (leave one of the three out, or set it to 0, to derive it)"
                    )));
                }
            }
        }
        // What is in effect, for the printed configuration and the manifest.
        self.train_batch_size = self.batch_size * self.gradient_accumulation_steps * world;
        Ok(())
    }

    /// The learning-rate schedule: `lr_schedule` when given (a DeepSpeed scheduler), else
    /// nanoGPT's warm-up and cosine decay (constant without decay_lr).
    pub fn lr_schedule(&self) -> LrSchedule {
        if let Some(s) = &self.lr_schedule {
            return s.clone();
        }
        LrSchedule::NanoGpt {
            warmup_iters: self.warmup_iters,
            lr_decay_iters: self.lr_decay_iters,
            max_lr: self.learning_rate,
            min_lr: self.min_lr,
            decay: if self.decay_lr { Decay::Cosine } else { Decay::Constant },
        }
    }

    /// The resolved configuration as TOML, printed at start and stored in checkpoints.
    pub fn to_toml(&self) -> String {
        toml::to_string(self).expect("the config serializes")
    }
}

/// The parameters of each DeepSpeed scheduler zerokit implements (their `__init__` keywords but
/// `last_batch_iteration`: a resumed run continues from its checkpoint's step).
fn schedule_params(ty: &str) -> Option<&'static [&'static str]> {
    Some(match ty {
        "WarmupLR" => &["warmup_min_lr", "warmup_max_lr", "warmup_num_steps", "warmup_type"],
        "WarmupDecayLR" => &["total_num_steps", "warmup_min_lr", "warmup_max_lr", "warmup_num_steps", "warmup_type"],
        "WarmupCosineLR" => {
            &["total_num_steps", "warmup_min_ratio", "warmup_num_steps", "cos_min_ratio", "warmup_type"]
        }
        _ => return None,
    })
}

/// Checks an `lr_schedule` table's keys and fills what it leaves out with DeepSpeed 0.19's
/// defaults (deepspeed/runtime/lr_schedules.py). WarmupLR peaks at, and WarmupCosineLR scales,
/// the optimizer's rate: `learning_rate`.
fn complete_schedule(sch: &mut toml::Table, learning_rate: f64) -> Result<(), String> {
    use toml::Value as V;
    let ty = match sch.get("type") {
        Some(V::String(s)) => s.clone(),
        _ => return Err("lr_schedule.type: expected \"WarmupLR\", \"WarmupDecayLR\" or \"WarmupCosineLR\"".into()),
    };
    let Some(known) = schedule_params(&ty) else {
        // NanoGpt written out (as to_toml prints it) is complete; serde checks it.
        return Ok(());
    };
    let unknown: Vec<&str> =
        sch.keys().map(String::as_str).filter(|k| *k != "type" && *k != "lr" && !known.contains(k)).collect();
    if !unknown.is_empty() {
        return Err(format!("lr_schedule ({ty}): unknown parameter(s) {}", unknown.join(", ")));
    }
    if ty != "WarmupCosineLR" && sch.contains_key("lr") {
        return Err(format!("lr_schedule ({ty}): unknown parameter(s) lr"));
    }
    let mut default = |k: &str, v: V| {
        sch.entry(k).or_insert(v);
    };
    default("warmup_num_steps", V::Integer(1000));
    default("warmup_type", V::String("log".into()));
    match ty.as_str() {
        "WarmupLR" => {
            default("warmup_min_lr", V::Float(0.0));
            default("warmup_max_lr", V::Float(learning_rate));
        }
        "WarmupDecayLR" => {
            default("warmup_min_lr", V::Float(0.0));
            default("warmup_max_lr", V::Float(0.001));
        }
        _ => {
            default("lr", V::Float(learning_rate));
            default("warmup_min_ratio", V::Float(0.0));
            default("cos_min_ratio", V::Float(0.0001));
        }
    }
    if ty != "WarmupLR" && !sch.contains_key("total_num_steps") {
        return Err(format!("lr_schedule ({ty}): total_num_steps is required"));
    }
    for (k, v) in sch.iter_mut() {
        // Rates written as integers (`"warmup_min_lr": 0`) are rates all the same.
        if let (V::Integer(i), false) = (&*v, matches!(k.as_str(), "warmup_num_steps" | "total_num_steps")) {
            *v = V::Float(*i as f64);
        }
    }
    Ok(())
}
