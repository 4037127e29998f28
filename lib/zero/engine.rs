//! The ZeRO training step: forward, a backward that runs block by block and hands each bucket of
//! gradients to the collectives while the next block's backward runs, and the optimizer step on
//! this rank's partition followed by the all-gather of updated weights.
//!
//! Stage 0: every rank owns the whole flat space (parts = 1); buckets are all-reduced.
//! Stage 1: optimizer state partitioned; gradients of a step are accumulated locally at full size
//!          and reduce-scattered once, bucket by bucket, during the last micro-step's backward.
//! Stage 2: optimizer state and gradients partitioned; every micro-step's buckets are
//!          reduce-scattered during backward and only this rank's fp32 gradient shard is kept.
//! Stage 3: parameters partitioned as well; a bucket's parameters are all-gathered just before
//!          the piece of the model that uses them runs, and released after (`zero::gather`).
//!
//! Optimizer offload (stages 1-3): the fp32 master partition, Adam's moments and the fp32
//! gradient partition live in host memory (`zero::host`); each reduced bucket shard is copied to
//! the host as it arrives, while backward runs on, and AdamW runs on the host cores (libtorch's
//! CPU fused kernel). Parameter offload (stage 3): the compute-dtype shards live in host memory
//! and are copied to the device bucket by bucket when gathered.

use super::gather::{Pieces, Residency};
use super::host::{host_buffer, CopyStream};
use super::layout::FlatLayout;
use super::state::{PartitionState, ZeroState};
use crate::comm::{Collectives, CommError};
use crate::kernels::{sum_of_squares, AdamWPiece, PieceTable, Span};
use crate::model::{loss, vjp, Model};
use crate::optim::{clip_coef, local_grad_norm_sq, AdamW, AdamWConfig, OptimError, Segment};
use crate::scaler::{LossScaler, ScalerConfig, ScalerError, StepDecision};
use std::collections::HashMap;
use tch::{Device, Kind, Tensor};

#[derive(Debug, thiserror::Error)]
pub enum ZeroError {
    #[error(transparent)]
    Comm(#[from] CommError),
    #[error("tensor: {0}")]
    Tensor(#[from] tch::TchError),
    #[error(transparent)]
    Optim(#[from] OptimError),
    #[error(transparent)]
    Scaler(#[from] ScalerError),
    #[error("{0}")]
    Layout(String),
    #[error("offload: {0}")]
    Offload(String),
}

#[derive(Debug, Clone)]
pub struct EngineConfig {
    pub stage: u8,
    pub grad_accum: usize,
    /// Clip the global gradient norm to this value (0 disables).
    pub grad_clip: f64,
    pub activation_checkpointing: bool,
    /// Compute dtype of the model: Float, Half (with loss scaling) or BFloat16.
    pub kind: Kind,
    pub device: Device,
    pub adamw: AdamWConfig,
    /// Used when `kind` is Half.
    pub scaler: ScalerConfig,
    /// Time the phases of each step (see `zero::profile`).
    pub profile: bool,
    /// fp32 master weights, Adam's moments and the gradient partition live in host memory and
    /// AdamW runs there (stages 1-3).
    pub offload_optimizer: bool,
    /// Stage 3: parameter partitions live in host memory between uses.
    pub offload_params: bool,
    /// Host buffers of offloading are page-locked.
    pub pin_memory: bool,
    /// Stage 3: elements of later blocks' parameters gathered ahead of use (0: none).
    pub prefetch_elems: usize,
    /// Stage 3: buckets of at most this many elements stay gathered for the whole step.
    pub persistence_threshold: usize,
}

impl EngineConfig {
    /// The stage and offload combinations the engine implements. Err: what is not, by name.
    pub fn check(&self) -> Result<(), String> {
        if self.stage > 3 {
            return Err(format!("ZeRO stage {} (zerokit has stages 0 to 3)", self.stage));
        }
        if self.offload_optimizer && self.stage == 0 {
            return Err("optimizer offload needs ZeRO stage 1, 2 or 3 (stage 0 keeps no partition to offload)".into());
        }
        if self.offload_params && self.stage != 3 {
            return Err("parameter offload needs ZeRO stage 3 (below it every rank holds all parameters)".into());
        }
        Ok(())
    }
}

/// What one optimizer step did.
#[derive(Debug, Clone, Copy)]
pub struct StepStats {
    /// Mean training loss over the step's micro-batches and ranks.
    pub loss: f64,
    /// Global gradient norm before clipping (of the unscaled gradient).
    pub grad_norm: f64,
    /// The step was skipped (fp16 overflow, or a non-finite gradient).
    pub skipped: bool,
    pub loss_scale: f64,
}

/// Bytes of the state an engine holds, by what it is, read from its tensors (`Engine::held`):
/// what `ckpt estimate`'s per-rank figures are checked against. Where each lives follows the
/// configuration (host memory for what is offloaded).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Held {
    /// Compute-dtype parameters: the whole flat buffer (stages 0-2) or this rank's shards (3).
    pub params: u64,
    /// Stage 3: the most bytes of gathered buckets allocated at once so far.
    pub gathered_peak: u64,
    /// fp32 master partition.
    pub master: u64,
    /// Adam's two moments.
    pub moments: u64,
    /// fp32 gradient partition.
    pub grad: u64,
    /// Full compute-dtype gradient accumulation buffer (stages 0-1 accumulating).
    pub accum: u64,
}

/// Gradients of a bucket handed to a collective that may still be running.
struct Pending {
    bucket: usize,
    /// The bucket's full gradient (reduced in place for stage 0).
    full: Tensor,
    /// This rank's reduced shard (stages 1 and 2), or None when `full` is the result.
    shard: Option<Tensor>,
}

pub struct Engine<M: Model> {
    pub model: M,
    layout: FlatLayout,
    cfg: EngineConfig,
    comm: Box<dyn Collectives>,
    /// All parameters in the compute dtype, padded; the model's tensors are views into it
    /// (stages 0-2).
    model_flat: Option<Tensor>,
    /// Stage 3: this rank's parameter shards and the buckets gathered now.
    params3: Option<Residency>,
    /// This rank's partition of the fp32 master weights (in host memory with optimizer offload).
    master: Tensor,
    /// This rank's partition of the fp32 gradient, summed over micro-steps and ranks (in host
    /// memory with optimizer offload). Empty when the optimizer reads the model's gradients
    /// directly (`direct_grads`).
    grad: Tensor,
    /// Full-size gradient accumulation buffer (stages 0 and 1 with accumulation only).
    accum: Option<Tensor>,
    /// Phase timings (`profile = true`).
    pub profile: Option<super::profile::PhaseTimer>,
    opt: AdamW,
    /// zerokit's AdamW kernel runs the step and writes the model's weights in the same pass
    /// (stages 0-2 on a GPU with zerokit's kernels, the optimizer not offloaded).
    own_adamw: bool,
    scaler: Option<LossScaler>,
    handles: Vec<Tensor>,
    /// Slots of the parameters the head, each block and the embedding use.
    head_slots: Vec<usize>,
    block_slots: Vec<Vec<usize>>,
    embed_slots: Vec<usize>,
    /// Buckets completed by each backward unit: 0 the head, 1 + j the j-th block from the last,
    /// n_blocks + 1 the embedding.
    ready_after: Vec<Vec<usize>>,
    micro: usize,
    loss_sum: Tensor,
    /// With optimizer offload, when each bucket's gradient arrives once per step: the squared
    /// norm of the step's gradient, summed on the device as the buckets leave it (fp64), so the
    /// host does not read its copy for it.
    device_norm_sq: Option<Tensor>,
    /// With optimizer offload from a GPU: the stream the gradient shards go to the host on.
    d2h: Option<CopyStream>,
    pending: Option<Pending>,
    slot_grads: Vec<Option<Tensor>>,
}

/// Where each parameter goes and when its bucket is complete, from what the model declares:
/// the slots of every block's and the embedding's parameters, and the buckets each backward
/// unit completes (see `Engine::ready_after`). A bucket is complete after the last unit that
/// uses one of its parameters; buckets must complete in their order, so that reductions are
/// issued in layout order on every rank.
struct Plan {
    bucket_of: Vec<usize>,
    head_slots: Vec<usize>,
    block_slots: Vec<Vec<usize>>,
    embed_slots: Vec<usize>,
    ready_after: Vec<Vec<usize>>,
}

fn plan<M: Model>(model: &M, names: &[String]) -> Result<Plan, String> {
    let slot: HashMap<&str, usize> = names.iter().enumerate().map(|(i, n)| (n.as_str(), i)).collect();
    let slots = |list: Vec<String>| -> Result<Vec<usize>, String> {
        list.iter()
            .map(|n| slot.get(n.as_str()).copied().ok_or(format!("the model names {n}, not a parameter")))
            .collect()
    };
    let n = model.n_blocks();
    // Backward units: 0 the head, 1 + j block n-1-j, n + 1 the embedding.
    let mut last_unit = vec![None::<usize>; names.len()];
    let mut uses = |unit: usize, list: &[usize]| list.iter().for_each(|&s| last_unit[s] = Some(unit));
    let head_slots = slots(model.head_parameters())?;
    uses(0, &head_slots);
    let block_slots = (0..n).map(|i| slots(model.block_parameters(i))).collect::<Result<Vec<_>, _>>()?;
    for i in (0..n).rev() {
        uses(n - i, &block_slots[i]);
    }
    let embed_slots = slots(model.embed_parameters())?;
    uses(n + 1, &embed_slots);
    let mut bucket_of = vec![None::<usize>; names.len()];
    let mut ready_after = vec![Vec::new(); n + 2];
    let mut prev = 0;
    for (b, list) in model.buckets().into_iter().enumerate() {
        let members = slots(list)?;
        let Some(unit) = members.iter().map(|&s| last_unit[s]).max() else {
            return Err(format!("bucket {b} holds no parameters"));
        };
        let unit = unit.ok_or(format!("bucket {b} holds a parameter no piece of the model uses"))?;
        if unit < prev {
            return Err(format!(
                "bucket {b} is complete before bucket {}: buckets must be in gradient-ready order",
                b - 1
            ));
        }
        prev = unit;
        ready_after[unit].push(b);
        for s in members {
            if bucket_of[s].replace(b).is_some() {
                return Err(format!("parameter {} is in two buckets", names[s]));
            }
        }
    }
    let bucket_of = bucket_of
        .into_iter()
        .enumerate()
        .map(|(s, b)| b.ok_or(format!("parameter {} is in no bucket", names[s])))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Plan { bucket_of, head_slots, block_slots, embed_slots, ready_after })
}

impl<M: Model> Engine<M> {
    /// Takes a model built (or loaded) in fp32, on the host or on `cfg.device`; every rank must
    /// pass identical weights. Moves it to `cfg.device` in the compute dtype, its tensors viewing
    /// one flat buffer.
    pub fn new(mut model: M, cfg: EngineConfig, comm: Box<dyn Collectives>) -> Result<Self, ZeroError> {
        let named = model.named_parameters();
        let names: Vec<String> = named.iter().map(|(n, _)| n.clone()).collect();
        let plan = plan(&model, &names).map_err(ZeroError::Layout)?;
        let specs: Vec<(String, Vec<usize>, usize)> = named
            .iter()
            .zip(&plan.bucket_of)
            .map(|((n, t), &b)| (n.clone(), t.size().iter().map(|&d| d as usize).collect(), b))
            .collect();
        cfg.check().map_err(ZeroError::Layout)?;
        let parts = if cfg.stage == 0 { 1 } else { comm.world() };
        let layout = FlatLayout::new(&specs, parts).map_err(ZeroError::Layout)?;
        let part_rank = if parts == 1 { 0 } else { comm.rank() };

        let opts = (Kind::Float, cfg.device);
        // Where the optimizer's partition lives: the host with optimizer offload.
        let opt_device = if cfg.offload_optimizer { Device::Cpu } else { cfg.device };
        let partition_f32 = || -> Result<Tensor, ZeroError> {
            Ok(if cfg.offload_optimizer {
                host_buffer(layout.partition, Kind::Float, cfg.pin_memory, cfg.device)?
            } else {
                Tensor::f_zeros([layout.partition as i64], opts)?
            })
        };
        // The fp32 flat copy is assembled where the model was built (train builds it on the host):
        // built on the GPU, its per-parameter blocks would stay in libtorch's cache after the
        // conversion, GiBs that nvidia-smi counts and that only an out-of-memory retry returns.
        let built_on = named.first().map_or(cfg.device, |(_, t)| t.device());
        // Start-up holds about one fp32 model, not two: the flat copy is left uninitialised, so
        // its pages become resident only as each parameter is copied in, and each parameter is
        // released as soon as it is (only the buckets' padding tails are zeroed).
        let flat32 = Tensor::f_empty([layout.total as i64], (Kind::Float, built_on))?;
        let released = Tensor::f_empty([0], (Kind::Float, built_on))?;
        let mut named = named;
        for (i, (_, t)) in named.iter_mut().enumerate() {
            let off = layout.flat_offset(i) as i64;
            flat32.narrow(0, off, t.numel() as i64).copy_(&t.detach().to_kind(Kind::Float).view(-1));
            t.set_data(&released);
        }
        for b in &layout.buckets {
            let _ = flat32.narrow(0, (b.flat_offset + b.numel) as i64, (b.padded - b.numel) as i64).zero_();
        }
        let master = partition_f32()?;
        for b in &layout.buckets {
            let src = flat32.narrow(0, (b.flat_offset + part_rank * b.shard) as i64, b.shard as i64);
            master.narrow(0, b.shard_offset as i64, b.shard as i64).copy_(&src);
        }
        let model_flat = (cfg.stage < 3).then(|| flat32.to_kind(cfg.kind).to_device(cfg.device));
        drop(flat32);
        let mut handles: Vec<Tensor> = named.into_iter().map(|(_, t)| t).collect();
        let mut params3 = None;
        match &model_flat {
            Some(flat) => {
                for (i, t) in handles.iter_mut().enumerate() {
                    let p = &layout.params[i];
                    let shape: Vec<i64> = p.shape.iter().map(|&d| d as i64).collect();
                    let view = flat.narrow(0, layout.flat_offset(i) as i64, p.numel as i64).view(shape.as_slice());
                    t.set_data(&view);
                }
            }
            None => {
                let pieces = Pieces { embed: &plan.embed_slots, blocks: &plan.block_slots, head: &plan.head_slots };
                let mut r = Residency::new(
                    &layout,
                    &mut handles,
                    pieces,
                    part_rank,
                    cfg.kind,
                    cfg.device,
                    cfg.offload_params,
                    cfg.pin_memory,
                    !cfg.activation_checkpointing,
                    cfg.prefetch_elems,
                    cfg.persistence_threshold,
                )?;
                r.refresh(&master, &layout, &mut handles)?;
                params3 = Some(r);
            }
        }
        model.set_placement(cfg.device, cfg.kind);
        let segments = layout
            .pieces(part_rank)
            .iter()
            .map(|p| Segment { start: p.partition_offset, len: p.len, decay: layout.params[p.param].decay })
            .collect();
        let opt = AdamW::new(layout.partition, segments, cfg.adamw, opt_device)?;
        let scaler = if cfg.kind == Kind::Half { Some(LossScaler::new(cfg.scaler.clone())?) } else { None };
        let accum =
            (cfg.stage < 2 && cfg.grad_accum > 1).then(|| Tensor::zeros([layout.total as i64], (cfg.kind, cfg.device)));
        // Offloading from a GPU (on the CPU the partition is where the gradient is), with every
        // bucket arriving once per step (an accumulation buffer, or one micro-step).
        let device_norm_sq =
            (cfg.offload_optimizer && cfg.device != Device::Cpu && (accum.is_some() || cfg.grad_accum == 1))
                .then(|| Tensor::zeros([], (Kind::Double, cfg.device)));
        let d2h = match (cfg.offload_optimizer, cfg.device) {
            (true, Device::Cuda(i)) => Some(CopyStream::new(i).map_err(ZeroError::Offload)?),
            _ => None,
        };
        let own_adamw = own_adamw_possible(&cfg);
        let grad =
            if direct_grads(own_adamw, comm.world(), &cfg) { Tensor::f_zeros([0], opts)? } else { partition_f32()? };
        let slot_grads = (0..layout.params.len()).map(|_| None).collect();
        let profile = cfg.profile.then(|| super::profile::PhaseTimer::new(cfg.device));
        Ok(Engine {
            model,
            layout,
            cfg,
            comm,
            model_flat,
            params3,
            master,
            grad,
            accum,
            profile,
            opt,
            own_adamw,
            scaler,
            handles,
            head_slots: plan.head_slots,
            block_slots: plan.block_slots,
            embed_slots: plan.embed_slots,
            ready_after: plan.ready_after,
            micro: 0,
            loss_sum: Tensor::zeros([], opts),
            device_norm_sq,
            d2h,
            pending: None,
            slot_grads,
        })
    }

    /// The stage rule: stages 1 and 2 partition over the ranks, stage 0 gives every rank the one
    /// partition 0.
    fn part_rank(&self) -> usize {
        if self.layout.parts == 1 {
            0
        } else {
            self.comm.rank()
        }
    }

    /// This rank's partition is its own: no other rank holds the same one, or this is the rank
    /// that stands for all of them (rank 0 at stage 0).
    fn owns_partition(&self) -> bool {
        self.layout.parts > 1 || self.comm.rank() == 0
    }

    pub fn layout(&self) -> &FlatLayout {
        &self.layout
    }

    pub fn config(&self) -> &EngineConfig {
        &self.cfg
    }

    pub fn comm(&mut self) -> &mut dyn Collectives {
        self.comm.as_mut()
    }

    /// Whether zerokit's AdamW kernel runs the optimizer step (else libtorch's fused AdamW and a
    /// copy of the master weights into the model's). On by default where it can run; `false`
    /// turns it off, for comparisons. Between steps only.
    pub fn set_zerokit_adamw(&mut self, on: bool) -> Result<(), ZeroError> {
        self.own_adamw = on && own_adamw_possible(&self.cfg);
        let want = if self.direct_grads() { 0 } else { self.layout.partition };
        if self.grad.numel() != want {
            self.grad = Tensor::f_zeros([want as i64], (Kind::Float, self.cfg.device))?;
        }
        Ok(())
    }

    /// Whether the optimizer reads the model's gradients where autograd left them (see
    /// [`direct_grads`]).
    fn direct_grads(&self) -> bool {
        direct_grads(self.own_adamw, self.comm.world(), &self.cfg)
    }

    /// The current loss scale (1 without fp16's loss scaling).
    pub fn loss_scale(&self) -> Option<f64> {
        self.scaler.as_ref().map(LossScaler::scale)
    }

    /// Records a gradient of parameter `slot`; a parameter used by several pieces of the model
    /// (a tied embedding) sums them.
    fn add_grad(&mut self, slot: usize, g: Tensor) {
        let sum = match self.slot_grads[slot].take() {
            Some(prev) => prev + g,
            None => g,
        };
        self.slot_grads[slot] = Some(sum);
    }

    /// Backward unit `unit` is done: start the reduction of the buckets it completed.
    fn unit_done(&mut self, unit: usize) -> Result<(), ZeroError> {
        for b in self.ready_after[unit].clone() {
            self.bucket_ready(b)?;
        }
        Ok(())
    }

    /// One micro-step: forward and backward of a micro-batch `x` -> `y` ([B, T] token ids).
    pub fn forward_backward(&mut self, x: &Tensor, y: &Tensor) -> Result<(), ZeroError> {
        let n = self.model.n_blocks();
        let scale = self.scaler.as_ref().map_or(1.0, |s| s.scale());
        let ckpt = self.cfg.activation_checkpointing;

        // The first mark of a step starts its clock; later ones time the batches between micro-steps.
        self.mark("data");
        // Forward, cut at block boundaries so backward can run (and recompute) block by block.
        // Stage 3 gathers each piece's parameters on entering it (positions: see zero::gather).
        self.enter(0, true)?;
        let x0 = self.model.embed(x);
        self.leave(0, true);
        let mut h = x0.detach();
        let mut saved: Vec<(Tensor, Option<Tensor>)> = Vec::with_capacity(n);
        for i in 0..n {
            self.enter(1 + i, true)?;
            if ckpt {
                let out = tch::no_grad(|| self.model.block(i, &h));
                saved.push((h, None));
                h = out;
            } else {
                let leaf = h.detach().set_requires_grad(true);
                let out = self.model.block(i, &leaf);
                h = out.detach();
                saved.push((leaf, Some(out)));
            }
            self.leave(1 + i, true);
        }
        self.mark("forward");
        self.enter(n + 1, true)?;
        let head = self.model.head_backward(&h, y, scale)?;
        self.leave(n + 1, true);
        self.mark("head and loss");
        self.loss_sum += head.loss;
        // The head gives its gradients in the order of head_parameters.
        for (s, (name, g)) in self.head_slots.clone().into_iter().zip(head.params) {
            debug_assert_eq!(self.layout.params[s].name, name);
            self.add_grad(s, g);
        }
        self.unit_done(0)?;
        let mut grad_h = head.input;

        // Blocks, last first: each finished block may complete buckets.
        for i in (0..n).rev() {
            let pos = 2 * n + 1 - i;
            self.enter(pos, true)?;
            let (leaf, out) = saved.pop().expect("one saved input per block");
            let (leaf, out) = match out {
                Some(out) => (leaf, out),
                None => {
                    let leaf = leaf.set_requires_grad(true);
                    let out = self.model.block(i, &leaf);
                    (leaf, out)
                }
            };
            let block_slots = self.block_slots[i].clone();
            let mut inputs: Vec<&Tensor> = block_slots.iter().map(|&s| &self.handles[s]).collect();
            inputs.push(&leaf);
            let mut g = vjp(&out, &grad_h, &inputs, false);
            grad_h = g.pop().expect("grad of block input");
            for (s, gr) in block_slots.into_iter().zip(g) {
                self.add_grad(s, gr);
            }
            self.leave(pos, true);
            self.unit_done(n - i)?;
        }

        // The embedding.
        let embed_slots = self.embed_slots.clone();
        if !embed_slots.is_empty() {
            let inputs: Vec<&Tensor> = embed_slots.iter().map(|&s| &self.handles[s]).collect();
            let g = vjp(&x0, &grad_h, &inputs, false);
            for (s, gr) in embed_slots.into_iter().zip(g) {
                self.add_grad(s, gr);
            }
        }
        self.unit_done(n + 1)?;
        if let Some(r) = &mut self.params3 {
            r.release_all(&self.layout, &mut self.handles, false);
        }
        self.mark("backward");
        self.flush_pending()?;
        self.mark("communication wait");
        self.micro += 1;
        Ok(())
    }

    /// Stage 3: gathers the parameters of micro-step position `pos` (see `zero::gather`) and
    /// prefetches those after it (through the backward when `training`, else the head).
    fn enter(&mut self, pos: usize, training: bool) -> Result<(), ZeroError> {
        if let Some(r) = &mut self.params3 {
            let last = if training { r.last_position() } else { r.head_position() };
            r.enter(pos, last, &self.layout, &mut self.handles, self.comm.as_mut())?;
        }
        Ok(())
    }

    /// Stage 3: releases what position `pos` gathered and the next one does not use.
    fn leave(&mut self, pos: usize, training: bool) {
        if let Some(r) = &mut self.params3 {
            r.leave(pos, &self.layout, &mut self.handles, training);
        }
    }

    fn mark(&mut self, phase: &'static str) {
        if let Some(p) = &mut self.profile {
            p.mark(phase);
        }
    }

    /// Bucket `b`'s gradients are all in `slot_grads`: pack them and start their reduction.
    fn bucket_ready(&mut self, b: usize) -> Result<(), ZeroError> {
        let bk = self.layout.buckets[b].clone();
        // The optimizer reads these gradients themselves at the step.
        if self.direct_grads() {
            for &s in &bk.params {
                let g = self.slot_grads[s].as_mut().expect("gradient computed before its bucket is ready");
                if !g.is_contiguous() {
                    *g = g.contiguous();
                }
            }
            return Ok(());
        }
        // One rank, no accumulation buffer, the gradient partition beside the model: nothing to
        // reduce, so each gradient is widened straight into the fp32 partition (the padding
        // stays the zeros it was made with), without packing a bucket first: one pass over the
        // gradient instead of two. The values are the bucket's.
        if self.comm.world() == 1 && self.accum.is_none() && self.d2h.is_none() && self.grad.device() == self.cfg.device
        {
            for &s in &bk.params {
                let g = self.slot_grads[s].take().expect("gradient computed before its bucket is ready");
                let p = &self.layout.params[s];
                let dst = self.grad.narrow(0, (bk.shard_offset + p.offset) as i64, p.numel as i64);
                into_partition(&dst, &g.contiguous().view(-1), self.micro == 0)?;
            }
            return Ok(());
        }
        let opts = (self.cfg.kind, self.cfg.device);
        // The parameters tile [0, numel) of the bucket; only the padding needs zeros.
        let buf = Tensor::empty([bk.padded as i64], opts);
        if bk.padded > bk.numel {
            let _ = buf.narrow(0, bk.numel as i64, (bk.padded - bk.numel) as i64).zero_();
        }
        for &s in &bk.params {
            let g = self.slot_grads[s].take().expect("gradient computed before its bucket is ready");
            let p = &self.layout.params[s];
            buf.narrow(0, p.offset as i64, p.numel as i64).copy_(&g.view(-1));
        }
        let last_micro = self.micro + 1 == self.cfg.grad_accum;
        let full = match &self.accum {
            Some(acc) => {
                let mut slice = acc.narrow(0, bk.flat_offset as i64, bk.padded as i64);
                // The first micro-step overwrites what the last step left (no zeroing pass).
                if self.micro == 0 {
                    slice.copy_(&buf);
                } else {
                    let _ = slice.g_add_(&buf);
                }
                if !last_micro {
                    return Ok(()); // stages 0/1 communicate once per optimizer step
                }
                slice
            }
            None => buf,
        };
        if let Some(p) = self.pending.take() {
            self.comm.wait_comm()?;
            self.finish(p)?;
        }
        let world = self.comm.world();
        let shard = if world == 1 {
            None
        } else if self.layout.parts == 1 {
            self.comm.wait_compute()?;
            self.comm.all_reduce_sum(&full)?;
            None
        } else {
            let out = Tensor::empty([bk.shard as i64], opts);
            self.comm.wait_compute()?;
            self.comm.reduce_scatter_sum(&full, &out)?;
            Some(out)
        };
        self.pending = Some(Pending { bucket: b, full, shard });
        Ok(())
    }

    /// Adds a reduced bucket into this rank's fp32 gradient partition (compute stream, after
    /// `wait_comm`).
    fn finish(&mut self, p: Pending) -> Result<(), ZeroError> {
        let bk = &self.layout.buckets[p.bucket];
        let mut dst = self.grad.narrow(0, bk.shard_offset as i64, bk.shard as i64);
        let src = match &p.shard {
            Some(s) => s.shallow_clone(),
            None => p.full.narrow(0, (self.part_rank() * bk.shard) as i64, bk.shard as i64),
        };
        // With an accumulation buffer (stages 0/1) a bucket arrives once per step, without one
        // at every micro-step.
        let first = self.accum.is_some() || self.micro == 0;
        if dst.device() == src.device() {
            into_partition(&dst, &src, first)?;
        } else if first {
            // Optimizer offload: converted on the device, then copied into the pinned host
            // partition on the copy stream (`step` waits for it before reading). The copy reads
            // a tensor of its own: the reduce buffers are written again by later compute, which
            // is not ordered after the copy stream.
            let g = if src.kind() == Kind::Float { src.copy() } else { src.f_to_kind(Kind::Float)? };
            if let Some(acc) = &mut self.device_norm_sq {
                *acc += local_grad_norm_sq(&g)?;
            }
            self.d2h.as_mut().expect("offloading from a GPU").copy(&dst, g).map_err(ZeroError::Offload)?;
        } else {
            // A later micro-step adds on the host: the plain copy waits for the compute stream,
            // and the first micro-step's copy into `dst` must have landed.
            if let Some(d2h) = &mut self.d2h {
                d2h.wait().map_err(ZeroError::Offload)?;
            }
            let _ = dst.f_add_(&src.f_to_kind(Kind::Float)?.f_to_device(Device::Cpu)?)?;
        }
        Ok(())
    }

    fn flush_pending(&mut self) -> Result<(), ZeroError> {
        if let Some(p) = self.pending.take() {
            self.comm.wait_comm()?;
            self.finish(p)?;
        }
        Ok(())
    }

    /// The optimizer step at learning rate `lr`, after `grad_accum` micro-steps.
    pub fn step(&mut self, lr: f64) -> Result<StepStats, ZeroError> {
        let world = self.comm.world();
        let scale = self.scaler.as_ref().map_or(1.0, |s| s.scale());
        let micro = self.micro.max(1);
        if let Some(d2h) = &mut self.d2h {
            // The gradient shards' copies into host memory were queued on the copy stream.
            d2h.wait().map_err(ZeroError::Offload)?;
        }
        // The gradient shard holds the sum over ranks and micro-steps of the scaled gradients.
        // Its unscaling (and the clip below) is folded into AdamW's read of it, rather than
        // being passes of their own over the shard (on the host, with offload, they cost as much
        // as a third of the step).
        let unscale = 1.0 / (world as f64 * micro as f64 * scale);
        // One host round trip per step carries the squared norm (non-finite exactly when some
        // gradient is inf/nan, so it doubles as the overflow check) and the loss. With stage 0
        // every rank holds the same full gradient: only rank 0 contributes it.
        let contributes = self.owns_partition();
        // zerokit's AdamW reads its pieces from a table built now, while the device may still
        // run the backward, so that the update is queued as soon as the norm is known.
        let direct = self.direct_grads();
        let grads = if direct { Grads::Slots(&self.slot_grads) } else { Grads::Partition(&self.grad) };
        let pieces = match self.own_adamw {
            true => adamw_pieces(&self.layout, self.part_rank(), grads, self.model_flat.as_ref())?,
            false => Vec::new(),
        };
        let table = if self.own_adamw { Some(PieceTable::new(&pieces, self.cfg.device)?) } else { None };
        let norm_sq = match (&mut self.device_norm_sq, &table) {
            (Some(acc), _) => std::mem::replace(acc, acc.zeros_like()),
            (None, Some(t)) if direct => sum_of_squares(t)?
                .ok_or_else(|| ZeroError::Layout("zerokit's kernels are not available for the gradient norm".into()))?,
            (None, _) => local_grad_norm_sq(&self.grad)?,
        };
        let on_host = |t: Tensor| t.to_device(Device::Cpu);
        let local = Tensor::stack(&[on_host(norm_sq), on_host(self.loss_sum.to_kind(Kind::Double) / micro as f64)], 0);
        let mut stats: Vec<f64> = Vec::<f64>::try_from(&local)?;
        if !contributes {
            stats[0] = 0.0;
        }
        self.comm.all_reduce_scalars(&mut stats)?;
        let (norm, loss) = (stats[0].sqrt() * unscale, stats[1] / world as f64);
        if let Some(p) = &mut self.profile {
            p.mark("gradient norm");
        }
        let overflow = !norm.is_finite();
        let _ = self.loss_sum.zero_();
        self.micro = 0;

        let skip = match &mut self.scaler {
            Some(s) => s.update(overflow)? == StepDecision::Skip,
            None => {
                if overflow {
                    tracing::warn!("non-finite gradient: step skipped");
                }
                overflow
            }
        };
        if skip {
            drop((table, pieces));
            self.slot_grads.iter_mut().for_each(|g| *g = None);
            if let Some(p) = &mut self.profile {
                p.end_step();
            }
            return Ok(StepStats { loss, grad_norm: norm, skipped: true, loss_scale: scale });
        }
        let clip = if self.cfg.grad_clip > 0.0 { clip_coef(norm, self.cfg.grad_clip) } else { 1.0 };
        let grad_scale = 1.0 / (unscale * clip);
        let written = match &table {
            Some(t) => self.opt.step_pieces(&mut self.master, t, lr, grad_scale)?,
            None => false,
        };
        drop((table, pieces));
        if !written {
            if direct {
                return Err(ZeroError::Layout("zerokit's AdamW kernel did not run on the model's gradients".into()));
            }
            self.opt.step_scaled(&mut self.master, &self.grad, lr, grad_scale)?;
        }
        self.slot_grads.iter_mut().for_each(|g| *g = None);
        self.mark("adamw");
        self.publish_weights(!written)?;
        self.mark("weight all-gather");
        if let Some(p) = &mut self.profile {
            p.end_step();
        }
        Ok(StepStats { loss, grad_norm: norm, skipped: false, loss_scale: scale })
    }

    /// Publishes the updated master partition as the model's weights: copied into the flat
    /// buffer when `copy` (zerokit's AdamW has already written them otherwise), then all-gathered
    /// (stages 0-2); or into this rank's shards (stage 3, gathered when used).
    fn publish_weights(&mut self, copy: bool) -> Result<(), ZeroError> {
        let Some(flat) = &self.model_flat else {
            let r = self.params3.as_mut().expect("stage 3 holds its shards");
            return r.refresh(&self.master, &self.layout, &mut self.handles);
        };
        let pr = self.part_rank();
        for b in self.layout.buckets.iter().filter(|_| copy) {
            let mut dst = flat.narrow(0, (b.flat_offset + pr * b.shard) as i64, b.shard as i64);
            let src = self.master.narrow(0, b.shard_offset as i64, b.shard as i64);
            if src.device() == dst.device() {
                dst.f_copy_(&src)?;
            } else {
                // Optimizer offload: from the pinned host partition, a bucket's shard at a time.
                dst.f_copy_(&src.f_to_device_(dst.device(), Kind::Float, true, false)?)?;
            }
        }
        if self.layout.parts > 1 {
            self.comm.wait_compute()?;
            for b in &self.layout.buckets {
                self.comm.all_gather_in_place(&flat.narrow(0, b.flat_offset as i64, b.padded as i64))?;
            }
            self.comm.wait_comm()?;
        }
        Ok(())
    }

    /// Loss of `x` -> `y` on this rank, without gradients. Collective at stage 3, where the
    /// pieces' parameters are gathered in turn.
    pub fn eval_loss(&mut self, x: &Tensor, y: &Tensor) -> Result<f64, ZeroError> {
        if self.params3.is_none() {
            return Ok(self.model.eval_loss(x, y).f_double_value(&[])?);
        }
        let _guard = tch::no_grad_guard();
        let n = self.model.n_blocks();
        self.enter(0, false)?;
        let mut h = self.model.embed(x);
        self.leave(0, false);
        for i in 0..n {
            self.enter(1 + i, false)?;
            h = self.model.block(i, &h);
            self.leave(1 + i, false);
        }
        self.enter(n + 1, false)?;
        let value = loss(&self.model.logits(&h), y).f_double_value(&[])?;
        if let Some(r) = &mut self.params3 {
            r.release_all(&self.layout, &mut self.handles, false);
        }
        Ok(value)
    }

    /// The model's parameters in the compute dtype, by name, for rank 0's checkpoint files (None
    /// on the other ranks). Collective at stage 3 (see `gather_parameters`).
    pub fn model_tensors(&mut self) -> Result<Option<Vec<(String, Tensor)>>, ZeroError> {
        let rank0 = self.comm.rank() == 0;
        self.gather_parameters(rank0)
    }

    /// The model's whole parameters by name when `keep` (else None): at stages 0-2 the model's own
    /// tensors; at stage 3 a collective in which every rank takes part in each bucket's gather,
    /// and the ranks that keep copy the parameters to host memory.
    pub fn gather_parameters(&mut self, keep: bool) -> Result<Option<Vec<(String, Tensor)>>, ZeroError> {
        let Some(r) = &mut self.params3 else {
            return Ok(keep.then(|| self.model.named_parameters()));
        };
        let host = r.host_parameters(&self.layout, &mut self.handles, self.comm.as_mut(), keep)?;
        Ok(keep.then(|| {
            self.layout
                .params
                .iter()
                .zip(host)
                .map(|(p, t)| (p.name.clone(), t.expect("every parameter is kept")))
                .collect()
        }))
    }

    /// Whether the model's tensors hold their whole parameters between steps (not at stage 3).
    pub fn parameters_resident(&self) -> bool {
        self.params3.is_none()
    }

    /// What this rank's engine holds now (see [`Held`]).
    pub fn held(&self) -> Held {
        let bytes = |t: &Tensor| (t.numel() * t.kind().elt_size_in_bytes()) as u64;
        let (exp_avg, exp_avg_sq, _) = self.opt.state();
        let kind = self.cfg.kind.elt_size_in_bytes() as u64;
        Held {
            params: match (&self.model_flat, &self.params3) {
                (Some(flat), _) => bytes(flat),
                (None, Some(r)) => r.shard_bytes() as u64,
                (None, None) => 0,
            },
            gathered_peak: self.params3.as_ref().map_or(0, |r| r.peak_allocated as u64 * kind),
            master: bytes(&self.master),
            moments: bytes(exp_avg) + bytes(exp_avg_sq),
            grad: bytes(&self.grad),
            accum: self.accum.as_ref().map_or(0, bytes),
        }
    }

    /// This rank's state for a checkpoint (shallow handles: no copy).
    pub fn state(&self) -> ZeroState {
        let (exp_avg, exp_avg_sq, optimizer_step) = self.opt.state();
        ZeroState {
            stage: self.cfg.stage,
            world: self.comm.world(),
            kind: self.cfg.kind,
            layout: self.layout.clone(),
            partition: self.part_rank(),
            saves: self.owns_partition(),
            master: self.master.shallow_clone(),
            exp_avg: exp_avg.shallow_clone(),
            exp_avg_sq: exp_avg_sq.shallow_clone(),
            optimizer_step,
            adamw: self.cfg.adamw,
            scaler: self.scaler.as_ref().map(|s| s.state().clone()),
        }
    }

    /// Restores this rank's partition (read for `state().layout` and `state().partition`) and
    /// publishes the weights to the model. Collective at stages 1 and 2 (the all-gather).
    pub fn load_state(&mut self, st: PartitionState) -> Result<(), ZeroError> {
        if st.master.size() != self.master.size() || st.master.kind() != Kind::Float {
            return Err(ZeroError::Layout(format!(
                "master weights of {:?} {:?} for a partition of [{}] Float",
                st.master.kind(),
                st.master.size(),
                self.layout.partition
            )));
        }
        tch::no_grad(|| self.master.f_copy_(&st.master))?;
        self.opt.load_state(&st.exp_avg, &st.exp_avg_sq, st.optimizer_step)?;
        if let (Some(s), Some(state)) = (&mut self.scaler, st.scaler) {
            s.load_state(state)?;
        }
        self.publish_weights(true)
    }
}

/// Writes a gradient into its range of the fp32 partition on the same device. A step's first
/// contribution overwrites it (one widening copy) rather than adding to zeros, so the partition
/// needs no zeroing pass after the step; later micro-steps add.
fn into_partition(dst: &Tensor, src: &Tensor, first: bool) -> Result<(), ZeroError> {
    if first {
        crate::kernels::widen_into(dst, src)?;
    } else {
        let _ = dst.shallow_clone().g_add_(src);
    }
    Ok(())
}

/// zerokit's AdamW kernel can run this configuration's step: the partition and the model's
/// weights are on a GPU where zerokit's kernels are loaded, and the weights are one flat buffer.
fn own_adamw_possible(cfg: &EngineConfig) -> bool {
    !cfg.offload_optimizer && cfg.stage < 3 && crate::kernels::fused_on(cfg.device)
}

/// One rank, one micro-step a step, zerokit's AdamW: with nothing to reduce or accumulate, the
/// optimizer reads the model's 16-bit gradients where autograd left them. The fp32 gradient
/// partition is then not allocated (4 bytes a parameter), and no widening copy fills it; the
/// gradients are kept until the step instead (2 bytes a parameter).
fn direct_grads(own_adamw: bool, world: usize, cfg: &EngineConfig) -> bool {
    own_adamw && world == 1 && cfg.grad_accum == 1
}

/// Where the optimizer reads a partition's gradient.
enum Grads<'a> {
    /// The fp32 gradient partition, indexed as the master weights are.
    Partition(&'a Tensor),
    /// The model's gradients by parameter slot (one rank: the partition is the whole model).
    Slots(&'a [Option<Tensor>]),
}

/// The AdamW kernel's pieces of partition `part`: each parameter's range with its gradient and,
/// at stages 0-2, where its weights lie in the flat buffer.
fn adamw_pieces<'a>(
    layout: &FlatLayout,
    part: usize,
    grads: Grads<'a>,
    flat: Option<&'a Tensor>,
) -> Result<Vec<AdamWPiece<'a>>, ZeroError> {
    layout
        .pieces(part)
        .into_iter()
        .map(|p| {
            let grad = match &grads {
                Grads::Partition(t) => Span { tensor: t, offset: p.partition_offset },
                Grads::Slots(slots) => {
                    let Some(t) = slots[p.param].as_ref() else {
                        return Err(ZeroError::Layout(format!("no gradient for {}", layout.params[p.param].name)));
                    };
                    Span { tensor: t, offset: p.param_offset }
                }
            };
            let weight = flat.map(|f| Span { tensor: f, offset: layout.flat_offset(p.param) + p.param_offset });
            Ok(AdamWPiece { start: p.partition_offset, len: p.len, grad, weight, decay: layout.params[p.param].decay })
        })
        .collect()
}
