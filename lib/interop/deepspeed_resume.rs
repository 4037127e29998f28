//! Continuing a DeepSpeed ZeRO run in zerokit: a DeepSpeed checkpoint (stages 1-3, fp16 or
//! bf16, any world size) read as the engine's state for zerokit's own layout, stage and world
//! size, through the same reader zero-to-fp32 uses ([`DeepSpeedSource`]).
//!
//! What maps where (docs/checkpoint-format.md lists it too):
//! - names: DeepSpeed's parameter names go through GPT-2's key mapping for Hugging Face
//!   directories ([`hf::GPT2`]: `transformer.` optional, a tied `lm_head.weight` is wte); the
//!   layouts are transformers' (Conv1D [in, out]), checked shape by shape.
//! - master weights: the fp32 partitions (`single_partition_of_fp32_groups` /
//!   `fp32_flat_groups`); exp_avg, exp_avg_sq: the torch optimizer's state of the same flat
//!   groups. Re-partitioned element by element into this rank's partition of zerokit's layout.
//! - step: `global_steps` is the run's step; Adam's `step` its optimizer step (fewer when fp16
//!   overflows skipped steps).
//! - loss scale: the `loss_scaler` object's `cur_scale`, `cur_iter`, `last_overflow_iter`,
//!   `cur_hysteresis`, when both runs use dynamic fp16 scaling.
//!
//! Everything else a DeepSpeed run carries (its data position, learning-rate scheduler, RNG
//! states, client state) is listed by [`DeepSpeedResume::not_carried_over`], which `train` logs.

use super::deepspeed::{DeepSpeedError, DeepSpeedSource, Field, TrainingRecord};
use super::hf::{self, Key};
use crate::formats::dtype::{cast, DType};
use crate::formats::source::{units, ShardedSource, SourceError, TensorInfo};
use crate::model::gpt2::{GptConfig, WPE, WTE};
use crate::model::ParamSpec;
use crate::scaler::ScalerState;
use crate::zero::layout::FlatLayout;
use crate::zero::state::PartitionState;
use crate::zero::EngineConfig;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use tch::{Kind, Tensor};

#[derive(Debug, thiserror::Error)]
pub enum DeepSpeedResumeError {
    #[error(transparent)]
    DeepSpeed(#[from] DeepSpeedError),
    #[error("{0}")]
    Read(SourceError),
    /// The checkpoint's model is not the run's: the file the shapes come from, and what differs.
    #[error("{path}: {what}")]
    Model { path: PathBuf, what: String },
}

/// A DeepSpeed checkpoint opened to resume from: its tensors, moments included, and what it
/// records of training.
pub struct DeepSpeedResume {
    src: DeepSpeedSource,
    record: TrainingRecord,
    /// zerokit parameter name -> the checkpoint's tensor, once checked against the run's model.
    names: HashMap<String, TensorInfo>,
    /// What the checkpoint holds that the model has no place for (buffers).
    dropped: Vec<String>,
}

impl DeepSpeedResume {
    /// Opens the tag directory `dir` and plans the moments of every trainable tensor.
    pub fn open(dir: &Path) -> Result<Self, DeepSpeedResumeError> {
        let mut src = DeepSpeedSource::open(dir)?;
        src.plan_moments()?;
        let record = src.record()?;
        Ok(DeepSpeedResume { src, record, names: HashMap::new(), dropped: vec![] })
    }

    pub fn dir(&self) -> &Path {
        self.src.dir()
    }

    /// One line for the log: what was saved, by which DeepSpeed, at which step.
    pub fn describe(&self) -> String {
        format!("{}, at step {}", self.src.format(), self.step())
    }

    pub fn record(&self) -> &TrainingRecord {
        &self.record
    }

    /// The run's step: `global_steps`, else Adam's step plus the skipped steps.
    pub fn step(&self) -> u64 {
        let r = &self.record;
        r.global_steps.or_else(|| Some(r.adam_step? + r.skipped_steps.unwrap_or(0))).unwrap_or(0)
    }

    /// Adam's step: its own count, else the run's steps less the skipped ones.
    pub fn optimizer_step(&self) -> u64 {
        let r = &self.record;
        r.adam_step.unwrap_or_else(|| self.step().saturating_sub(r.skipped_steps.unwrap_or(0)))
    }

    /// The checkpoint's trainable and frozen parameters by zerokit name, buffers and tied
    /// aliases set aside.
    fn parameters(&self) -> Result<Vec<(String, TensorInfo)>, DeepSpeedResumeError> {
        let buffers = self.src.buffer_names();
        let shared = self.src.shared_params();
        let mut out = vec![];
        for t in self.src.describe() {
            if buffers.contains(&t.name) {
                continue;
            }
            if let Some((_, owner)) = shared.iter().find(|(alias, _)| *alias == t.name) {
                // A tied alias (lm_head.weight of wte) reads the owner's bytes: zerokit ties the
                // same pair, so the alias is the owner. Another tie is one the model lacks.
                let tied = matches!((hf::GPT2.classify)(owner), Key::Param(o) if o == WTE)
                    && matches!((hf::GPT2.classify)(&t.name), Key::Param(a) if a == hf::GPT2.tied.0);
                if tied {
                    continue;
                }
                return Err(
                    self.model_err(format!("{} is tied to {owner}, a tie zerokit's GPT-2 does not have", t.name))
                );
            }
            match (hf::GPT2.classify)(&t.name) {
                Key::Buffer => {}
                Key::Param(name) => out.push((name, t)),
            }
        }
        Ok(out)
    }

    fn model_err(&self, what: String) -> DeepSpeedResumeError {
        DeepSpeedResumeError::Model { path: self.src.model_states_path().to_path_buf(), what }
    }

    /// The model shape to build: `base`'s layers, heads and width (the run's configuration; the
    /// checkpoint cannot say how many heads), with the position and vocabulary sizes of the
    /// checkpoint's wpe and wte, as a Hugging Face config.json would give them.
    pub fn model_config(&self, base: GptConfig) -> Result<GptConfig, DeepSpeedResumeError> {
        let params = self.parameters()?;
        let rows = |want: &str| {
            params
                .iter()
                .find(|(n, _)| n == want)
                .and_then(|(_, t)| (t.shape.len() == 2).then_some(t.shape[0]))
                .ok_or_else(|| self.model_err(format!("no 2-dimensional {want}: not a GPT-2 checkpoint")))
        };
        Ok(GptConfig { block_size: rows(WPE)?, vocab_size: rows(WTE)?, ..base })
    }

    /// Checks the checkpoint's parameters against the run's model, `specs`: the same names (after
    /// the mapping) with the same shapes, nothing missing and nothing left over; an `lm_head`
    /// trained apart from wte is refused (zerokit's GPT-2 ties them).
    pub fn check(&mut self, specs: &[ParamSpec]) -> Result<(), DeepSpeedResumeError> {
        let params = self.parameters()?;
        let wanted: HashMap<&str, &ParamSpec> = specs.iter().map(|s| (s.name.as_str(), s)).collect();
        let mut names = HashMap::new();
        for (name, t) in params {
            let Some(spec) = wanted.get(name.as_str()) else {
                let what = if name == hf::GPT2.tied.0 {
                    format!("{} is trained apart from {WTE}; {}", t.name, hf::GPT2.untied_why)
                } else {
                    format!("tensor {} is not a parameter of this run's model (n_layer, n_embd?)", t.name)
                };
                return Err(self.model_err(what));
            };
            if t.shape.len() != spec.shape.len() || t.shape.iter().zip(&spec.shape).any(|(&a, &b)| a as i64 != b) {
                let transposed =
                    t.shape.len() == 2 && t.shape[0] as i64 == spec.shape[1] && t.shape[1] as i64 == spec.shape[0];
                return Err(self.model_err(format!(
                    "tensor {} has shape {:?}, this run's model has {:?}{}",
                    t.name,
                    t.shape,
                    spec.shape,
                    if transposed { hf::GPT2.transposed_hint } else { "" }
                )));
            }
            names.insert(name, t);
        }
        if let Some(s) = specs.iter().find(|s| !names.contains_key(&s.name)) {
            return Err(self.model_err(format!("holds no tensor for this run's parameter {}", s.name)));
        }
        let buffers = self.src.buffer_names();
        self.dropped = buffers;
        self.names = names;
        Ok(())
    }

    /// This rank's partition `part` of `layout` (fp32, on `device`): master weights and moments
    /// read from wherever DeepSpeed's ranks keep them, after the CRC-32 of every storage read
    /// is checked. Frozen parameters (trained in zerokit) take their 16-bit weights and zero
    /// moments. The loss scaler's state is given when `engine` scales fp16 dynamically and the
    /// checkpoint did too. Needs [`check`](Self::check) first.
    pub fn load_partition(
        &self,
        layout: &FlatLayout,
        part: usize,
        engine: &EngineConfig,
        heartbeat: &mut dyn FnMut(),
    ) -> Result<PartitionState, DeepSpeedResumeError> {
        let pieces = layout.pieces(part);
        let info = |param: usize| {
            let name = &layout.params[param].name;
            self.names.get(name).ok_or_else(|| self.model_err(format!("holds no tensor for parameter {name}")))
        };
        let mut trained: Vec<&str> = vec![];
        let mut frozen: Vec<&str> = vec![];
        for p in &pieces {
            let t = info(p.param)?;
            let list = if t.frozen { &mut frozen } else { &mut trained };
            if !list.contains(&t.name.as_str()) {
                list.push(&t.name);
            }
        }
        let read_err = DeepSpeedResumeError::Read;
        self.src.verify_fields(&[Field::Master, Field::ExpAvg, Field::ExpAvgSq], &trained).map_err(read_err)?;
        self.src.verify_fields(&[Field::Master], &frozen).map_err(read_err)?;
        heartbeat();

        let mut out = [vec![0f32; layout.partition], vec![0f32; layout.partition], vec![0f32; layout.partition]];
        let (mut raw, mut f32s) = (vec![], vec![]);
        for p in &pieces {
            let t = info(p.param)?;
            for (k, field) in [Field::Master, Field::ExpAvg, Field::ExpAvgSq].into_iter().enumerate() {
                if t.frozen && field != Field::Master {
                    continue;
                }
                let dtype = if field == Field::Master { t.dtype } else { DType::F32 };
                let es = dtype.size() as u64;
                // In units, so the buffers stay small whatever the parameter's size.
                for (e0, n) in units(p.len as u64) {
                    raw.resize((n * es) as usize, 0u8);
                    let at = (p.param_offset as u64 + e0) * es;
                    self.src.read_field(field, &t.name, at, &mut raw).map_err(read_err)?;
                    cast(&raw, dtype, DType::F32, &mut f32s);
                    let from = p.partition_offset + e0 as usize;
                    for (d, c) in out[k][from..from + n as usize].iter_mut().zip(f32s.chunks_exact(4)) {
                        *d = f32::from_le_bytes(c.try_into().expect("4 bytes"));
                    }
                }
            }
            heartbeat();
        }
        let device = engine.device;
        let [master, exp_avg, exp_avg_sq] = out.map(|v| Tensor::from_slice(&v).to_device(device));
        Ok(PartitionState {
            master,
            exp_avg,
            exp_avg_sq,
            optimizer_step: self.optimizer_step(),
            scaler: self.scaler(engine),
        })
    }

    /// DeepSpeed's dynamic loss scaler as zerokit's, when the run scales fp16 dynamically too.
    fn scaler(&self, engine: &EngineConfig) -> Option<ScalerState> {
        let s = self.record.loss_scaler.as_ref()?;
        if engine.kind != Kind::Half || !engine.scaler.is_dynamic() || !s.dynamic {
            return None;
        }
        Some(ScalerState {
            cur_scale: s.cur_scale,
            cur_iter: u64::try_from(s.cur_iter?).ok()?,
            last_overflow_iter: s.last_overflow_iter?,
            cur_hysteresis: u32::try_from(s.cur_hysteresis?).ok()?,
        })
    }

    /// What the run continues without, one sentence each, for the log: everything the checkpoint
    /// holds or the DeepSpeed run depended on that zerokit does not take from it. `lr` is the
    /// learning rate zerokit's schedule gives the step it resumes at.
    pub fn not_carried_over(&self, engine: &EngineConfig, lr: f64) -> Vec<String> {
        let r = &self.record;
        let step = self.step();
        let mut notes = vec![format!(
            "data position: the DeepSpeed run's dataloader is its training script's and is not in the checkpoint \
             ({}); zerokit draws the batches from step {step} on from its own sampler over `dataset` (seeded by \
             `seed` and the step), so sequences the DeepSpeed run saw may be seen again and its order is not continued",
            r.global_samples.map_or("sample count not recorded".into(), |n| format!("it had consumed {n} sequences")),
        )];
        let ds_lr = r.param_groups.first().and_then(|g| g.lr);
        notes.push(format!(
            "learning rate: zerokit's schedule (its configuration's, a DeepSpeed `scheduler` block included) gives \
             {lr:e} at step {step}; the DeepSpeed optimizer stood at {}{}",
            ds_lr.map_or("an unrecorded rate".into(), |v| format!("{v:e}")),
            if r.other_state.iter().any(|k| k == "lr_scheduler") { "; its lr_scheduler state is not read" } else { "" }
        ));
        let a = &engine.adamw;
        let differs = r.param_groups.iter().any(|g| {
            g.betas.is_some_and(|b| b != a.betas)
                || g.eps.is_some_and(|e| e != a.eps)
                || g.weight_decay.is_some_and(|w| w != 0.0 && w != a.weight_decay)
        });
        if differs {
            let groups: Vec<String> = r
                .param_groups
                .iter()
                .map(|g| {
                    let or = |v: Option<String>| v.unwrap_or_else(|| "-".into());
                    format!(
                        "betas {}, eps {}, weight_decay {}",
                        or(g.betas.map(|b| format!("({}, {})", b.0, b.1))),
                        or(g.eps.map(|e| format!("{e:e}"))),
                        or(g.weight_decay.map(|w| w.to_string()))
                    )
                })
                .collect();
            notes.push(format!(
                "AdamW settings: zerokit's configuration (betas ({}, {}), eps {:e}, weight_decay {} on tensors of 2 or \
                 more dimensions) replaces the DeepSpeed param groups' ({})",
                a.betas.0,
                a.betas.1,
                a.eps,
                a.weight_decay,
                groups.join("; ")
            ));
        }
        match (&r.loss_scaler, self.scaler(engine)) {
            (_, Some(_)) => {}
            (Some(s), None) if s.dynamic && engine.kind == Kind::Half => notes.push(format!(
                "loss scale: DeepSpeed's dynamic scale {} is not taken (this run's fp16 scaling is static)",
                s.cur_scale
            )),
            (Some(s), None) if s.dynamic => notes.push(format!(
                "loss scale: DeepSpeed's fp16 scale {} is not needed (this run is not fp16)",
                s.cur_scale
            )),
            (_, None) if engine.kind == Kind::Half => notes.push(
                "loss scale: the checkpoint has no dynamic fp16 loss scale (bf16 or static): zerokit's starts from \
                 its fp16 configuration"
                    .into(),
            ),
            _ => {}
        }
        let mut frozen: Vec<&str> = self.names.values().filter(|t| t.frozen).map(|t| t.name.as_str()).collect();
        frozen.sort_unstable();
        if !frozen.is_empty() {
            notes.push(format!(
                "frozen parameters: {} were not trained by DeepSpeed; zerokit trains every parameter, starting from \
                 their saved 16-bit weights with zero Adam moments",
                frozen.join(", ")
            ));
        }
        if !self.dropped.is_empty() {
            notes.push(format!(
                "buffers: {} are not part of zerokit's GPT-2 and are not carried over",
                self.dropped.join(", ")
            ));
        }
        notes.push(
            "random number generator states: DeepSpeed does not save them; zerokit seeds its own from `seed`".into(),
        );
        notes.push("evaluation history: best val loss, early-stopping patience and the loss curve start afresh".into());
        let other: Vec<&str> = r.other_state.iter().filter(|k| *k != "lr_scheduler").map(String::as_str).collect();
        if !other.is_empty() {
            notes.push(format!("also saved and not read: {}", other.join(", ")));
        }
        notes
    }
}
