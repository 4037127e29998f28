//! DeepSpeed ZeRO checkpoints (stages 1, 2 and 3; fp16 and bf16) as a [`ShardedSource`].
//!
//! Layout, as DeepSpeed writes it into a tag directory:
//! - `mp_rank_00_model_states.pt` (stages 1-2) or `zero_pp_rank_{r}_mp_rank_00_model_states.pt`
//!   (stage 3, one per rank): `param_shapes` (one ordered name -> shape map per parameter group,
//!   in flat-buffer order), `buffer_names`, the `module` state dict (holding the buffers),
//!   `shared_params` (tied name -> owner name), and for stages 2-3 the frozen parameters
//!   (`frozen_param_shapes`, `frozen_param_fragments`: whole tensors in stage 2, each rank's
//!   partition in stage 3).
//! - `[bf16_]zero_pp_rank_{r}_mp_rank_00_optim_states.pt`: `optimizer_state_dict` with
//!   `zero_stage`, `partition_count`, and the fp32 master weights of rank r: per group
//!   `single_partition_of_fp32_groups` (stages 1-2) or `fp32_flat_groups` (stage 3).
//!
//! Stages 1-2 flatten each group (parameters in `param_shapes` order, optionally separated by
//! `param_alignment_paddings`), pad the group to a multiple of 2 x world size, and give rank r
//! the r-th equal slice; the saved slices have the trailing padding removed, so the ranks'
//! slices concatenated are the group's flat vector. Stage 3 instead partitions every parameter
//! separately: rank r holds elements [r*p, (r+1)*p) of each parameter, p = ceil(numel / world),
//! zero-padded at the end, and its flat groups are those pieces back to back.
//!
//! Adam's moments (`exp_avg`, `exp_avg_sq`) are the torch optimizer's state of each flat group
//! (`base_optimizer_state` at stages 1-2, the inner `optimizer_state_dict` at stage 3; per group
//! through the parameter id its param group lists, or by position in an elastic checkpoint's
//! list). They are partitioned exactly as the fp32 groups (at stages 1-2 the last rank's keep the
//! group's tail padding), so [`DeepSpeedSource::plan_moments`] cuts them into parameters with the
//! same walk as the master weights.
//!
//! Every tensor is planned as a list of byte ranges in the memory-mapped rank files, so reading
//! one parameter touches only its own bytes, and the Adam moments are never read unless asked for.

use crate::formats::dtype::DType;
use crate::formats::source::{ShardedSource, SourceError, TensorInfo};
use crate::formats::torch_pickle::{TensorRef, Value};
use crate::formats::torch_zip::{TorchError, TorchFile};
use rayon::prelude::*;
use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum DeepSpeedError {
    #[error(transparent)]
    Torch(#[from] TorchError),
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{0}: missing rank file {1} (the checkpoint was saved by {2} ranks)")]
    MissingRank(PathBuf, String, usize),
    #[error("{path}: {what}")]
    Layout { path: PathBuf, what: String },
    #[error("{0}: not a DeepSpeed checkpoint directory (no *_model_states.pt / *_optim_states.pt files)")]
    NotDeepSpeed(PathBuf),
}

fn layout(path: &Path, what: impl Into<String>) -> DeepSpeedError {
    DeepSpeedError::Layout { path: path.to_path_buf(), what: what.into() }
}

/// A trainable parameter cut from the flat tensors: name, shape, where its elements lie.
type CutParam = (String, Vec<u64>, Vec<Piece>);

/// A run of elements of one tensor inside one rank file.
#[derive(Debug, Clone)]
struct Piece {
    file: usize,
    tensor: TensorRef,
    /// Absolute byte offset in the file and byte length.
    start: u64,
    len: u64,
}

#[derive(Debug, Clone)]
struct Planned {
    info: TensorInfo,
    pieces: Vec<Piece>,
}

/// The per-parameter fp32 state a DeepSpeed checkpoint partitions: the master weights and
/// Adam's two moments, all cut the same way.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Field {
    Master,
    ExpAvg,
    ExpAvgSq,
}

impl Field {
    /// The key of the torch optimizer's state (`fp32` for the master weights, as DeepSpeed's
    /// universal checkpoints name it).
    pub fn key(self) -> &'static str {
        match self {
            Field::Master => "fp32",
            Field::ExpAvg => "exp_avg",
            Field::ExpAvgSq => "exp_avg_sq",
        }
    }
}

/// An opened DeepSpeed checkpoint: the rank files mapped, every output tensor planned.
pub struct DeepSpeedSource {
    dir: PathBuf,
    stage: u8,
    world_size: usize,
    bit16: &'static str,
    ds_version: Option<String>,
    files: Vec<TorchFile>,
    /// Index in `files` of the (first) model states file.
    model_base: usize,
    tensors: Vec<Planned>,
    by_name: HashMap<String, usize>,
    /// The trainable parameters, (name, shape) per group in flat order, and the stage 1-2
    /// alignment paddings between them: how every fp32 flat tensor is cut into parameters.
    groups: Vec<Vec<(String, Vec<u64>)>>,
    paddings: Option<Vec<Vec<u64>>>,
    /// The moments (exp_avg, exp_avg_sq) of each trainable parameter, once planned.
    moments: HashMap<String, [Vec<Piece>; 2]>,
}

/// What a DeepSpeed checkpoint records of training besides the partitioned tensors (the model
/// states file and rank 0's optimizer file), as saved; None where it is absent.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct TrainingRecord {
    /// `global_steps`: the engine's optimizer steps, skipped (overflowed) ones included.
    pub global_steps: Option<u64>,
    /// `global_samples`: sequences consumed.
    pub global_samples: Option<u64>,
    /// `skipped_steps`: steps skipped for fp16 overflow.
    pub skipped_steps: Option<u64>,
    /// Adam's `step` (the steps it applied, its bias correction's count): the optimizer state's
    /// per-group `step`, else the param group's (DeepSpeed's FusedAdam keeps it there), else
    /// `base_optimizer_state_step` (elastic checkpoints).
    pub adam_step: Option<u64>,
    /// `loss_scaler` (a LossScaler or DynamicLossScaler object).
    pub loss_scaler: Option<LossScalerRecord>,
    /// The torch optimizer's `param_groups`, one per flat group.
    pub param_groups: Vec<ParamGroupRecord>,
    /// Saved entries of the model states file that hold training state besides the model and the
    /// optimizer: `lr_scheduler`, `data_sampler`, `random_ltd` when not None, and every
    /// `client_state` key the training script passed to save_checkpoint.
    pub other_state: Vec<String>,
}

/// DeepSpeed's loss scaler as saved (deepspeed/runtime/fp16/loss_scaler.py's attributes).
#[derive(Debug, Clone, PartialEq)]
pub struct LossScalerRecord {
    pub cur_scale: f64,
    pub dynamic: bool,
    pub cur_iter: Option<i64>,
    pub last_overflow_iter: Option<i64>,
    pub cur_hysteresis: Option<i64>,
}

/// One of the torch optimizer's param groups as saved.
#[derive(Debug, Clone, PartialEq)]
pub struct ParamGroupRecord {
    pub lr: Option<f64>,
    pub betas: Option<(f64, f64)>,
    pub eps: Option<f64>,
    pub weight_decay: Option<f64>,
}

/// Keys DeepSpeed's engine writes into the model states file itself; any other key is the
/// training script's `client_state`.
const ENGINE_KEYS: &[&str] = &[
    "module",
    "buffer_names",
    "optimizer",
    "param_shapes",
    "frozen_param_shapes",
    "shared_params",
    "frozen_param_fragments",
    "lr_scheduler",
    "data_sampler",
    "random_ltd",
    "sparse_tensor_module_names",
    "skipped_steps",
    "global_steps",
    "global_samples",
    "dp_world_size",
    "mp_world_size",
    "checkpoint_parallel_dimensions",
    "ds_config",
    "ds_version",
    "universal_checkpoint_info",
];

/// Whether `dir` looks like a DeepSpeed tag directory.
pub fn is_deepspeed_dir(dir: &Path) -> bool {
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten().any(|e| {
                let n = e.file_name().to_string_lossy().into_owned();
                n.ends_with("_optim_states.pt") || n.ends_with("_model_states.pt")
            })
        })
        .unwrap_or(false)
}

/// A rank file name parsed: `[bf16_|fp16_]zero_pp_rank_{r}_mp_rank_{m}_{optim|model}_states.pt`.
fn parse_rank_name(name: &str, suffix: &str) -> Option<(String, usize, usize)> {
    let stem = name.strip_suffix(suffix)?;
    let at = stem.find("zero_pp_rank_")?;
    let prefix = stem[..at].to_string();
    let rest = &stem[at + "zero_pp_rank_".len()..];
    let (r, m) = rest.split_once("_mp_rank_")?;
    Some((prefix, r.parse().ok()?, m.parse().ok()?))
}

fn req<'a>(v: &'a Value, key: &str, path: &Path) -> Result<&'a Value, DeepSpeedError> {
    v.get(key).ok_or_else(|| layout(path, format!("has no '{key}' entry")))
}

/// Elements of a tensor of `shape`, which must be countable in 64 bits.
fn numel(shape: &[u64], path: &Path, name: &str) -> Result<u64, DeepSpeedError> {
    shape
        .iter()
        .try_fold(1u64, |a, &d| a.checked_mul(d))
        .ok_or_else(|| layout(path, format!("{name}: shape {shape:?} has more elements than 64 bits count")))
}

/// torch.save names the archive inside a file after the file (`<stem>/data.pkl`). A rank file
/// whose archive bears another rank file's name was renamed or swapped with it, and would put
/// that rank's partition in this one's place; a file written through a stream (`archive/`) says
/// nothing either way.
fn check_archive_name(f: &TorchFile) -> Result<(), DeepSpeedError> {
    let stem = f.path().file_stem().unwrap_or_default().to_string_lossy();
    let name = f.archive_name();
    if (name.ends_with("_optim_states") || name.ends_with("_model_states")) && name != stem {
        return Err(layout(
            f.path(),
            format!("holds the archive torch wrote as {name}.pt: the file was renamed, or swapped with another rank's"),
        ));
    }
    Ok(())
}

fn shapes_of(v: &Value, path: &Path, what: &str) -> Result<Vec<(String, Vec<u64>)>, DeepSpeedError> {
    let items = match v {
        Value::Dict(items) => items.as_slice(),
        _ => return Err(layout(path, format!("'{what}' is not a name -> shape map"))),
    };
    items
        .iter()
        .map(|(k, s)| match (k.as_str(), s.as_shape()) {
            (Some(k), Some(s)) => Ok((k.to_string(), s)),
            _ => Err(layout(path, format!("'{what}' has a malformed entry {k:?}"))),
        })
        .collect()
}

impl DeepSpeedSource {
    /// Opens the tag directory `dir` (holding the rank files).
    pub fn open(dir: &Path) -> Result<Self, DeepSpeedError> {
        let io = |e| DeepSpeedError::Io { path: dir.to_path_buf(), source: e };
        let mut optim: Vec<(String, usize, usize, PathBuf)> = vec![];
        let mut stage3_models: Vec<(usize, usize, PathBuf)> = vec![];
        let mut model_mp: Vec<PathBuf> = vec![];
        for e in std::fs::read_dir(dir).map_err(io)? {
            let e = e.map_err(io)?;
            let name = e.file_name().to_string_lossy().into_owned();
            if let Some((p, r, m)) = parse_rank_name(&name, "_optim_states.pt") {
                optim.push((p, r, m, e.path()));
            } else if let Some((_, r, m)) = parse_rank_name(&name, "_model_states.pt") {
                stage3_models.push((r, m, e.path()));
            } else if name.starts_with("mp_rank_") && name.ends_with("_model_states.pt") {
                model_mp.push(e.path());
            }
        }
        if optim.is_empty() {
            if model_mp.is_empty() && stage3_models.is_empty() {
                return Err(DeepSpeedError::NotDeepSpeed(dir.to_path_buf()));
            }
            return Err(layout(
                dir,
                "has model states but no *_optim_states.pt files: not a ZeRO checkpoint (or they are missing)",
            ));
        }
        if let Some((_, _, m, p)) = optim.iter().find(|o| o.2 != 0) {
            return Err(layout(
                p,
                format!("model-parallel rank {m}: tensor/pipeline-parallel checkpoints are not supported"),
            ));
        }
        let prefixes: HashSet<&str> = optim.iter().map(|o| o.0.as_str()).collect();
        if prefixes.len() > 1 {
            return Err(layout(
                dir,
                format!("mixes optimizer files of different kinds (prefixes {prefixes:?}): files from several runs?"),
            ));
        }
        let prefix = optim[0].0.clone();
        optim.sort_by_key(|o| o.1);

        let mut files: Vec<TorchFile> = vec![];
        // Rank 0's optimizer file says how many ranks there must be.
        let rank0_path = optim[0].3.clone();
        if optim[0].1 != 0 {
            let want = dir.join(format!("{prefix}zero_pp_rank_0_mp_rank_00_optim_states.pt"));
            return Err(DeepSpeedError::MissingRank(dir.to_path_buf(), want.display().to_string(), optim.len()));
        }
        let f0 = TorchFile::open(&rank0_path)?;
        check_archive_name(&f0)?;
        let osd0 = req(f0.root(), "optimizer_state_dict", &rank0_path)?;
        let stage = req(osd0, "zero_stage", &rank0_path)?
            .as_int()
            .ok_or_else(|| layout(&rank0_path, "'zero_stage' is not an integer"))?;
        if !(1..=3).contains(&stage) {
            return Err(layout(&rank0_path, format!("unknown ZeRO stage {stage}")));
        }
        let world = partition_count(osd0, &rank0_path)?;
        for r in 0..world {
            if !optim.iter().any(|o| o.1 == r) {
                let want = dir.join(format!("{prefix}zero_pp_rank_{r}_mp_rank_00_optim_states.pt"));
                return Err(DeepSpeedError::MissingRank(dir.to_path_buf(), want.display().to_string(), world));
            }
        }
        if let Some(extra) = optim.iter().find(|o| o.1 >= world) {
            return Err(layout(&extra.3, format!(
                "rank {} is beyond the world size {world} recorded in {}: mixed world sizes (files left from another run?)",
                extra.1,
                rank0_path.display()
            )));
        }
        let ds_version = f0.root().get("ds_version").and_then(Value::as_str).map(str::to_string);
        files.push(f0);
        for o in &optim[1..] {
            let f = TorchFile::open(&o.3)?;
            check_archive_name(&f)?;
            let osd = req(f.root(), "optimizer_state_dict", &o.3)?;
            let w = partition_count(osd, &o.3)?;
            let s = req(osd, "zero_stage", &o.3)?.as_int();
            if w != world || s != Some(stage) {
                return Err(layout(&o.3, format!(
                    "was saved with world size {w} and stage {s:?}, but {} with world size {world} and stage {stage}: mixed checkpoints",
                    rank0_path.display()
                )));
            }
            files.push(f);
        }
        let stage = stage as u8;

        // Model states: one file for stages 1-2, one per rank for stage 3.
        let model_paths: Vec<PathBuf> = if stage <= 2 {
            let p = dir.join("mp_rank_00_model_states.pt");
            if !p.exists() {
                return Err(DeepSpeedError::MissingRank(dir.to_path_buf(), p.display().to_string(), world));
            }
            vec![p]
        } else {
            (0..world)
                .map(|r| {
                    let p = dir.join(format!("zero_pp_rank_{r}_mp_rank_00_model_states.pt"));
                    if p.exists() {
                        Ok(p)
                    } else {
                        Err(DeepSpeedError::MissingRank(dir.to_path_buf(), p.display().to_string(), world))
                    }
                })
                .collect::<Result<_, _>>()?
        };
        let model_base = files.len();
        for p in &model_paths {
            let f = TorchFile::open(p)?;
            check_archive_name(&f)?;
            files.push(f);
        }
        let bit16 = if prefix.starts_with("bf16") { "bf16" } else { "fp16" };
        let mut src = DeepSpeedSource {
            dir: dir.to_path_buf(),
            stage,
            world_size: world,
            bit16,
            ds_version,
            files,
            model_base,
            tensors: vec![],
            by_name: HashMap::new(),
            groups: vec![],
            paddings: None,
            moments: HashMap::new(),
        };
        src.plan()?;
        Ok(src)
    }

    /// The tag directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The model states file the parameter shapes are read from (rank 0's at stage 3).
    pub fn model_states_path(&self) -> &Path {
        self.files[self.model_base].path()
    }

    /// Names of the buffers the model states file lists (`buffer_names`).
    pub fn buffer_names(&self) -> Vec<String> {
        self.files[self.model_base]
            .root()
            .get("buffer_names")
            .and_then(Value::as_seq)
            .unwrap_or(&[])
            .iter()
            .filter_map(|v| v.as_str().map(str::to_string))
            .collect()
    }

    /// `shared_params`: tied name -> the parameter it is stored as.
    pub fn shared_params(&self) -> Vec<(String, String)> {
        self.files[self.model_base]
            .root()
            .get("shared_params")
            .and_then(Value::dict_items)
            .unwrap_or(&[])
            .iter()
            .filter_map(|(k, v)| Some((k.as_str()?.to_string(), v.as_str()?.to_string())))
            .collect()
    }

    pub fn stage(&self) -> u8 {
        self.stage
    }

    pub fn world_size(&self) -> usize {
        self.world_size
    }

    /// A contiguous tensor of file `file` as a piece, elements [from, from+n).
    fn piece(&self, file: usize, t: &TensorRef, from: u64, n: u64) -> Result<Piece, DeepSpeedError> {
        let (start, len) = self.files[file].tensor_span(t)?;
        let es = t.dtype.size() as u64;
        if (from + n) * es > len {
            return Err(layout(
                self.files[file].path(),
                format!("tensor of {} elements is read past its end (elements {from}..{})", len / es, from + n),
            ));
        }
        Ok(Piece { file, tensor: t.clone(), start: start + from * es, len: n * es })
    }

    /// Takes `n` elements starting at `offset` of the concatenation `parts` (file, tensor).
    fn take_from(
        &self,
        parts: &[(usize, TensorRef)],
        mut offset: u64,
        mut n: u64,
        field: Field,
        out: &mut Vec<Piece>,
    ) -> Result<(), DeepSpeedError> {
        for (file, t) in parts {
            if n == 0 {
                break;
            }
            let len = t.numel();
            if offset >= len {
                offset -= len;
                continue;
            }
            let k = n.min(len - offset);
            out.push(self.piece(*file, t, offset, k)?);
            n -= k;
            offset = 0;
        }
        if n > 0 {
            return Err(layout(
                &self.dir,
                format!("the {} partitions are shorter than the parameter shapes require", field.key()),
            ));
        }
        Ok(())
    }

    fn push(
        &mut self,
        name: String,
        shape: Vec<u64>,
        dtype: DType,
        frozen: bool,
        pieces: Vec<Piece>,
    ) -> Result<(), DeepSpeedError> {
        if self.by_name.contains_key(&name) {
            return Err(layout(&self.dir, format!("tensor name {name} appears twice")));
        }
        let info = TensorInfo { name: name.clone(), shape: shape.iter().map(|&d| d as usize).collect(), dtype, frozen };
        self.by_name.insert(name, self.tensors.len());
        self.tensors.push(Planned { info, pieces });
        Ok(())
    }

    /// Plans every output tensor, in the order DeepSpeed's consolidation produces them:
    /// buffers, frozen parameters, trainable parameters, then tied names.
    fn plan(&mut self) -> Result<(), DeepSpeedError> {
        let (world, model_base) = (self.world_size, self.model_base);
        let mpath = self.files[model_base].path().to_path_buf();
        let model = self.files[model_base].root().clone();
        let buffer_names: Vec<String> = req(&model, "buffer_names", &mpath)?
            .as_seq()
            .ok_or_else(|| layout(&mpath, "'buffer_names' is not a list"))?
            .iter()
            .filter_map(|v| v.as_str().map(str::to_string))
            .collect();
        let module = req(&model, "module", &mpath)?;

        // Buffers: DeepSpeed restores floating ones to fp32.
        if let Some(items) = module.dict_items() {
            for (k, v) in items {
                let Some(name) = k.as_str() else { continue };
                if !buffer_names.iter().any(|b| b == name) {
                    continue;
                }
                let t = v.as_tensor().ok_or_else(|| layout(&mpath, format!("buffer {name} is not a tensor")))?;
                let piece = self.piece(model_base, t, 0, t.numel())?;
                let dtype = if t.dtype.is_float() { DType::F32 } else { t.dtype };
                self.push(name.to_string(), t.shape.clone(), dtype, false, vec![piece])?;
            }
        }

        // Frozen parameters (saved only by stages 2-3).
        let frozen_shapes = match model.get("frozen_param_shapes") {
            Some(v) if !v.is_none() => shapes_of(v, &mpath, "frozen_param_shapes")?,
            _ => vec![],
        };
        for (name, shape) in &frozen_shapes {
            let numel = numel(shape, &mpath, name)?;
            let mut parts = vec![];
            let nfiles = if self.stage == 3 { world } else { 1 };
            for r in 0..nfiles {
                let f = model_base + r;
                let fp = self.files[f].path().to_path_buf();
                let frag = self.files[f]
                    .root()
                    .get("frozen_param_fragments")
                    .and_then(|d| d.get(name))
                    .and_then(Value::as_tensor)
                    .cloned()
                    .ok_or_else(|| layout(&fp, format!("frozen parameter {name} has no fragment")))?;
                parts.push((f, frag));
            }
            let dtype = parts[0].1.dtype;
            if parts.iter().any(|p| p.1.dtype != dtype) {
                return Err(layout(&mpath, format!("frozen parameter {name} has fragments of different dtypes")));
            }
            let mut pieces = vec![];
            self.take_from(&parts, 0, numel, Field::Master, &mut pieces)?;
            self.push(name.clone(), shape.clone(), dtype, true, pieces)?;
        }

        // Trainable parameters from the fp32 flat groups of every rank.
        let groups_v = req(&model, "param_shapes", &mpath)?;
        self.groups = groups_v
            .as_seq()
            .ok_or_else(|| layout(&mpath, "'param_shapes' is not a list"))?
            .iter()
            .map(|g| shapes_of(g, &mpath, "param_shapes"))
            .collect::<Result<_, _>>()?;
        self.paddings = {
            let p0 = self.files[0].path().to_path_buf();
            let osd = req(self.files[0].root(), "optimizer_state_dict", &p0)?;
            match osd.get("param_alignment_paddings") {
                Some(v) if !v.is_none() => Some(
                    v.as_seq()
                        .and_then(|gs| gs.iter().map(|g| g.as_shape()).collect::<Option<Vec<_>>>())
                        .ok_or_else(|| layout(&p0, "malformed 'param_alignment_paddings'"))?,
                ),
                _ => None,
            }
        };
        let flat = self.flat_tensors(Field::Master)?;
        for (name, shape, pieces) in self.cut(&flat, Field::Master)? {
            self.push(name, shape, DType::F32, false, pieces)?;
        }

        // Tied parameters (lm_head.weight -> transformer.wte.weight): same values under both names.
        if let Some(items) = model.get("shared_params").and_then(Value::dict_items) {
            for (k, v) in items {
                if let (Some(alias), Some(owner)) = (k.as_str(), v.as_str()) {
                    if let Some(&i) = self.by_name.get(owner) {
                        let t = self.tensors[i].clone();
                        self.push(
                            alias.to_string(),
                            t.info.shape.iter().map(|&d| d as u64).collect(),
                            t.info.dtype,
                            t.info.frozen,
                            t.pieces,
                        )?;
                    }
                }
            }
        }
        Ok(())
    }

    /// Each rank's fp32 flat tensors of `field`, one per flat group (stage 3: sub-group).
    fn flat_tensors(&self, field: Field) -> Result<Vec<Vec<TensorRef>>, DeepSpeedError> {
        let key = if self.stage <= 2 { "single_partition_of_fp32_groups" } else { "fp32_flat_groups" };
        let mut flat: Vec<Vec<TensorRef>> = vec![];
        for r in 0..self.world_size {
            let p = self.files[r].path();
            let osd = req(self.files[r].root(), "optimizer_state_dict", p)?;
            let masters = req(osd, key, p)?.as_seq().ok_or_else(|| layout(p, format!("'{key}' is not a list")))?;
            let g = match field {
                Field::Master => masters
                    .iter()
                    .map(|t| t.as_tensor().cloned().ok_or_else(|| layout(p, format!("'{key}' holds a non-tensor"))))
                    .collect::<Result<Vec<_>, _>>()?,
                _ => {
                    let base = self.base_optimizer(r)?;
                    (0..masters.len())
                        .map(|gi| {
                            self.group_state(base, gi, p)?
                                .get(field.key())
                                .and_then(Value::as_tensor)
                                .cloned()
                                .ok_or_else(|| {
                                    layout(p, format!("group {gi}: the Adam state has no '{}' tensor", field.key()))
                                })
                        })
                        .collect::<Result<Vec<_>, _>>()?
                }
            };
            if let Some(t) = g.iter().find(|t| t.dtype != DType::F32) {
                return Err(layout(p, format!("{} stored as {:?}, not fp32", field.key(), t.dtype)));
            }
            if r > 0 && g.len() != flat[0].len() {
                return Err(layout(p, format!("has {} flat groups, rank 0 has {}", g.len(), flat[0].len())));
            }
            flat.push(g);
        }
        Ok(flat)
    }

    /// Rank r's torch optimizer state dict (`state`, `param_groups`), or at stages 1-2 with an
    /// elastic checkpoint the list of per-group states.
    fn base_optimizer(&self, r: usize) -> Result<&Value, DeepSpeedError> {
        let p = self.files[r].path();
        let osd = req(self.files[r].root(), "optimizer_state_dict", p)?;
        req(osd, if self.stage <= 2 { "base_optimizer_state" } else { "optimizer_state_dict" }, p)
    }

    /// The Adam state of flat group `gi`: by position in an elastic checkpoint's list, else the
    /// entry of `state` for the parameter id that param group `gi` lists (its one flat tensor).
    fn group_state<'a>(&self, base: &'a Value, gi: usize, path: &Path) -> Result<&'a Value, DeepSpeedError> {
        if let Some(list) = base.as_seq() {
            return list.get(gi).ok_or_else(|| layout(path, format!("no optimizer state for group {gi}")));
        }
        let id = base
            .get("param_groups")
            .and_then(Value::as_seq)
            .and_then(|g| g.get(gi))
            .and_then(|g| g.get("params"))
            .and_then(Value::as_seq)
            .and_then(|p| p.first())
            .and_then(Value::as_int)
            .ok_or_else(|| layout(path, format!("the optimizer's param group {gi} lists no parameter")))?;
        base.get("state")
            .and_then(Value::dict_items)
            .and_then(|items| items.iter().find(|(k, _)| k.as_int() == Some(id)))
            .map(|(_, v)| v)
            .ok_or_else(|| {
                layout(
                    path,
                    format!(
                        "the optimizer holds no Adam state for group {gi} (parameter {id}): saved before the first optimizer step?"
                    ),
                )
            })
    }

    /// Cuts each rank's flat tensors (`flat`, of `field`) into the trainable parameters:
    /// (name, shape, pieces), in flat order.
    fn cut(&self, flat: &[Vec<TensorRef>], field: Field) -> Result<Vec<CutParam>, DeepSpeedError> {
        let world = self.world_size;
        let mpath = self.model_states_path();
        let mut out = vec![];
        if self.stage <= 2 {
            if self.groups.len() != flat[0].len() {
                return Err(layout(
                    mpath,
                    format!(
                        "lists {} parameter groups but the optimizer files hold {}",
                        self.groups.len(),
                        flat[0].len()
                    ),
                ));
            }
            let align = 2 * world as u64;
            for (gi, shapes) in self.groups.iter().enumerate() {
                let parts: Vec<(usize, TensorRef)> = (0..world).map(|r| (r, flat[r][gi].clone())).collect();
                let avail = parts.iter().fold(0u64, |a, p| a.saturating_add(p.1.numel()));
                let pads = self.paddings.as_ref().and_then(|p| p.get(gi));
                if let Some(p) = pads {
                    if p.len() != shapes.len() {
                        return Err(layout(
                            self.files[0].path(),
                            format!("group {gi}: {} alignment paddings for {} parameters", p.len(), shapes.len()),
                        ));
                    }
                }
                let mut offset = 0u64;
                for (pi, (name, shape)) in shapes.iter().enumerate() {
                    let numel = numel(shape, mpath, name)?;
                    let mut pieces = vec![];
                    self.take_from(&parts, offset, numel, field, &mut pieces)?;
                    out.push((name.clone(), shape.clone(), pieces));
                    offset =
                        offset.checked_add(numel).and_then(|o| o.checked_add(pads.map_or(0, |p| p[pi]))).ok_or_else(
                            || layout(self.files[0].path(), format!("group {gi}: alignment paddings overflow")),
                        )?;
                }
                // The saved fp32 partitions drop the group's tail padding, which is below 2 x world
                // size (the moments keep it); anything else means the shapes and the flat groups
                // disagree.
                if offset.div_ceil(align) != avail.div_ceil(align) {
                    return Err(layout(&self.dir, format!(
                        "group {gi}: parameter shapes cover {offset} elements but the ranks hold {avail} of {}: param_shapes and optimizer files disagree",
                        field.key()
                    )));
                }
            }
        } else {
            let count = |g: &[TensorRef]| g.iter().fold(0u64, |a, t| a.saturating_add(t.numel()));
            let per_rank = count(&flat[0]);
            for (r, g) in flat.iter().enumerate() {
                let n = count(g);
                if n != per_rank {
                    return Err(layout(
                        self.files[r].path(),
                        format!("holds {n} {} elements, rank 0 holds {per_rank}", field.key()),
                    ));
                }
            }
            let mut offset = 0u64;
            for shapes in &self.groups {
                for (name, shape) in shapes {
                    let numel = numel(shape, mpath, name)?;
                    let part = numel.div_ceil(world as u64);
                    let mut pieces = vec![];
                    let mut left = numel;
                    for (r, g) in flat.iter().enumerate() {
                        if left == 0 {
                            break;
                        }
                        let parts: Vec<(usize, TensorRef)> = g.iter().map(|t| (r, t.clone())).collect();
                        let k = left.min(part);
                        self.take_from(&parts, offset, k, field, &mut pieces)?;
                        left -= k;
                    }
                    out.push((name.clone(), shape.clone(), pieces));
                    offset = offset.saturating_add(part);
                }
            }
            if offset != per_rank {
                return Err(layout(&self.dir, format!(
                    "parameter shapes cover {offset} elements per rank but each rank holds {per_rank} of {}: param_shapes and optimizer files disagree",
                    field.key()
                )));
            }
        }
        Ok(out)
    }

    /// Plans Adam's moments of every trainable parameter (read then with
    /// [`read_field`](Self::read_field)); zero-to-fp32 never needs them.
    pub fn plan_moments(&mut self) -> Result<(), DeepSpeedError> {
        let avg = self.flat_tensors(Field::ExpAvg)?;
        let sq = self.flat_tensors(Field::ExpAvgSq)?;
        let (avg, sq) = (self.cut(&avg, Field::ExpAvg)?, self.cut(&sq, Field::ExpAvgSq)?);
        self.moments = avg.into_iter().zip(sq).map(|((name, _, a), (_, _, b))| (name, [a, b])).collect();
        Ok(())
    }

    /// The pieces `field` of tensor `name` is read from.
    fn pieces_of(&self, field: Field, name: &str) -> Result<&[Piece], SourceError> {
        let planned = match field {
            Field::Master => self.by_name.get(name).map(|&i| self.tensors[i].pieces.as_slice()),
            Field::ExpAvg | Field::ExpAvgSq => {
                self.moments.get(name).map(|m| m[(field == Field::ExpAvgSq) as usize].as_slice())
            }
        };
        planned.ok_or_else(|| match field {
            Field::Master => format!("{}: no tensor named {name}", self.dir.display()).into(),
            _ => format!("{}: no {} of a tensor named {name}", self.dir.display(), field.key()).into(),
        })
    }

    /// Checks the CRC-32 of every storage that `field` of the tensors `names` is read from, once
    /// each, in parallel (rayon's current pool); the first damaged one in `names` order is reported.
    pub fn verify_fields(&self, fields: &[Field], names: &[&str]) -> Result<(), SourceError> {
        let mut seen = HashSet::new();
        let mut storages: Vec<(usize, &TensorRef)> = vec![];
        for &f in fields {
            for name in names {
                for p in self.pieces_of(f, name)? {
                    if seen.insert((p.file, p.tensor.storage_key.as_str())) {
                        storages.push((p.file, &p.tensor));
                    }
                }
            }
        }
        let results: Vec<Result<(), TorchError>> =
            storages.par_iter().map(|&(f, t)| self.files[f].verify_storage(t)).collect();
        results.into_iter().collect::<Result<(), _>>().map_err(Into::into)
    }

    /// Bytes [start, start + out.len()) of `field` of tensor `name` (the master weights of every
    /// tensor [`describe`](ShardedSource::describe) lists; the moments of the trainable ones, once
    /// [`plan_moments`](Self::plan_moments) ran), little-endian.
    pub fn read_field(&self, field: Field, name: &str, start: u64, out: &mut [u8]) -> Result<(), SourceError> {
        let end = start + out.len() as u64;
        // Pieces are consecutive runs of the tensor's bytes: copy the part of each that overlaps.
        let (mut at, mut filled) = (0u64, 0usize);
        for p in self.pieces_of(field, name)? {
            let (s, e) = (start.max(at), end.min(at + p.len));
            if s < e {
                let f = &self.files[p.file];
                let n = (e - s) as usize;
                out[filled..filled + n].copy_from_slice(f.bytes(p.start + s - at, e - s));
                f.release(p.start + s - at, e - s);
                filled += n;
            }
            at += p.len;
        }
        if filled != out.len() {
            return Err(format!(
                "{}: {} of {name}: bytes {start}..{end} lie beyond its {at} bytes",
                self.dir.display(),
                field.key()
            )
            .into());
        }
        Ok(())
    }

    /// The value of a one-element tensor of file `file` (Adam's `step`).
    fn scalar(&self, file: usize, t: &TensorRef) -> Result<f64, DeepSpeedError> {
        let f = &self.files[file];
        if t.numel() != 1 {
            return Err(layout(f.path(), format!("a scalar holds {} elements", t.numel())));
        }
        f.verify_storage(t)?;
        let (start, len) = f.tensor_span(t)?;
        let b = f.bytes(start, len);
        let v = match t.dtype {
            DType::F32 => b.try_into().map(|a| f32::from_le_bytes(a) as f64),
            DType::F64 => b.try_into().map(f64::from_le_bytes),
            DType::I64 => b.try_into().map(|a| i64::from_le_bytes(a) as f64),
            DType::I32 => b.try_into().map(|a| i32::from_le_bytes(a) as f64),
            d => return Err(layout(f.path(), format!("a scalar of dtype {d:?}"))),
        };
        v.map_err(|_| layout(f.path(), format!("a scalar of {len} bytes")))
    }

    /// Adam's step count on rank 0 (every rank steps together), the same in every group.
    fn adam_step(&self) -> Result<Option<u64>, DeepSpeedError> {
        let p = self.files[0].path();
        let base = self.base_optimizer(0)?;
        let osd = req(self.files[0].root(), "optimizer_state_dict", p)?;
        let groups = base.get("param_groups").and_then(Value::as_seq).unwrap_or(&[]);
        let n = if base.as_seq().is_some() { base.as_seq().map_or(0, <[Value]>::len) } else { groups.len() };
        let mut step: Option<u64> = None;
        for gi in 0..n {
            // A group without Adam state (saved before the first step) has no step to give.
            let in_state = match self.group_state(base, gi, p).ok().and_then(|st| st.get("step")) {
                Some(Value::Tensor(t)) => Some(self.scalar(0, t)?),
                Some(v) => v.as_f64(),
                None => None,
            };
            let Some(s) = in_state.or_else(|| groups.get(gi).and_then(|g| g.get("step")).and_then(Value::as_f64))
            else {
                continue;
            };
            if !(s >= 0.0 && s.fract() == 0.0 && s < 2f64.powi(53)) {
                return Err(layout(p, format!("group {gi}: Adam step {s} is not a step count")));
            }
            match step {
                Some(prev) if prev != s as u64 => {
                    return Err(layout(p, format!("Adam's step differs between groups ({prev} and {s})")))
                }
                _ => step = Some(s as u64),
            }
        }
        Ok(step.or_else(|| osd.get("base_optimizer_state_step").and_then(Value::as_int).map(|s| s as u64)))
    }

    /// What the checkpoint records of training besides the tensors (see [`TrainingRecord`]).
    pub fn record(&self) -> Result<TrainingRecord, DeepSpeedError> {
        let model = self.files[self.model_base].root();
        let count = |key: &str| model.get(key).and_then(Value::as_int).and_then(|v| u64::try_from(v).ok());
        let osd = req(self.files[0].root(), "optimizer_state_dict", self.files[0].path())?;
        let loss_scaler = osd.get("loss_scaler").and_then(|s| {
            let int = |k: &str| s.attr(k).and_then(Value::as_int);
            Some(LossScalerRecord {
                cur_scale: s.attr("cur_scale")?.as_f64()?,
                dynamic: s.attr("dynamic").and_then(Value::as_int).is_some_and(|d| d != 0),
                cur_iter: int("cur_iter"),
                last_overflow_iter: int("last_overflow_iter"),
                cur_hysteresis: int("cur_hysteresis"),
            })
        });
        let base = self.base_optimizer(0).ok();
        let param_groups = base
            .and_then(|b| b.get("param_groups"))
            .and_then(Value::as_seq)
            .unwrap_or(&[])
            .iter()
            .map(|g| {
                let num = |k: &str| g.get(k).and_then(Value::as_f64);
                let betas = g.get("betas").and_then(Value::as_seq).and_then(|b| match b {
                    [b1, b2] => Some((b1.as_f64()?, b2.as_f64()?)),
                    _ => None,
                });
                ParamGroupRecord { lr: num("lr"), betas, eps: num("eps"), weight_decay: num("weight_decay") }
            })
            .collect();
        let mut other_state: Vec<String> = ["lr_scheduler", "data_sampler", "random_ltd"]
            .into_iter()
            .filter(|k| model.get(k).is_some_and(|v| !v.is_none()))
            .map(str::to_string)
            .collect();
        other_state.extend(
            model
                .dict_items()
                .unwrap_or(&[])
                .iter()
                .filter_map(|(k, _)| k.as_str())
                .filter(|k| !ENGINE_KEYS.contains(k))
                .map(|k| format!("client_state['{k}']")),
        );
        Ok(TrainingRecord {
            global_steps: count("global_steps"),
            global_samples: count("global_samples"),
            skipped_steps: count("skipped_steps"),
            adam_step: self.adam_step()?,
            loss_scaler,
            param_groups,
            other_state,
        })
    }
}

fn partition_count(osd: &Value, path: &Path) -> Result<usize, DeepSpeedError> {
    let v = req(osd, "partition_count", path)?;
    // A list (one per group, e.g. with MoE) means the largest is the data-parallel world size.
    let n = match v.as_seq() {
        Some(items) => items.iter().filter_map(Value::as_int).max(),
        None => v.as_int(),
    };
    match n {
        Some(n) if n >= 1 => Ok(n as usize),
        _ => Err(layout(path, "malformed 'partition_count'")),
    }
}

impl ShardedSource for DeepSpeedSource {
    fn format(&self) -> String {
        format!(
            "DeepSpeed ZeRO-{} checkpoint, {} ranks, {}{}",
            self.stage,
            self.world_size,
            self.bit16,
            self.ds_version.as_ref().map(|v| format!(", saved by deepspeed {v}")).unwrap_or_default()
        )
    }

    fn describe(&self) -> Vec<TensorInfo> {
        self.tensors.iter().map(|t| t.info.clone()).collect()
    }

    fn prepare(&self) -> Result<(), SourceError> {
        // Every storage a tensor is read from, once, checked against the CRC-32 in its zip
        // (the Adam moments, never read, are not checked).
        let mut seen = HashSet::new();
        let storages: Vec<(usize, &TensorRef)> = self
            .tensors
            .iter()
            .flat_map(|t| &t.pieces)
            .filter(|p| seen.insert((p.file, p.tensor.storage_key.as_str())))
            .map(|p| (p.file, &p.tensor))
            .collect();
        // Collected in order, so the error reported is the first storage's whichever thread
        // finished first.
        let results: Vec<Result<(), TorchError>> =
            storages.par_iter().map(|&(f, t)| self.files[f].verify_storage(t)).collect();
        results.into_iter().collect::<Result<(), _>>().map_err(Into::into)
    }

    fn read_range(&self, name: &str, start: u64, out: &mut [u8]) -> Result<(), SourceError> {
        self.read_field(Field::Master, name, start, out)
    }

    fn hf_config(&self, _dtype: DType) -> Option<serde_json::Value> {
        None
    }

    fn verify(&self) -> Result<(), SourceError> {
        // `prepare` checks every storage that is read against its zip CRC-32.
        Ok(())
    }
}
