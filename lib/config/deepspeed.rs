//! A DeepSpeed JSON config translated into zerokit's keys. The sections zerokit reads are serde
//! structs whose fields check their values as DeepSpeed does; every other key lands in its
//! section's `rest`, so that one error names every key zerokit does not honour.
//!
//! Errors name the key by its path in the config (`fp16.loss_scale = -1: ...`): a check says
//! what follows the key, serde_path_to_error says which key it was.

use super::{files, schedule_params, ConfigError};
use serde::de::{DeserializeOwned, Deserializer, Error as _, IgnoredAny};
use serde::Deserialize;
use serde_json::{Map, Value};
use std::collections::BTreeMap;
use std::marker::PhantomData;
use std::path::Path;
use toml::Value as T;

/// DeepSpeed's gradient_clipping when a config leaves it out (deepspeed/runtime/constants.py).
const DS_GRADIENT_CLIPPING: f64 = 1.0;

/// Translates a DeepSpeed JSON config into zerokit keys, with DeepSpeed's semantics: what
/// DeepSpeed always decides (precision, ZeRO stage, gradient clipping, loss scaling) is set
/// from the config or from DeepSpeed's defaults; an "optimizer" block sets every AdamW
/// hyper-parameter (DeepSpeed's optimizer defaults for those it leaves out); without one the
/// TOML's values play the client optimizer's part, as nanoGPT's own AdamW does under DeepSpeed.
/// Keys zerokit does not honour are reported by name, all at once.
pub fn from_deepspeed_json(path: &Path, text: &str) -> Result<toml::Table, ConfigError> {
    from_deepspeed_value(path, &files::parse_deepspeed(path, text)?)
}

/// A DeepSpeed config, already parsed, into zerokit's keys (see `from_deepspeed_json`).
pub fn from_deepspeed_value(path: &Path, v: &Value) -> Result<toml::Table, ConfigError> {
    let err = |msg: String| ConfigError::Parse { path: path.into(), msg };
    if !v.is_object() {
        return Err(err("expected a JSON object".into()));
    }
    // The first wrong value, in the order of the config's keys, is the error.
    let ds: DeepSpeed = section(v).map_err(|e| err(e.strip_prefix('.').unwrap_or(&e).to_string()))?;
    let unknown = ds.unhonoured();
    if !unknown.is_empty() {
        return Err(err(format!("keys zerokit does not honour: {}", unknown.join(", "))));
    }
    ds.into_table().map_err(err)
}

// ---------------------------------------------------------------------------------------------
// Values

/// How a value is checked. Err: what follows the key in the message (" = 8.5: expected ...").
trait Check {
    type Out;
    fn check(v: &Value) -> Result<Self::Out, String>;
}

/// A key's value when the config gives it, checked by `C`. Unlike `Option`, a JSON null is a
/// given value, refused by name as DeepSpeed refuses it, not taken for a key left out.
struct Given<C: Check>(Option<C::Out>);

impl<C: Check> Default for Given<C> {
    fn default() -> Self {
        Given(None)
    }
}

impl<'de, C: Check> Deserialize<'de> for Given<C> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let v = Value::deserialize(d)?;
        C::check(&v).map(|x| Given(Some(x))).map_err(D::Error::custom)
    }
}

fn expected(v: &Value, what: &str) -> String {
    format!(" = {v}: expected {what}")
}

/// A finite number.
enum Num {}
impl Check for Num {
    type Out = f64;
    fn check(v: &Value) -> Result<f64, String> {
        v.as_f64().filter(|x| x.is_finite()).ok_or_else(|| expected(v, "a number"))
    }
}

/// A finite number that is not negative.
enum NonNeg {}
impl Check for NonNeg {
    type Out = f64;
    fn check(v: &Value) -> Result<f64, String> {
        Some(Num::check(v)?).filter(|x| *x >= 0.0).ok_or_else(|| format!(" = {v}: must not be negative"))
    }
}

/// A whole number, not negative. DeepSpeed's arithmetic takes 8.0 as 8.
enum Count {}
impl Check for Count {
    type Out = i64;
    fn check(v: &Value) -> Result<i64, String> {
        match v.as_f64() {
            Some(x) if x >= 0.0 && x.fract() == 0.0 && x <= i64::MAX as f64 => Ok(x as i64),
            _ => Err(expected(v, "a non-negative integer")),
        }
    }
}

/// A batch factor. 0 and negatives are refused, as DeepSpeed refuses them; zerokit's 0 means
/// "derive this one".
enum Positive {}
impl Check for Positive {
    type Out = i64;
    fn check(v: &Value) -> Result<i64, String> {
        Count::check(v).ok().filter(|&n| n > 0).ok_or_else(|| expected(v, "a positive integer"))
    }
}

/// A scheduler's step count: DeepSpeed requires a Python int, so 8.0 is refused.
enum Steps {}
impl Check for Steps {
    type Out = i64;
    fn check(v: &Value) -> Result<i64, String> {
        match v.as_u64() {
            Some(n) if n <= i64::MAX as u64 => Ok(n as i64),
            _ => Err(expected(v, "a non-negative integer")),
        }
    }
}

enum Flag {}
impl Check for Flag {
    type Out = bool;
    fn check(v: &Value) -> Result<bool, String> {
        v.as_bool().ok_or_else(|| expected(v, "true or false"))
    }
}

/// A ZeRO stage zerokit implements.
enum Stage {}
impl Check for Stage {
    type Out = i64;
    fn check(v: &Value) -> Result<i64, String> {
        match Count::check(v)? {
            stage @ 0..=3 => Ok(stage),
            stage => Err(format!(" = {stage}: zerokit implements stages 0, 1, 2 and 3")),
        }
    }
}

enum WarmupType {}
impl Check for WarmupType {
    type Out = String;
    fn check(v: &Value) -> Result<String, String> {
        match v.as_str() {
            Some(w @ ("log" | "linear")) => Ok(w.into()),
            _ => Err(expected(v, "\"log\" or \"linear\"")),
        }
    }
}

/// Adam's [beta1, beta2].
enum Betas {}
impl Check for Betas {
    type Out = (f64, f64);
    fn check(v: &Value) -> Result<(f64, f64), String> {
        let b = v.as_array().filter(|a| a.len() == 2).ok_or(": expected [beta1, beta2]")?;
        Ok((Num::check(&b[0])?, Num::check(&b[1])?))
    }
}

/// An optimizer's or scheduler's "type". Any other value than a string names no type (""), which
/// the error for an unimplemented type then shows.
enum TypeName {}
impl Check for TypeName {
    type Out = String;
    fn check(v: &Value) -> Result<String, String> {
        Ok(v.as_str().unwrap_or_default().into())
    }
}

/// A string.
enum Text {}
impl Check for Text {
    type Out = String;
    fn check(v: &Value) -> Result<String, String> {
        v.as_str().map(String::from).ok_or_else(|| expected(v, "a string"))
    }
}

/// Any value, read once another key is known.
enum Any {}
impl Check for Any {
    type Out = Value;
    fn check(v: &Value) -> Result<Value, String> {
        Ok(v.clone())
    }
}

/// A section: an object whose keys `S` reads.
struct Section<S>(PhantomData<S>);
impl<S: DeserializeOwned> Check for Section<S> {
    type Out = S;
    fn check(v: &Value) -> Result<S, String> {
        section(v)
    }
}

/// `v` as the section `S`. Err: the path of the wrong key inside it (".loss_scale = -1: ...").
fn section<S: DeserializeOwned>(v: &Value) -> Result<S, String> {
    if !v.is_object() {
        return Err(": expected an object".into());
    }
    serde_path_to_error::deserialize(v).map_err(|e| {
        let path: String = e.path().iter().map(|key| format!(".{key}")).collect();
        format!("{path}{}", e.inner())
    })
}

// ---------------------------------------------------------------------------------------------
// Sections

/// The keys of a section that zerokit does not read, to be named.
type Rest = BTreeMap<String, Value>;

/// The top level of a DeepSpeed config.
#[derive(Deserialize, Default)]
#[serde(default)]
struct DeepSpeed {
    train_batch_size: Given<Positive>,
    train_micro_batch_size_per_gpu: Given<Positive>,
    gradient_accumulation_steps: Given<Positive>,
    gradient_clipping: Given<NonNeg>,
    steps_per_print: Given<Count>,
    // Switches for DeepSpeed's own reporting and optimizer check; checked, nothing to do.
    #[serde(rename = "wall_clock_breakdown")]
    _wall_clock_breakdown: Given<Flag>,
    #[serde(rename = "zero_allow_untested_optimizer")]
    _zero_allow_untested_optimizer: Given<Flag>,
    zero_optimization: Given<Section<Zero>>,
    fp16: Given<Section<Fp16>>,
    bf16: Given<Section<Bf16>>,
    /// DeepSpeed's older name for the bf16 block.
    bfloat16: Given<Section<Bf16>>,
    optimizer: Given<Optimizer>,
    scheduler: Given<Scheduler>,
    tensorboard: Given<Section<Tensorboard>>,
    #[serde(flatten)]
    rest: Rest,
}

/// DeepSpeed's TensorBoard monitor: event files under output_path/job_name.
#[derive(Deserialize, Default)]
#[serde(default)]
struct Tensorboard {
    enabled: Given<Flag>,
    output_path: Given<Text>,
    job_name: Given<Text>,
    #[serde(flatten)]
    rest: Rest,
}

impl Tensorboard {
    /// zerokit's tensorboard_dir, when enabled: output_path/job_name with DeepSpeed's default job
    /// name; an empty output_path is `tensorboard` under the working directory (DeepSpeed's
    /// falls back to a directory under the home directory named after a cluster job id).
    fn dir(self) -> Option<String> {
        if !self.enabled.0.unwrap_or(false) {
            return None;
        }
        let base = self.output_path.0.filter(|p| !p.is_empty()).unwrap_or_else(|| "tensorboard".into());
        let job = self.job_name.0.unwrap_or_else(|| "DeepSpeedJobName".into());
        Some(std::path::Path::new(&base).join(job).to_string_lossy().into_owned())
    }
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct Zero {
    stage: Given<Stage>,
    // Bucketing, overlap and reduce-scatter are how zerokit always works (its buckets are per
    // transformer block); none of them changes the numbers, so any value is accepted.
    #[serde(rename = "overlap_comm")]
    _overlap_comm: IgnoredAny,
    #[serde(rename = "contiguous_gradients")]
    _contiguous_gradients: IgnoredAny,
    #[serde(rename = "reduce_scatter")]
    _reduce_scatter: IgnoredAny,
    #[serde(rename = "allgather_partitions")]
    _allgather_partitions: IgnoredAny,
    #[serde(rename = "reduce_bucket_size")]
    _reduce_bucket_size: IgnoredAny,
    #[serde(rename = "allgather_bucket_size")]
    _allgather_bucket_size: IgnoredAny,
    offload_optimizer: Given<Section<Offload>>,
    offload_param: Given<Section<Offload>>,
    stage3_prefetch_bucket_size: Given<Count>,
    stage3_param_persistence_threshold: Given<Count>,
    // How many gathered parameters may stay live, and for how long: zerokit releases each
    // block's parameters after the block (keeping the next ones prefetched), which is within
    // any such limit; only the prefetch size and persistence threshold change what it holds.
    #[serde(rename = "stage3_max_live_parameters")]
    _stage3_max_live_parameters: IgnoredAny,
    #[serde(rename = "stage3_max_reuse_distance")]
    _stage3_max_reuse_distance: IgnoredAny,
    // zerokit's rank 0 always gathers the whole model into model.safetensors at a save, which
    // is what this key asks of DeepSpeed.
    #[serde(rename = "stage3_gather_16bit_weights_on_model_save")]
    _stage3_gather_16bit_weights_on_model_save: IgnoredAny,
    #[serde(flatten)]
    rest: Rest,
}

/// An offload_optimizer or offload_param block. Only the host ("cpu") is a target; "nvme" is
/// refused by name, as are NVMe's and the partial-offload keys (they stay in `rest`).
#[derive(Deserialize, Default)]
#[serde(default)]
struct Offload {
    device: Given<OffloadDevice>,
    pin_memory: Given<Flag>,
    #[serde(flatten)]
    rest: Rest,
}

enum OffloadDevice {}
impl Check for OffloadDevice {
    type Out = bool;
    fn check(v: &Value) -> Result<bool, String> {
        match v.as_str() {
            Some("cpu") => Ok(true),
            Some("none") => Ok(false),
            Some("nvme") => Err(" = \"nvme\": zerokit offloads to host memory only (\"cpu\")".into()),
            _ => Err(expected(v, "\"cpu\" or \"none\"")),
        }
    }
}

/// DeepSpeedFP16Config's keys, named as zerokit's own.
#[derive(Deserialize, Default)]
#[serde(default)]
struct Fp16 {
    enabled: Given<Flag>,
    /// Casts floating-point inputs of forward to fp16; GPT-2's are token ids. Checked, nothing
    /// to do.
    #[serde(rename = "auto_cast")]
    _auto_cast: Given<Flag>,
    loss_scale: Given<NonNeg>,
    min_loss_scale: Given<Num>,
    initial_scale_power: Given<Count>,
    loss_scale_window: Given<Count>,
    hysteresis: Given<Count>,
    consecutive_hysteresis: Given<Flag>,
    #[serde(flatten)]
    rest: Rest,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct Bf16 {
    enabled: Given<Flag>,
    #[serde(flatten)]
    rest: Rest,
}

/// An "optimizer" or "scheduler" section as written: its type decides what its params are, so
/// they are read once the type is known to be one zerokit implements.
#[derive(Deserialize, Default)]
#[serde(default)]
struct TypedSection {
    #[serde(rename = "type")]
    kind: Given<TypeName>,
    params: Given<Any>,
    #[serde(flatten)]
    rest: Rest,
}

/// The parameters of DeepSpeed's FusedAdam (torch.optim.AdamW with torch_adam).
#[derive(Deserialize, Default)]
#[serde(default)]
struct AdamParams {
    lr: Given<NonNeg>,
    betas: Given<Betas>,
    eps: Given<NonNeg>,
    weight_decay: Given<NonNeg>,
    torch_adam: Given<Flag>,
    adam_w_mode: Given<Flag>,
    #[serde(flatten)]
    rest: Rest,
}

/// An "optimizer" section of type AdamW.
struct Optimizer {
    params: AdamParams,
    rest: Rest,
}

impl Check for Optimizer {
    type Out = Optimizer;
    fn check(v: &Value) -> Result<Optimizer, String> {
        let s: TypedSection = section(v)?;
        let ty = s.kind.0.unwrap_or_default();
        if !matches!(ty.to_ascii_lowercase().as_str(), "adamw" | "adam") {
            return Err(format!(".type {ty:?}: zerokit implements AdamW (DeepSpeed's \"AdamW\" or \"Adam\")"));
        }
        let params: AdamParams = match &s.params.0 {
            Some(p) => section(p).map_err(|e| format!(".params{e}"))?,
            None => AdamParams::default(),
        };
        // DeepSpeed: "AdamW" is always decoupled; "Adam" unless adam_w_mode is false.
        if ty.eq_ignore_ascii_case("adam") && params.adam_w_mode.0 == Some(false) {
            return Err(": \"Adam\" with adam_w_mode = false is Adam with L2 regularisation; zerokit implements AdamW (decoupled weight decay)".into());
        }
        Ok(Optimizer { params, rest: s.rest })
    }
}

/// DeepSpeed's scheduler parameters that zerokit reads; which of them each scheduler type takes
/// is `schedule_params`'.
#[derive(Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
struct ScheduleParams {
    warmup_min_lr: Given<NonNeg>,
    warmup_max_lr: Given<NonNeg>,
    warmup_min_ratio: Given<NonNeg>,
    cos_min_ratio: Given<NonNeg>,
    warmup_num_steps: Given<Steps>,
    total_num_steps: Given<Steps>,
    warmup_type: Given<WarmupType>,
}

/// A "scheduler" section: a type zerokit implements and the parameters it takes. The
/// parameters the type does not take are named, not checked.
struct Scheduler {
    kind: String,
    params: ScheduleParams,
    not_taken: Vec<String>,
    rest: Rest,
}

impl Check for Scheduler {
    type Out = Scheduler;
    fn check(v: &Value) -> Result<Scheduler, String> {
        let s: TypedSection = section(v)?;
        let kind = s.kind.0.unwrap_or_default();
        let Some(known) = schedule_params(&kind) else {
            return Err(format!(".type {kind:?}: zerokit implements WarmupLR, WarmupDecayLR and WarmupCosineLR"));
        };
        let given: Map<String, Value> = match &s.params.0 {
            Some(p) => section(p).map_err(|e| format!(".params{e}"))?,
            None => Map::new(),
        };
        let (taken, not_taken): (Map<_, _>, Map<_, _>) =
            given.into_iter().partition(|(k, _)| known.contains(&k.as_str()));
        let params = section(&Value::Object(taken)).map_err(|e| format!(".params{e}"))?;
        Ok(Scheduler { kind, params, not_taken: not_taken.into_iter().map(|(k, _)| k).collect(), rest: s.rest })
    }
}

impl Scheduler {
    /// The `lr_schedule` table: the type and the parameters given (complete_schedule fills in
    /// the others once the final learning_rate is known).
    fn table(self) -> toml::Table {
        let p = self.params;
        let rates = [
            ("warmup_min_lr", p.warmup_min_lr),
            ("warmup_max_lr", p.warmup_max_lr),
            ("warmup_min_ratio", p.warmup_min_ratio),
            ("cos_min_ratio", p.cos_min_ratio),
        ];
        let steps = [("warmup_num_steps", p.warmup_num_steps), ("total_num_steps", p.total_num_steps)];
        let mut t = toml::Table::new();
        t.insert("type".into(), self.kind.into());
        t.extend(rates.into_iter().filter_map(|(k, v)| Some((k.to_string(), T::Float(v.0?)))));
        t.extend(steps.into_iter().filter_map(|(k, v)| Some((k.to_string(), T::Integer(v.0?)))));
        if let Some(w) = p.warmup_type.0 {
            t.insert("warmup_type".into(), w.into());
        }
        t
    }
}

// ---------------------------------------------------------------------------------------------
// Translation

impl DeepSpeed {
    /// Every key zerokit does not honour, dotted, in the order of the config's keys.
    fn unhonoured(&self) -> Vec<String> {
        let mut keys: Vec<Vec<String>> = Vec::new();
        for (k, v) in &self.rest {
            // A section zerokit does not know: name what it holds.
            match v.as_object() {
                Some(o) if !o.is_empty() => keys.extend(o.keys().map(|sub| vec![k.clone(), sub.clone()])),
                _ => keys.push(vec![k.clone()]),
            }
        }
        let rests = [
            ("zero_optimization", self.zero_optimization.0.as_ref().map(|s| &s.rest)),
            (
                "zero_optimization.offload_optimizer",
                self.zero_optimization.0.as_ref().and_then(|z| z.offload_optimizer.0.as_ref()).map(|s| &s.rest),
            ),
            (
                "zero_optimization.offload_param",
                self.zero_optimization.0.as_ref().and_then(|z| z.offload_param.0.as_ref()).map(|s| &s.rest),
            ),
            ("fp16", self.fp16.0.as_ref().map(|s| &s.rest)),
            ("bf16", self.bf16.0.as_ref().map(|s| &s.rest)),
            ("bfloat16", self.bfloat16.0.as_ref().map(|s| &s.rest)),
            ("optimizer", self.optimizer.0.as_ref().map(|s| &s.rest)),
            ("optimizer.params", self.optimizer.0.as_ref().map(|s| &s.params.rest)),
            ("scheduler", self.scheduler.0.as_ref().map(|s| &s.rest)),
            ("tensorboard", self.tensorboard.0.as_ref().map(|s| &s.rest)),
        ];
        for (section, rest) in rests {
            let path = section.split('.').map(String::from);
            keys.extend(rest.into_iter().flat_map(|r| r.keys()).map(|k| path.clone().chain([k.clone()]).collect()));
        }
        for k in self.scheduler.0.iter().flat_map(|s| &s.not_taken) {
            keys.push(vec!["scheduler".into(), "params".into(), k.clone()]);
        }
        // Key by key, as serde_json's (sorted) maps list them.
        keys.sort();
        keys.into_iter().map(|k| k.join(".")).collect()
    }

    /// zerokit's keys, with DeepSpeed's defaults for what the config leaves out. Err: what is
    /// wrong.
    fn into_table(self) -> Result<toml::Table, String> {
        let fp16 = self.fp16.0.unwrap_or_default();
        let fp16_on = fp16.enabled.0.unwrap_or(false);
        let enabled = |b: Given<Section<Bf16>>| b.0.and_then(|s| s.enabled.0).unwrap_or(false);
        let bf16_on = enabled(self.bf16) | enabled(self.bfloat16);
        if fp16_on && bf16_on {
            return Err("fp16.enabled and bf16.enabled are both true (DeepSpeed refuses this too): choose one".into());
        }
        // DeepSpeed's batch identity, train_batch_size = micro x accumulation x world, is
        // resolved once the world size is known (TrainConfig::resolve_batch); 0 marks the value
        // to derive.
        let (tbs, mbs) = (self.train_batch_size.0, self.train_micro_batch_size_per_gpu.0);
        if tbs.is_none() && mbs.is_none() {
            return Err("set train_batch_size or train_micro_batch_size_per_gpu (or both)".into());
        }
        let mut t = toml::Table::new();
        let mut set = |k: &str, v: T| t.insert(k.into(), v);
        set("train_batch_size", tbs.unwrap_or(0).into());
        set("batch_size", mbs.unwrap_or(0).into());
        let default_gas = if tbs.is_some() { 0 } else { 1 };
        set("gradient_accumulation_steps", self.gradient_accumulation_steps.0.unwrap_or(default_gas).into());
        set("grad_clip", self.gradient_clipping.0.unwrap_or(DS_GRADIENT_CLIPPING).into());
        if let Some(n) = self.steps_per_print.0 {
            set("log_interval", n.into());
        }
        let zero = self.zero_optimization.0.unwrap_or_default();
        set("zero_stage", zero.stage.0.unwrap_or(0).into());
        zero.offload(&mut set)?;
        // Without either block DeepSpeed trains in fp32.
        set(
            "dtype",
            (if fp16_on {
                "fp16"
            } else if bf16_on {
                "bf16"
            } else {
                "fp32"
            })
            .into(),
        );
        fp16.loss_scaling(&mut t);
        if let Some(o) = self.optimizer.0 {
            o.params.adamw(&mut t);
        }
        if let Some(s) = self.scheduler.0 {
            t.insert("lr_schedule".into(), T::Table(s.table()));
        }
        if let Some(dir) = self.tensorboard.0.and_then(Tensorboard::dir) {
            t.insert("tensorboard_dir".into(), dir.into());
        }
        Ok(t)
    }
}

impl Zero {
    /// The offload keys. DeepSpeed's pin_memory defaults to false in each block; zerokit has one
    /// switch for both, so two blocks that disagree are refused.
    fn offload(&self, set: &mut impl FnMut(&str, T) -> Option<T>) -> Result<(), String> {
        let block = |b: &Given<Section<Offload>>| b.0.as_ref().map(|o| (o.device.0.unwrap_or(false), o.pin_memory.0));
        let (opt, param) = (block(&self.offload_optimizer), block(&self.offload_param));
        let on = |b: Option<(bool, Option<bool>)>| b.is_some_and(|(d, _)| d);
        set("offload_optimizer", on(opt).into());
        set("offload_param", on(param).into());
        let pins: Vec<bool> =
            [opt, param].into_iter().flatten().filter(|(d, _)| *d).map(|(_, p)| p.unwrap_or(false)).collect();
        if pins.iter().any(|p| *p != pins[0]) {
            return Err("zero_optimization.offload_optimizer.pin_memory and offload_param.pin_memory differ: \
                        zerokit pins both or neither"
                .into());
        }
        if let Some(p) = pins.first() {
            set("pin_memory", (*p).into());
        }
        if let Some(n) = self.stage3_prefetch_bucket_size.0 {
            set("stage3_prefetch_bucket_size", n.into());
        }
        if let Some(n) = self.stage3_param_persistence_threshold.0 {
            set("stage3_param_persistence_threshold", n.into());
        }
        Ok(())
    }
}

impl Fp16 {
    /// The loss-scaling keys, with DeepSpeedFP16Config's defaults.
    fn loss_scaling(self, t: &mut toml::Table) {
        let mut set = |k: &str, v: T| t.insert(k.into(), v);
        set("loss_scale", self.loss_scale.0.unwrap_or(0.0).into());
        set("initial_scale_power", self.initial_scale_power.0.unwrap_or(16).into());
        set("loss_scale_window", self.loss_scale_window.0.unwrap_or(1000).into());
        set("hysteresis", self.hysteresis.0.unwrap_or(2).into());
        set("consecutive_hysteresis", self.consecutive_hysteresis.0.unwrap_or(false).into());
        set("min_loss_scale", self.min_loss_scale.0.unwrap_or(1.0).into());
    }
}

impl AdamParams {
    /// Every AdamW hyper-parameter, with DeepSpeed's FusedAdam defaults for those left out.
    fn adamw(self, t: &mut toml::Table) {
        let (beta1, beta2) = self.betas.0.unwrap_or((0.9, 0.999));
        let torch_adam = self.torch_adam.0.unwrap_or(false);
        let mut set = |k: &str, v: f64| t.insert(k.into(), v.into());
        set("learning_rate", self.lr.0.unwrap_or(1e-3));
        set("beta1", beta1);
        set("beta2", beta2);
        set("eps", self.eps.0.unwrap_or(1e-8));
        set("weight_decay", self.weight_decay.0.unwrap_or(if torch_adam { 0.01 } else { 0.0 }));
    }
}
