//! The ZeRO training step: forward, a backward that runs block by block and hands each bucket of
//! gradients to the collectives while the next block's backward runs, and the optimizer step on
//! this rank's partition followed by the all-gather of updated weights.
//!
//! Stage 0: every rank owns the whole flat space (parts = 1); buckets are all-reduced.
//! Stage 1: optimizer state partitioned; gradients of a step are accumulated locally at full size
//!          and reduce-scattered once, bucket by bucket, during the last micro-step's backward.
//! Stage 2: optimizer state and gradients partitioned; every micro-step's buckets are
//!          reduce-scattered during backward and only this rank's fp32 gradient shard is kept.

use super::layout::FlatLayout;
use crate::comm::{Collectives, CommError};
use crate::model::{vjp, Gpt};
use crate::optim::{clip_coef, local_grad_norm_sq, AdamW, AdamWConfig, OptimError, Segment};
use crate::scaler::{LossScaler, ScalerConfig, ScalerError, StepDecision};
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

/// Gradients of a bucket handed to a collective that may still be running.
struct Pending {
    bucket: usize,
    /// The bucket's full gradient (reduced in place for stage 0).
    full: Tensor,
    /// This rank's reduced shard (stages 1 and 2), or None when `full` is the result.
    shard: Option<Tensor>,
    /// `full` is a view of the accumulation buffer, to be zeroed once consumed.
    from_accum: bool,
}

pub struct Engine {
    pub model: Gpt,
    pub layout: FlatLayout,
    pub cfg: EngineConfig,
    pub comm: Box<dyn Collectives>,
    /// All parameters in the compute dtype, padded; the model's tensors are views into it.
    model_flat: Tensor,
    /// This rank's partition of the fp32 master weights.
    pub master: Tensor,
    /// This rank's partition of the fp32 gradient, summed over micro-steps and ranks.
    grad: Tensor,
    /// Full-size gradient accumulation buffer (stages 0 and 1 with accumulation only).
    accum: Option<Tensor>,
    /// Phase timings (ZEROKIT_PROFILE=1).
    pub profile: Option<super::profile::PhaseTimer>,
    pub opt: AdamW,
    pub scaler: Option<LossScaler>,
    handles: Vec<Tensor>,
    micro: usize,
    loss_sum: Tensor,
    pending: Option<Pending>,
    slot_grads: Vec<Option<Tensor>>,
}

/// Which bucket a GPT-2 parameter belongs to: buckets follow gradient readiness, so ln_f goes
/// with the last block, block i with bucket n_layer-1-i, the (tied) embeddings last.
fn bucket_of(name: &str, n_layer: usize) -> Result<usize, String> {
    if name.starts_with("transformer.ln_f.") {
        return Ok(0);
    }
    if let Some(rest) = name.strip_prefix("transformer.h.") {
        let i: usize = rest.split('.').next().and_then(|s| s.parse().ok()).ok_or(format!("bad name {name}"))?;
        return Ok(n_layer - 1 - i);
    }
    if name == "transformer.wte.weight" || name == "transformer.wpe.weight" {
        return Ok(n_layer);
    }
    Err(format!("parameter {name} has no bucket"))
}

impl Engine {
    /// Takes a model built (or loaded) in fp32, on the host or on `cfg.device`; every rank must
    /// pass identical weights. Moves it to `cfg.device` in the compute dtype, its tensors viewing
    /// one flat buffer.
    pub fn new(mut model: Gpt, cfg: EngineConfig, comm: Box<dyn Collectives>) -> Result<Self, ZeroError> {
        let n_layer = model.config().n_layer;
        let named = model.named_parameters();
        let specs = named
            .iter()
            .map(|(n, t)| {
                let shape = t.size().iter().map(|&d| d as usize).collect();
                bucket_of(n, n_layer).map(|b| (n.clone(), shape, b))
            })
            .collect::<Result<Vec<_>, _>>()
            .map_err(ZeroError::Layout)?;
        let parts = if cfg.stage == 0 { 1 } else { comm.world() };
        let layout = FlatLayout::new(&specs, parts).map_err(ZeroError::Layout)?;
        let part_rank = if parts == 1 { 0 } else { comm.rank() };

        let opts = (Kind::Float, cfg.device);
        // The fp32 flat copy is assembled where the model was built (train builds it on the host):
        // built on the GPU, its per-parameter blocks would stay in libtorch's cache after the
        // conversion, GiBs that nvidia-smi counts and that only an out-of-memory retry returns.
        let flat32 = Tensor::zeros([layout.total as i64], (Kind::Float, model.device()));
        for (i, (_, t)) in named.iter().enumerate() {
            let off = layout.flat_offset(i) as i64;
            flat32.narrow(0, off, t.numel() as i64).copy_(&t.detach().to_kind(Kind::Float).view(-1));
        }
        let master = Tensor::zeros([layout.partition as i64], opts);
        for b in &layout.buckets {
            let src = flat32.narrow(0, (b.flat_offset + part_rank * b.shard) as i64, b.shard as i64);
            master.narrow(0, b.shard_offset as i64, b.shard as i64).copy_(&src);
        }
        let model_flat = flat32.to_kind(cfg.kind).to_device(cfg.device);
        drop(flat32);
        let mut handles = Vec::with_capacity(named.len());
        for (i, (_, t)) in named.into_iter().enumerate() {
            let mut t = t;
            let view = model_flat.narrow(0, layout.flat_offset(i) as i64, t.numel() as i64).view(t.size().as_slice());
            t.set_data(&view);
            handles.push(t);
        }
        model.set_placement(cfg.device, cfg.kind);
        let segments = layout
            .pieces(part_rank)
            .iter()
            .map(|p| Segment { start: p.partition_offset, len: p.len, decay: layout.params[p.param].decay })
            .collect();
        let opt = AdamW::new(layout.partition, segments, cfg.adamw, cfg.device)?;
        let scaler = if cfg.kind == Kind::Half { Some(LossScaler::new(cfg.scaler.clone())?) } else { None };
        let accum =
            (cfg.stage < 2 && cfg.grad_accum > 1).then(|| Tensor::zeros([layout.total as i64], (cfg.kind, cfg.device)));
        let grad = Tensor::zeros([layout.partition as i64], opts);
        let slot_grads = (0..layout.params.len()).map(|_| None).collect();
        let profile = super::profile::PhaseTimer::from_env(cfg.device);
        Ok(Engine {
            model,
            layout,
            cfg,
            comm,
            model_flat,
            master,
            grad,
            accum,
            profile,
            opt,
            scaler,
            handles,
            micro: 0,
            loss_sum: Tensor::zeros([], opts),
            pending: None,
            slot_grads,
        })
    }

    fn part_rank(&self) -> usize {
        if self.layout.parts == 1 {
            0
        } else {
            self.comm.rank()
        }
    }

    fn slot(&self, name: &str) -> usize {
        self.layout.params.iter().position(|p| p.name == name).expect("model parameter is in the layout")
    }

    /// One micro-step: forward and backward of a micro-batch `x` -> `y` ([B, T] token ids).
    pub fn forward_backward(&mut self, x: &Tensor, y: &Tensor) -> Result<(), ZeroError> {
        let n_layer = self.model.config().n_layer;
        let scale = self.scaler.as_ref().map_or(1.0, |s| s.scale());
        let ckpt = self.cfg.activation_checkpointing;

        // The first mark of a step starts its clock; later ones time the batches between micro-steps.
        self.mark("next micro-batch");
        // Forward, cut at block boundaries so backward can run (and recompute) block by block.
        let x0 = self.model.embed(x);
        let mut h = x0.detach();
        let mut saved: Vec<(Tensor, Option<Tensor>)> = Vec::with_capacity(n_layer);
        for i in 0..n_layer {
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
        }
        self.mark("forward");
        // Head and loss, forward and backward in chunks: ln_f and the lm_head side of the tied wte.
        let head = self.model.head_backward(&h, y, scale)?;
        self.mark("head and loss");
        self.loss_sum += head.loss;
        let (lnf_w, lnf_b, wte) = (
            self.slot("transformer.ln_f.weight"),
            self.slot("transformer.ln_f.bias"),
            self.slot("transformer.wte.weight"),
        );
        let mut grad_h = head.input;
        let wte_head = head.wte;
        self.slot_grads[lnf_b] = Some(head.ln_f_bias);
        self.slot_grads[lnf_w] = Some(head.ln_f_weight);

        // Blocks, last first: each finished block completes a bucket.
        for i in (0..n_layer).rev() {
            let (leaf, out) = saved.pop().expect("one saved input per block");
            let (leaf, out) = match out {
                Some(out) => (leaf, out),
                None => {
                    let leaf = leaf.set_requires_grad(true);
                    let out = self.model.block(i, &leaf);
                    (leaf, out)
                }
            };
            let b = n_layer - 1 - i;
            let block_slots: Vec<usize> = self.layout.buckets[b]
                .params
                .iter()
                .copied()
                .filter(|&s| self.layout.params[s].name.starts_with("transformer.h."))
                .collect();
            let mut inputs: Vec<&Tensor> = block_slots.iter().map(|&s| &self.handles[s]).collect();
            inputs.push(&leaf);
            let mut g = vjp(&out, &grad_h, &inputs, false);
            grad_h = g.pop().expect("grad of block input");
            for (s, gr) in block_slots.into_iter().zip(g) {
                self.slot_grads[s] = Some(gr);
            }
            self.bucket_ready(b)?;
        }

        // Embeddings: wte collects both of its gradients.
        let wpe = self.slot("transformer.wpe.weight");
        let mut g = vjp(&x0, &grad_h, &[&self.handles[wte], &self.handles[wpe]], false);
        self.slot_grads[wpe] = g.pop();
        self.slot_grads[wte] = Some(g.pop().expect("grad of wte") + wte_head);
        self.bucket_ready(n_layer)?;
        self.flush_pending()?;
        self.mark("backward and reduction");
        self.micro += 1;
        Ok(())
    }

    fn mark(&mut self, phase: &'static str) {
        if let Some(p) = &mut self.profile {
            p.mark(phase);
        }
    }

    /// Bucket `b`'s gradients are all in `slot_grads`: pack them and start their reduction.
    fn bucket_ready(&mut self, b: usize) -> Result<(), ZeroError> {
        let bk = self.layout.buckets[b].clone();
        let opts = (self.cfg.kind, self.cfg.device);
        let buf = Tensor::zeros([bk.padded as i64], opts);
        for &s in &bk.params {
            let g = self.slot_grads[s].take().expect("gradient computed before its bucket is ready");
            let p = &self.layout.params[s];
            buf.narrow(0, p.offset as i64, p.numel as i64).copy_(&g.view(-1));
        }
        let last_micro = self.micro + 1 == self.cfg.grad_accum;
        let (full, from_accum) = match &self.accum {
            Some(acc) => {
                let mut slice = acc.narrow(0, bk.flat_offset as i64, bk.padded as i64);
                let _ = slice.g_add_(&buf);
                if !last_micro {
                    return Ok(()); // stages 0/1 communicate once per optimizer step
                }
                (slice, true)
            }
            None => (buf, false),
        };
        if let Some(p) = self.pending.take() {
            self.comm.wait_comm()?;
            self.finish(p);
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
        self.pending = Some(Pending { bucket: b, full, shard, from_accum });
        Ok(())
    }

    /// Adds a reduced bucket into this rank's fp32 gradient partition (compute stream, after
    /// `wait_comm`).
    fn finish(&mut self, mut p: Pending) {
        let bk = &self.layout.buckets[p.bucket];
        let mut dst = self.grad.narrow(0, bk.shard_offset as i64, bk.shard as i64);
        match &p.shard {
            Some(s) => {
                let _ = dst.g_add_(s);
            }
            None => {
                let _ = dst.g_add_(&p.full.narrow(0, (self.part_rank() * bk.shard) as i64, bk.shard as i64));
            }
        }
        if p.from_accum {
            let _ = p.full.zero_();
        }
    }

    fn flush_pending(&mut self) -> Result<(), ZeroError> {
        if let Some(p) = self.pending.take() {
            self.comm.wait_comm()?;
            self.finish(p);
        }
        Ok(())
    }

    /// The optimizer step at learning rate `lr`, after `grad_accum` micro-steps.
    pub fn step(&mut self, lr: f64) -> Result<StepStats, ZeroError> {
        let world = self.comm.world();
        let scale = self.scaler.as_ref().map_or(1.0, |s| s.scale());
        let micro = self.micro.max(1);
        let _ = self.grad.g_mul_scalar_(1.0 / (world as f64 * micro as f64 * scale));
        // One host round trip per step carries the squared norm (non-finite exactly when some
        // gradient is inf/nan, so it doubles as the overflow check) and the loss. With stage 0
        // every rank holds the same full gradient: only rank 0 contributes it.
        let contributes = self.layout.parts > 1 || self.comm.rank() == 0;
        let local =
            Tensor::stack(&[local_grad_norm_sq(&self.grad)?, self.loss_sum.to_kind(Kind::Double) / micro as f64], 0)
                .to_device(Device::Cpu);
        let mut stats: Vec<f64> = Vec::<f64>::try_from(&local)?;
        if !contributes {
            stats[0] = 0.0;
        }
        self.comm.all_reduce_scalars(&mut stats)?;
        let (norm, loss) = (stats[0].sqrt(), stats[1] / world as f64);
        self.mark("gradient norm");
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
            let _ = self.grad.zero_();
            return Ok(StepStats { loss, grad_norm: norm, skipped: true, loss_scale: scale });
        }
        if self.cfg.grad_clip > 0.0 {
            let c = clip_coef(norm, self.cfg.grad_clip);
            if c < 1.0 {
                let _ = self.grad.g_mul_scalar_(c);
            }
        }
        self.opt.step(&mut self.master, &self.grad, lr)?;
        let _ = self.grad.zero_();
        self.mark("adamw");
        self.publish_weights()?;
        self.mark("publish weights");
        Ok(StepStats { loss, grad_norm: norm, skipped: false, loss_scale: scale })
    }

    /// Copies the updated master partition into the model's flat buffer and all-gathers it.
    pub fn publish_weights(&mut self) -> Result<(), ZeroError> {
        let pr = self.part_rank();
        for b in &self.layout.buckets {
            let mut dst = self.model_flat.narrow(0, (b.flat_offset + pr * b.shard) as i64, b.shard as i64);
            dst.copy_(&self.master.narrow(0, b.shard_offset as i64, b.shard as i64));
        }
        if self.layout.parts > 1 {
            self.comm.wait_compute()?;
            for b in &self.layout.buckets {
                self.comm.all_gather_in_place(&self.model_flat.narrow(0, b.flat_offset as i64, b.padded as i64))?;
            }
            self.comm.wait_comm()?;
        }
        Ok(())
    }

    /// Loss of `x` -> `y` on this rank, without gradients.
    pub fn eval_loss(&self, x: &Tensor, y: &Tensor) -> f64 {
        tch::no_grad(|| Gpt::loss(&self.model.forward(x), y).double_value(&[]))
    }
}
