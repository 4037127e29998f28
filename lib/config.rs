//! The training configuration: one TOML file holding every knob (nanoGPT's names), overridable
//! with `--set key=value`, printed back resolved at start. Unknown keys are errors that name the
//! key. A DeepSpeed JSON config is translated into the same structure (`from_deepspeed_json`).

use crate::optim::{Decay, LrSchedule};
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
    pub eval_interval: u64,
    pub log_interval: u64,
    pub eval_iters: u64,
    /// Save at every evaluation, not only when val loss improves.
    pub always_save_checkpoint: bool,
    /// Stop after this many evaluations without improvement (0: never).
    pub patience: u64,
    /// Checkpoints kept besides the best one.
    pub keep_last: usize,
    // model
    /// "gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl" or "custom" (n_layer, n_head, n_embd).
    pub model: String,
    pub n_layer: usize,
    pub n_head: usize,
    pub n_embd: usize,
    pub block_size: usize,
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
    pub activation_checkpointing: bool,
    pub seed: u64,
    /// Seconds a rank waits for the others before the job is ended.
    pub comm_timeout: u64,
    // fp16 loss scaling (DeepSpeed's fp16 block)
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
            dataset: "out/shakespeare".into(),
            out_dir: "out/train".into(),
            init_from: "scratch".into(),
            eval_interval: 250,
            log_interval: 10,
            eval_iters: 20,
            always_save_checkpoint: false,
            patience: 0,
            keep_last: 2,
            model: "custom".into(),
            n_layer: 4,
            n_head: 4,
            n_embd: 128,
            block_size: 128,
            vocab_size: 50304,
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
            activation_checkpointing: false,
            seed: 1337,
            comm_timeout: 300,
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

/// Parses an override value as TOML (numbers, booleans, quoted strings), else as a bare string.
fn override_value(raw: &str) -> toml::Value {
    let doc = format!("v = {raw}");
    match doc.parse::<toml::Table>() {
        Ok(mut t) => t.remove("v").unwrap_or_else(|| toml::Value::String(raw.to_string())),
        Err(_) => toml::Value::String(raw.to_string()),
    }
}

impl TrainConfig {
    /// Loads `path` (TOML) or the defaults, then a DeepSpeed JSON config on top, then
    /// `KEY=VALUE` overrides, then validates.
    pub fn load(path: Option<&Path>, deepspeed: Option<&Path>, overrides: &[String]) -> Result<Self, ConfigError> {
        let read = |p: &Path| std::fs::read_to_string(p).map_err(|e| ConfigError::Io { path: p.into(), source: e });
        let mut table = match path {
            None => toml::Table::new(),
            Some(p) => read(p)?.parse::<toml::Table>().map_err(|e| ConfigError::Parse { path: p.into(), msg: e.to_string() })?,
        };
        // Where each key came from, so that a bad value or an unknown key is reported there.
        let mut origin: std::collections::HashMap<String, String> =
            table.keys().map(|k| (k.clone(), path.map_or(String::new(), |p| p.display().to_string()))).collect();
        if let Some(p) = deepspeed {
            let ds = from_deepspeed_json(p, &read(p)?)?;
            origin.extend(ds.keys().map(|k| (k.clone(), p.display().to_string())));
            table.extend(ds);
        }
        for o in overrides {
            let (k, v) = o.split_once('=').ok_or_else(|| ConfigError::Override(o.clone()))?;
            origin.insert(k.trim().to_string(), format!("--set {}", o.trim()));
            table.insert(k.trim().to_string(), override_value(v.trim()));
        }
        let table_lr = table.get("learning_rate").cloned();
        if let Some(toml::Value::Table(sch)) = table.get_mut("lr_schedule") {
            let lr = table_lr.clone().unwrap_or_else(|| TrainConfig::default().learning_rate.into());
            deepspeed_scheduler_defaults(sch, lr).map_err(|msg| ConfigError::Invalid(format!("{}: {msg}", origin.get("lr_schedule").cloned().unwrap_or_default())))?;
        }
        let cfg: TrainConfig = match toml::Value::Table(table.clone()).try_into() {
            Ok(c) => c,
            Err(e) => return Err(Self::blame(&table, &origin, e)),
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// Names the key (and the file or `--set` it came from) behind a deserialization error: each
    /// key is tried alone, on top of the defaults.
    fn blame(table: &toml::Table, origin: &std::collections::HashMap<String, String>, whole: toml::de::Error) -> ConfigError {
        for (k, v) in table {
            let one = toml::Table::from_iter([(k.clone(), v.clone())]);
            if let Err(e) = toml::Value::Table(one).try_into::<TrainConfig>() {
                let msg = e.message().replace("unknown field", "unknown key");
                let msg = if msg.contains(k.as_str()) { msg } else { format!("{k}: {msg}") };
                return match origin.get(k).filter(|o| !o.is_empty()) {
                    Some(o) => ConfigError::Invalid(format!("{o}: {msg}")),
                    None => ConfigError::Invalid(msg),
                };
            }
        }
        ConfigError::Invalid(whole.message().to_string())
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |m: String| Err(ConfigError::Invalid(m));
        if let Some(s) = &self.lr_schedule {
            s.validate().map_err(|e| ConfigError::Invalid(format!("lr_schedule: {e}")))?;
        }
        if self.zero_stage > 2 {
            return bad(format!("zero_stage = {}: zerokit implements stages 0, 1 and 2", self.zero_stage));
        }
        if (self.batch_size == 0 || self.gradient_accumulation_steps == 0) && self.train_batch_size == 0 {
            return bad("batch_size and gradient_accumulation_steps must be at least 1".into());
        }
        if self.block_size == 0 {
            return bad("block_size must be at least 1".into());
        }
        if !["auto", "fp32", "bf16", "fp16"].contains(&self.dtype.as_str()) {
            return bad(format!("dtype = {:?}: expected auto, fp32, bf16 or fp16", self.dtype));
        }
        if self.model == "custom" && self.n_embd % self.n_head.max(1) != 0 {
            return bad(format!("n_embd {} is not divisible by n_head {}", self.n_embd, self.n_head));
        }
        if self.eval_interval == 0 || self.log_interval == 0 {
            return bad("eval_interval and log_interval must be at least 1".into());
        }
        Ok(())
    }

    /// Derives the one missing value of (batch_size, gradient_accumulation_steps) from
    /// train_batch_size and the world size, as DeepSpeed does, and rejects inconsistent triples.
    pub fn resolve_batch(&mut self, world: usize) -> Result<(), ConfigError> {
        let tb = self.train_batch_size;
        if tb == 0 {
            return Ok(());
        }
        let div = |a: usize, b: usize, what: &str| {
            if b == 0 || a % b != 0 || a / b == 0 {
                Err(ConfigError::Invalid(format!("train_batch_size {tb} cannot be split into {what} on {world} rank(s)")))
            } else {
                Ok(a / b)
            }
        };
        match (self.batch_size, self.gradient_accumulation_steps) {
            (0, 0) => {
                self.gradient_accumulation_steps = 1;
                self.batch_size = div(tb, world, "micro-batches")?;
            }
            (0, ga) => self.batch_size = div(tb, ga * world, "micro-batches")?,
            (mb, 0) => self.gradient_accumulation_steps = div(tb, mb * world, "accumulation steps")?,
            (mb, ga) => {
                if mb * ga * world != tb {
                    return Err(ConfigError::Invalid(format!(
                        "train_batch_size {tb} != micro-batch {mb} x accumulation {ga} x world {world}"
                    )));
                }
            }
        }
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

/// Translates a DeepSpeed JSON config into zerokit keys. Keys zerokit does not honour are
/// reported by name.
/// Fills a DeepSpeed scheduler's missing parameters with DeepSpeed's own defaults (the keyword
/// defaults of deepspeed.runtime.lr_schedules, pinned by tests/config.rs against DeepSpeed):
/// `lr` is the optimizer's base rate, which WarmupLR also takes as its default maximum.
fn deepspeed_scheduler_defaults(sch: &mut toml::Table, lr: toml::Value) -> Result<(), String> {
    let ty = sch.get("type").and_then(|v| v.as_str()).unwrap_or("").to_string();
    let mut default = |k: &str, v: toml::Value| {
        sch.entry(k.to_string()).or_insert(v);
    };
    match ty.as_str() {
        "WarmupLR" => {
            default("warmup_min_lr", 0.0.into());
            default("warmup_max_lr", lr);
            default("warmup_num_steps", 1000.into());
            default("warmup_type", "log".into());
        }
        "WarmupDecayLR" => {
            default("warmup_min_lr", 0.0.into());
            default("warmup_max_lr", 0.001.into());
            default("warmup_num_steps", 1000.into());
            default("warmup_type", "log".into());
        }
        "WarmupCosineLR" => {
            default("lr", lr);
            default("warmup_min_ratio", 0.0.into());
            default("warmup_num_steps", 1000.into());
            default("cos_min_ratio", 0.0001.into());
            default("warmup_type", "log".into());
        }
        _ => return Ok(()),
    }
    if ty != "WarmupLR" && !sch.contains_key("total_num_steps") {
        return Err(format!("scheduler {ty}: params.total_num_steps is required (DeepSpeed has no default)"));
    }
    Ok(())
}

pub fn from_deepspeed_json(path: &Path, text: &str) -> Result<toml::Table, ConfigError> {
    use serde_json::Value;
    let err = |msg: String| ConfigError::Parse { path: path.into(), msg };
    let v: Value = serde_json::from_str(text).map_err(|e| err(e.to_string()))?;
    let obj = v.as_object().ok_or_else(|| err("expected a JSON object".into()))?;
    let mut t = toml::Table::new();
    let num = |v: &Value, key: &str| v.as_f64().ok_or_else(|| err(format!("{key}: expected a number")));
    let mut unknown = Vec::new();
    let (mut tbs, mut mbs, mut gas) = (None, None, None);
    for (k, val) in obj {
        match k.as_str() {
            "train_batch_size" => tbs = Some(num(val, k)? as usize),
            "train_micro_batch_size_per_gpu" => mbs = Some(num(val, k)? as usize),
            "gradient_accumulation_steps" => gas = Some(num(val, k)? as usize),
            "gradient_clipping" => {
                t.insert("grad_clip".into(), num(val, k)?.into());
            }
            "steps_per_print" => {
                t.insert("log_interval".into(), (num(val, k)? as i64).into());
            }
            "wall_clock_breakdown" | "zero_allow_untested_optimizer" => {} // reporting-only switches
            "zero_optimization" => {
                for (zk, zv) in val.as_object().ok_or_else(|| err("zero_optimization: expected an object".into()))? {
                    match zk.as_str() {
                        "stage" => {
                            t.insert("zero_stage".into(), (num(zv, "zero_optimization.stage")? as i64).into());
                        }
                        // Bucketing and overlap are how zerokit always works; sizes are per block.
                        "overlap_comm" | "contiguous_gradients" | "reduce_scatter" | "allgather_partitions"
                        | "reduce_bucket_size" | "allgather_bucket_size" => {}
                        other => unknown.push(format!("zero_optimization.{other}")),
                    }
                }
            }
            "fp16" => {
                let o = val.as_object().ok_or_else(|| err("fp16: expected an object".into()))?;
                if o.get("enabled").and_then(Value::as_bool).unwrap_or(false) {
                    t.insert("dtype".into(), "fp16".into());
                }
                for (fk, fv) in o {
                    let key = match fk.as_str() {
                        "enabled" | "auto_cast" => continue,
                        "loss_scale" => "loss_scale",
                        "initial_scale_power" => "initial_scale_power",
                        "loss_scale_window" => "loss_scale_window",
                        "hysteresis" => "hysteresis",
                        "min_loss_scale" => "min_loss_scale",
                        "consecutive_hysteresis" => {
                            t.insert("consecutive_hysteresis".into(), fv.as_bool().unwrap_or(false).into());
                            continue;
                        }
                        other => {
                            unknown.push(format!("fp16.{other}"));
                            continue;
                        }
                    };
                    let x = num(fv, fk)?;
                    let value = if key == "loss_scale" || key == "min_loss_scale" {
                        toml::Value::Float(x)
                    } else {
                        toml::Value::Integer(x as i64)
                    };
                    t.insert(key.into(), value);
                }
            }
            "bf16" => {
                if val.get("enabled").and_then(Value::as_bool).unwrap_or(false) {
                    t.insert("dtype".into(), "bf16".into());
                }
            }
            "optimizer" => {
                let ty = val.get("type").and_then(Value::as_str).unwrap_or("");
                if !matches!(ty.to_ascii_lowercase().as_str(), "adamw" | "adam") {
                    return Err(err(format!("optimizer.type {ty:?}: zerokit implements AdamW")));
                }
                if let Some(p) = val.get("params").and_then(Value::as_object) {
                    for (pk, pv) in p {
                        match pk.as_str() {
                            "lr" => {
                                t.insert("learning_rate".into(), num(pv, "optimizer.params.lr")?.into());
                            }
                            "betas" => {
                                let b = pv.as_array().filter(|a| a.len() == 2).ok_or_else(|| err("optimizer.params.betas: expected [b1, b2]".into()))?;
                                t.insert("beta1".into(), num(&b[0], "betas")?.into());
                                t.insert("beta2".into(), num(&b[1], "betas")?.into());
                            }
                            "eps" => {
                                t.insert("eps".into(), num(pv, "optimizer.params.eps")?.into());
                            }
                            "weight_decay" => {
                                t.insert("weight_decay".into(), num(pv, "optimizer.params.weight_decay")?.into());
                            }
                            "torch_adam" | "adam_w_mode" => {}
                            other => unknown.push(format!("optimizer.params.{other}")),
                        }
                    }
                }
            }
            "scheduler" => {
                // DeepSpeed's own parameter names, defaults and semantics (optim::LrSchedule).
                let ty = val.get("type").and_then(Value::as_str).unwrap_or("");
                if !["WarmupLR", "WarmupDecayLR", "WarmupCosineLR"].contains(&ty) {
                    return Err(err(format!("scheduler.type {ty:?}: zerokit implements WarmupLR, WarmupDecayLR and WarmupCosineLR")));
                }
                let mut p = val.get("params").and_then(Value::as_object).cloned().unwrap_or_default();
                p.insert("type".into(), Value::String(ty.into()));
                t.insert("lr_schedule".into(), json_to_toml(&Value::Object(p)).map_err(err)?);
            }
            other => unknown.push(other.to_string()),
        }
    }
    if !unknown.is_empty() {
        return Err(err(format!("keys zerokit does not honour: {}", unknown.join(", "))));
    }
    let enabled = |k: &str| obj.get(k).and_then(|b| b.get("enabled")).and_then(Value::as_bool).unwrap_or(false);
    if enabled("fp16") && enabled("bf16") {
        return Err(err("fp16 and bf16 are both enabled: choose one".into()));
    }
    // DeepSpeed's batch identity, train_batch_size = micro x accumulation x world, is resolved
    // once the world size is known (TrainConfig::resolve_batch); 0 marks the value to derive.
    if tbs.is_none() && mbs.is_none() {
        return Err(err("set train_batch_size or train_micro_batch_size_per_gpu".into()));
    }
    t.insert("train_batch_size".into(), (tbs.unwrap_or(0) as i64).into());
    t.insert("batch_size".into(), (mbs.unwrap_or(0) as i64).into());
    let default_gas = if tbs.is_some() { 0 } else { 1 };
    t.insert("gradient_accumulation_steps".into(), (gas.unwrap_or(default_gas) as i64).into());
    Ok(t)
}

/// JSON to TOML for scheduler parameters (nulls dropped, so serde defaults apply).
fn json_to_toml(v: &serde_json::Value) -> Result<toml::Value, String> {
    use serde_json::Value;
    Ok(match v {
        Value::Bool(b) => toml::Value::Boolean(*b),
        Value::Number(n) => match n.as_i64() {
            Some(i) => toml::Value::Integer(i),
            None => toml::Value::Float(n.as_f64().unwrap_or(f64::NAN)),
        },
        Value::String(s) => toml::Value::String(s.clone()),
        Value::Array(a) => toml::Value::Array(a.iter().map(json_to_toml).collect::<Result<_, _>>()?),
        Value::Object(o) => {
            let mut t = toml::Table::new();
            for (k, v) in o {
                if !v.is_null() {
                    t.insert(k.clone(), json_to_toml(v)?);
                }
            }
            toml::Value::Table(t)
        }
        Value::Null => return Err("null is not allowed here".into()),
    })
}
