//! AdamW on one flat fp32 shard, gradient-norm clipping helpers, and the learning-rate schedules
//! (nanoGPT's `get_lr`, DeepSpeed's WarmupLR / WarmupDecayLR / WarmupCosineLR).
//!
//! The ZeRO trainer keeps a rank's fp32 master weights, gradient and both Adam moments as flat
//! 1-D tensors of the same size. Parameters occupy known ranges (segments) of that flat, the rest
//! is padding. The update is elementwise, so it runs on the whole flat at once; only the
//! decoupled weight decay looks at segments (nanoGPT decays parameters of two or more dims).
//!
//! The step is libtorch's `_fused_adamw_`, the kernel of torch.optim.AdamW(fused=True): one pass
//! that reads p, g, m, v and writes p, m, v. The sequence of whole-flat ops it replaces makes ten
//! (44.6 ms of a 238 ms GPT-2 XL step on an H200, where torch's fused AdamW takes about 9 on the
//! same 1.56B parameters). tch 0.24 exposes neither it nor the `_foreach_*` ops, so build.rs
//! compiles a small C++ shim, lib/optim/fused_adamw.cpp, against libtorch's headers. The op takes
//! lists of tensors and one weight decay per call: the flats go in as views, the decaying runs
//! in one call with the decay folded in (no separate pass over the weights), the rest (1-D
//! parameters, padding) in a second call without. The views are cut once and reused.
//!
//! The unfused path stays as the fallback for a device whose backend registers no fused kernel
//! (libtorch has one for CPU and, once lib/device.rs has loaded libtorch_cuda.so, for CUDA), and
//! as the reference in tests. It runs the same ops and scalars as PyTorch's single-tensor
//! `torch.optim.AdamW` (`foreach=False, fused=False`), in chunks so that two bounded scratch
//! buffers replace PyTorch's full-size `denom` temporary; on the CPU that made the fixtures it is
//! bitwise equal to torch's. The fused path is bitwise equal there to torch's fused CPU kernel,
//! which differs from the single-tensor path by an ulp here and there (its second-moment
//! multiply-add is contracted to an fma). torch's own CPU results also differ by an ulp between
//! hosts (152 of 23k values on an H100 host), and on CUDA kernels contract to fma and the fused
//! kernel decays in double, so tests/optim.rs holds both paths to 1e-6 relative of torch and the
//! fused path to 2.5e-7 (parameters) and 5e-7 (moments) of the unfused one.

mod fused;

use crate::kernels::{AdamWScalars, PieceTable};
use fused::{FusedError, FusedViews};
use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

#[derive(Debug, thiserror::Error)]
pub enum OptimError {
    #[error("AdamW: {0}")]
    Config(String),
    #[error("AdamW segment {index} [{start}, {end}) lies outside the shard of {numel} elements")]
    SegmentOutOfRange { index: usize, start: usize, end: usize, numel: usize },
    #[error("AdamW segments [{a_start}, {a_end}) and [{b_start}, {b_end}) overlap")]
    SegmentOverlap { a_start: usize, a_end: usize, b_start: usize, b_end: usize },
    #[error("AdamW {what}: expected a 1-D fp32 tensor of {numel} elements on {device:?}, got {got}")]
    BadTensor { what: &'static str, numel: usize, device: Device, got: String },
    #[error("AdamW step: learning rate {0} is not a finite non-negative number")]
    BadLr(f64),
    #[error("learning-rate schedule: {0}")]
    Schedule(String),
    #[error("libtorch: {0}")]
    Torch(#[from] tch::TchError),
    #[error("AdamW fused step (libtorch _fused_adamw_): {0}")]
    Fused(String),
    #[error("AdamW step (zerokit's kernel): {0}")]
    Kernel(String),
}

/// torch.optim.AdamW's hyper-parameters. `lr` is the base learning rate; `AdamW::step` takes the
/// schedule's value for each step.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct AdamWConfig {
    pub lr: f64,
    pub betas: (f64, f64),
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    /// nanoGPT's GPT-2 values.
    fn default() -> Self {
        AdamWConfig { lr: 6e-4, betas: (0.9, 0.95), eps: 1e-8, weight_decay: 0.1 }
    }
}

impl AdamWConfig {
    /// The checks torch.optim.AdamW makes at construction.
    pub fn validate(&self) -> Result<(), OptimError> {
        let bad = |m: String| Err(OptimError::Config(m));
        let (b1, b2) = self.betas;
        if !(self.lr >= 0.0 && self.lr.is_finite()) {
            return bad(format!("invalid learning rate {}", self.lr));
        }
        if !(self.eps >= 0.0 && self.eps.is_finite()) {
            return bad(format!("invalid epsilon {}", self.eps));
        }
        if !(0.0..1.0).contains(&b1) || !(0.0..1.0).contains(&b2) {
            return bad(format!("invalid betas ({b1}, {b2}): each must be in [0, 1)"));
        }
        if !(self.weight_decay >= 0.0 && self.weight_decay.is_finite()) {
            return bad(format!("invalid weight decay {}", self.weight_decay));
        }
        Ok(())
    }
}

/// A range of the flat shard that belongs to one parameter (or the part of it this rank owns).
/// `decay`: the parameter has two or more dims (nanoGPT's grouping: matmul weights and
/// embeddings decay, biases and layer-norm gains do not). Padding belongs to no segment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Segment {
    pub start: usize,
    pub len: usize,
    pub decay: bool,
}

/// Elements per chunk of the unfused update: two scratch buffers of this size (256 MiB each)
/// replace PyTorch's full-size temporaries (1.5 GiB for a GPT-2 XL quarter shard). Smaller
/// chunks made the step launch-bound on an H100 (2M elements: 17.6 ms for 389M elements; 16M:
/// 15.9 ms). The fused path needs no scratch; it cuts its views at the same length, which keeps
/// every tensor's element count far inside the 32-bit counts of CUDA's multi-tensor kernels
/// (some torch versions hold them in an `int`).
const CHUNK: usize = 1 << 26;

/// Which implementation runs `AdamW::step`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AdamWKernel {
    /// libtorch's `_fused_adamw_` through lib/optim/fused_adamw.cpp (the default).
    Fused,
    /// torch's single-tensor AdamW as a sequence of whole-flat ops: the fallback for a device
    /// without a fused kernel, and the reference the fused path is tested against.
    Unfused,
}

/// AdamW state for one flat fp32 shard: both moments on the shard's device and the step count.
pub struct AdamW {
    cfg: AdamWConfig,
    numel: usize,
    device: Device,
    segments: Vec<Segment>,
    /// Maximal runs of adjacent decaying segments: one weight-decay kernel per run.
    decay_runs: Vec<(usize, usize)>,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    step: u64,
    kernel: AdamWKernel,
    /// Elements per chunk (unfused) and per view (fused).
    chunk: usize,
    /// The fused path's pieces as (start, len): the decay runs, and everything else.
    decay_pieces: Vec<(usize, usize)>,
    plain_pieces: Vec<(usize, usize)>,
    /// The fused kernel's step count and gradient scale, fp32 0-dim tensors on the device.
    step_tensor: Option<(Tensor, Tensor)>,
    fused_views: Option<FusedViews>,
    scratch: Option<(Tensor, Tensor)>,
}

impl std::fmt::Debug for AdamW {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdamW")
            .field("cfg", &self.cfg)
            .field("numel", &self.numel)
            .field("device", &self.device)
            .field("segments", &self.segments.len())
            .field("step", &self.step)
            .field("kernel", &self.kernel)
            .finish()
    }
}

fn check_scalars(lr: f64, grad_scale: f64) -> Result<(), OptimError> {
    if !(lr >= 0.0 && lr.is_finite()) {
        return Err(OptimError::BadLr(lr));
    }
    if !(grad_scale > 0.0 && grad_scale.is_finite()) {
        return Err(OptimError::Config(format!("gradient scale {grad_scale} is not a finite positive number")));
    }
    Ok(())
}

fn check_flat(what: &'static str, t: &Tensor, numel: usize, device: Device) -> Result<(), OptimError> {
    let ok = t.dim() == 1
        && t.size()[0] as usize == numel
        && t.kind() == Kind::Float
        && t.device() == device
        && t.is_contiguous();
    if ok {
        Ok(())
    } else {
        let got = format!(
            "{:?} {:?} on {:?}{}",
            t.kind(),
            t.size(),
            t.device(),
            if t.is_contiguous() { "" } else { " (not contiguous)" }
        );
        Err(OptimError::BadTensor { what, numel, device, got })
    }
}

impl AdamW {
    /// Zero moments for a shard of `numel` elements on `device`. Segments may come in any order
    /// but must lie inside the shard and must not overlap.
    pub fn new(numel: usize, mut segments: Vec<Segment>, cfg: AdamWConfig, device: Device) -> Result<Self, OptimError> {
        cfg.validate()?;
        for (index, s) in segments.iter().enumerate() {
            let end = s.start.checked_add(s.len).filter(|&e| e <= numel);
            if end.is_none() {
                let end = s.start.saturating_add(s.len);
                return Err(OptimError::SegmentOutOfRange { index, start: s.start, end, numel });
            }
        }
        segments.sort_by_key(|s| s.start);
        for w in segments.windows(2) {
            if w[0].start + w[0].len > w[1].start {
                return Err(OptimError::SegmentOverlap {
                    a_start: w[0].start,
                    a_end: w[0].start + w[0].len,
                    b_start: w[1].start,
                    b_end: w[1].start + w[1].len,
                });
            }
        }
        let mut decay_runs: Vec<(usize, usize)> = Vec::new();
        for s in segments.iter().filter(|s| s.decay && s.len > 0) {
            match decay_runs.last_mut() {
                Some((start, len)) if *start + *len == s.start => *len += s.len,
                _ => decay_runs.push((s.start, s.len)),
            }
        }
        let opts = (Kind::Float, device);
        let n = numel as i64;
        let mut opt = AdamW {
            cfg,
            numel,
            device,
            segments,
            decay_runs,
            exp_avg: Tensor::f_zeros([n], opts)?,
            exp_avg_sq: Tensor::f_zeros([n], opts)?,
            step: 0,
            kernel: AdamWKernel::Fused,
            chunk: CHUNK,
            decay_pieces: Vec::new(),
            plain_pieces: Vec::new(),
            step_tensor: None,
            fused_views: None,
            scratch: None,
        };
        opt.cut_pieces();
        Ok(opt)
    }

    /// The fused path's views: decay runs and the gaps between them (1-D parameters, padding),
    /// each cut into pieces of at most `chunk` elements.
    fn cut_pieces(&mut self) {
        let chunk = self.chunk;
        let cut = |out: &mut Vec<(usize, usize)>, start: usize, len: usize| {
            let mut o = 0;
            while o < len {
                let l = chunk.min(len - o);
                out.push((start + o, l));
                o += l;
            }
        };
        let (mut decay, mut plain) = (Vec::new(), Vec::new());
        let mut pos = 0;
        for &(start, len) in &self.decay_runs {
            cut(&mut plain, pos, start - pos);
            cut(&mut decay, start, len);
            pos = start + len;
        }
        cut(&mut plain, pos, self.numel - pos);
        self.decay_pieces = decay;
        self.plain_pieces = plain;
        self.fused_views = None;
    }

    /// The implementation the next step uses: `Fused` unless set otherwise or unless the fused
    /// op turned out to have no kernel for this device.
    pub fn kernel(&self) -> AdamWKernel {
        self.kernel
    }

    pub fn set_kernel(&mut self, kernel: AdamWKernel) {
        self.kernel = kernel;
        if kernel == AdamWKernel::Unfused {
            self.fused_views = None;
        }
    }

    /// Elements per chunk of the update (default 2^26): bounds the unfused path's scratch
    /// buffers and the fused path's views. Tests use small values to cross chunk boundaries.
    pub fn set_chunk_len(&mut self, chunk: usize) -> Result<(), OptimError> {
        if chunk == 0 {
            return Err(OptimError::Config(format!("chunk length {chunk} must be positive")));
        }
        self.chunk = chunk;
        self.cut_pieces();
        Ok(())
    }

    /// One AdamW step at learning rate `lr` on the whole shard, with torch.optim.AdamW's
    /// semantics: `p *= 1 - lr*wd` on decaying segments, `m = lerp(m, g, 1-b1)`,
    /// `v = b2*v + (1-b2)*g*g`, `p -= lr/(1-b1^t) * m / (sqrt(v)/sqrt(1-b2^t) + eps)`.
    /// `grad` is the unscaled, clipped fp32 gradient shard. Padding elements are updated like
    /// the others (they are never read), so their gradient must be finite (zero). The fused path
    /// keeps its views of `params` and `grad` (and so keeps them allocated) for the next step,
    /// which reuses them when it gets the same flats, as the engine's steps do.
    pub fn step(&mut self, params: &mut Tensor, grad: &Tensor, lr: f64) -> Result<(), OptimError> {
        self.step_scaled(params, grad, lr, 1.0)
    }

    /// [`step`](Self::step) on `grad / grad_scale`, which is never formed: the fused kernel
    /// divides as it reads (torch's `grad_scale` argument), so the engine's unscale and clip
    /// cost no pass of their own over the gradient. `grad` may be left divided.
    pub fn step_scaled(
        &mut self,
        params: &mut Tensor,
        grad: &Tensor,
        lr: f64,
        grad_scale: f64,
    ) -> Result<(), OptimError> {
        check_flat("parameter shard", params, self.numel, self.device)?;
        check_flat("gradient shard", grad, self.numel, self.device)?;
        check_scalars(lr, grad_scale)?;
        tch::no_grad(|| self.step_inner(params, grad, lr, grad_scale))
    }

    /// [`step_scaled`](Self::step_scaled) by zerokit's kernel (lib/kernels/adamw.cu) on the GPU,
    /// over the pieces of `table`: each reads its gradient where it lies (the model's own 16-bit
    /// gradients need no fp32 copy) and writes its updated weights into the model's
    /// compute-dtype tensors in the same pass. The pieces say which elements decay; elements of
    /// no piece (padding) are left as they are. Ok(false): the kernel is not available for this
    /// device (a CPU, or NVRTC missing) and nothing changed; the caller then takes the libtorch
    /// path.
    pub fn step_pieces(
        &mut self,
        params: &mut Tensor,
        table: &PieceTable,
        lr: f64,
        grad_scale: f64,
    ) -> Result<bool, OptimError> {
        check_flat("parameter shard", params, self.numel, self.device)?;
        check_scalars(lr, grad_scale)?;
        let AdamWConfig { betas, eps, weight_decay, .. } = self.cfg;
        let scalars = AdamWScalars { lr, betas, eps, weight_decay, step: self.step + 1, grad_scale };
        let ran = crate::kernels::adamw(table, params, &self.exp_avg, &self.exp_avg_sq, &scalars)
            .map_err(|e| OptimError::Kernel(e.to_string()))?;
        if ran {
            self.step += 1;
        }
        Ok(ran)
    }

    fn step_inner(&mut self, params: &Tensor, grad: &Tensor, lr: f64, grad_scale: f64) -> Result<(), OptimError> {
        self.step += 1;
        if self.kernel == AdamWKernel::Fused {
            match self.step_fused(params, grad, lr, grad_scale) {
                Ok(()) => return Ok(()),
                Err(FusedError::NoKernel(msg)) => {
                    tracing::warn!(
                        "AdamW: libtorch has no fused kernel for {:?} ({msg}); using the unfused path",
                        self.device
                    );
                    self.set_kernel(AdamWKernel::Unfused);
                }
                Err(FusedError::Torch(msg)) => return Err(OptimError::Fused(msg)),
            }
        }
        if grad_scale != 1.0 {
            let _ = grad.shallow_clone().f_div_scalar_(grad_scale)?;
        }
        self.step_unfused(params, grad, lr)
    }

    fn step_fused(&mut self, params: &Tensor, grad: &Tensor, lr: f64, grad_scale: f64) -> Result<(), FusedError> {
        if !self.fused_views.as_ref().is_some_and(|v| v.cut_from(params, grad)) {
            // Dropped first: the old views keep the previous flats allocated.
            self.fused_views = None;
            let flats = [params, grad, &self.exp_avg, &self.exp_avg_sq];
            self.fused_views = Some(FusedViews::cut(flats, &self.decay_pieces, &self.plain_pieces)?);
        }
        let (step_tensor, scale_tensor) = match &mut self.step_tensor {
            Some(t) => t,
            None => {
                let opts = (Kind::Float, self.device);
                self.step_tensor.insert((Tensor::f_zeros([], opts)?, Tensor::f_ones([], opts)?))
            }
        };
        // torch keeps the step of the fused op in an fp32 tensor, as here: exact to 2^24 steps.
        let _ = step_tensor.f_fill_(self.step as f64)?;
        // No scale is no division: a step without one is bit for bit the plain step.
        let scale = if grad_scale == 1.0 {
            None
        } else {
            let _ = scale_tensor.f_fill_(grad_scale)?;
            Some(&*scale_tensor)
        };
        let AdamWConfig { betas, eps, weight_decay, .. } = self.cfg;
        let views = self.fused_views.as_ref().expect("cut above");
        views.run(step_tensor, lr, betas, weight_decay, eps, scale)
    }

    // libtorch's in-place ops also return a handle to their output, which is not needed here.
    #[allow(unused_must_use)]
    fn step_unfused(&mut self, params: &Tensor, grad: &Tensor, lr: f64) -> Result<(), OptimError> {
        let AdamWConfig { betas: (b1, b2), eps, weight_decay, .. } = self.cfg;
        // Every scalar below is computed in f64 exactly as torch/optim/adam.py computes it in
        // Python floats, so libtorch receives the same scalars and rounds the same way.
        if weight_decay != 0.0 {
            let factor = 1.0 - lr * weight_decay;
            for &(start, len) in &self.decay_runs {
                params.f_narrow(0, start as i64, len as i64)?.f_mul_scalar_(factor)?;
            }
        }
        let t = self.step as f64;
        let bias_correction1 = 1.0 - b1.powf(t);
        let bias_correction2 = 1.0 - b2.powf(t);
        let step_size = lr / bias_correction1;
        let bias_correction2_sqrt = bias_correction2.powf(0.5);

        if self.numel == 0 {
            return Ok(());
        }
        let chunk = self.chunk.min(self.numel);
        if self.scratch.as_ref().map(|(a, _)| a.size()[0] as usize) != Some(chunk) {
            let opts = (Kind::Float, self.device);
            self.scratch = Some((Tensor::f_empty([chunk as i64], opts)?, Tensor::f_empty([chunk as i64], opts)?));
        }
        let (s1, s2) = self.scratch.as_ref().expect("allocated above");
        let mut start = 0usize;
        while start < self.numel {
            let len = chunk.min(self.numel - start);
            let (o, l) = (start as i64, len as i64);
            let mut p = params.f_narrow(0, o, l)?;
            let g = grad.f_narrow(0, o, l)?;
            let mut m = self.exp_avg.f_narrow(0, o, l)?;
            let mut v = self.exp_avg_sq.f_narrow(0, o, l)?;
            let mut denom = s1.f_narrow(0, 0, l)?;
            let scaled = s2.f_narrow(0, 0, l)?;

            m.f_lerp_(&g, 1.0 - b1)?;
            // torch: v.mul_(b2).addcmul_(g, g, value=1-b2). addcmul computes
            // v + (value*g)*g; tch has no `value` argument, so (value*g) is formed first.
            v.f_mul_scalar_(b2)?;
            g.f_mul_scalar_out(&scaled, 1.0 - b2)?;
            v.f_addcmul_(&scaled, &g)?;
            // torch: denom = (v.sqrt() / bias_correction2_sqrt).add_(eps)
            v.f_sqrt_out(&denom)?;
            denom.f_div_scalar_(bias_correction2_sqrt)?;
            denom.f_add_scalar_(eps)?;
            // torch: p.addcdiv_(m, denom, value=-step_size), i.e. p + (value*m)/denom.
            m.f_mul_scalar_out(&scaled, -step_size)?;
            p.f_addcdiv_(&scaled, &denom)?;
            start += len;
        }
        Ok(())
    }

    /// The moments and the step count, for checkpoints.
    pub fn state(&self) -> (&Tensor, &Tensor, u64) {
        (&self.exp_avg, &self.exp_avg_sq, self.step)
    }

    /// Restores moments (copied to this shard's device) and the step count from a checkpoint.
    pub fn load_state(&mut self, exp_avg: &Tensor, exp_avg_sq: &Tensor, step: u64) -> Result<(), OptimError> {
        for (what, t) in [("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq)] {
            if t.dim() != 1 || t.size()[0] as usize != self.numel || t.kind() != Kind::Float {
                let got = format!("{:?} {:?}", t.kind(), t.size());
                return Err(OptimError::BadTensor { what, numel: self.numel, device: self.device, got });
            }
        }
        tch::no_grad(|| -> Result<(), OptimError> {
            self.exp_avg.f_copy_(exp_avg)?;
            self.exp_avg_sq.f_copy_(exp_avg_sq)?;
            Ok(())
        })?;
        self.step = step;
        Ok(())
    }
}

/// This rank's contribution to the squared global gradient norm: the sum of squares of its
/// shard, as a 0-dim fp64 tensor on the shard's device (no host sync). Ranks all-reduce (sum)
/// it, then `sqrt` gives the global norm. A non-finite result means some gradient element is
/// inf/nan, so the same reduction doubles as the overflow check. Padding must be zero.
pub fn local_grad_norm_sq(grad: &Tensor) -> Result<Tensor, OptimError> {
    sum_of_squares(grad, DOT_MAX_ELEMS)
}

/// The most elements one BLAS dot product takes: cuBLAS counts in 32-bit ints (libtorch refuses
/// n >= 2^31 on CUDA), which a 2.6B-parameter model's flat gradient exceeds at stage 0.
pub const DOT_MAX_ELEMS: i64 = 1 << 30;

/// The sum of squares of a flat tensor as a 0-dim fp64 tensor on its device: BLAS dot products
/// (fp32, blocked accumulation; they read the gradient once with no temporary, measured 10x
/// faster than a norm reduction on the GPU) over pieces of at most `chunk` elements, summed in
/// fp64.
pub fn sum_of_squares(flat: &Tensor, chunk: i64) -> Result<Tensor, OptimError> {
    let flat = flat.f_view([-1])?;
    let n = flat.size()[0];
    let mut total = Tensor::f_zeros([], (Kind::Double, flat.device()))?;
    let mut start = 0;
    while start < n {
        let piece = flat.f_narrow(0, start, chunk.min(n - start))?;
        total = total.f_add(&piece.f_dot(&piece)?.f_to_kind(Kind::Double)?)?;
        start += chunk;
    }
    Ok(total)
}

/// torch.nn.utils.clip_grad_norm_'s factor: `max_norm / (total_norm + 1e-6)` clamped to 1.
/// Multiply the gradient by it (fold in `1/loss_scale` as well under fp16: one pass).
pub fn clip_coef(total_norm: f64, max_norm: f64) -> f64 {
    (max_norm / (total_norm + 1e-6)).min(1.0)
}

/// How the learning rate rises at the start of DeepSpeed's warm-up schedulers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum WarmupType {
    #[default]
    Log,
    Linear,
}

/// nanoGPT's decay after warm-up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Decay {
    /// nanoGPT's `get_lr`: cosine from `max_lr` to `min_lr`.
    #[default]
    Cosine,
    /// Same warm-up, then a straight line from `max_lr` to `min_lr`.
    Linear,
    /// nanoGPT with `decay_lr = False`: `max_lr` at every step, no warm-up.
    Constant,
}

/// A learning-rate schedule. `lr(it)` is the rate for the optimizer step with index `it`
/// (0 for the first step).
///
/// For nanoGPT `it` is `iter_num`. For the DeepSpeed schedulers it is the number of steps
/// applied so far: DeepSpeed steps its scheduler only after a step that was not skipped for
/// fp16 overflow, and the step with index `it` runs at the rate the scheduler computes for
/// `last_batch_iteration = it - 1` (so the very first step runs at `warmup_min_lr`, or at 0
/// for WarmupCosineLR, as in DeepSpeed).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type")]
pub enum LrSchedule {
    /// nanoGPT train.py: linear warm-up `max_lr * (it+1)/(warmup_iters+1)`, then `decay` to
    /// `min_lr` at `lr_decay_iters`, `min_lr` after.
    NanoGpt { warmup_iters: u64, lr_decay_iters: u64, max_lr: f64, min_lr: f64, decay: Decay },
    /// deepspeed.runtime.lr_schedules.WarmupLR.
    WarmupLR { warmup_min_lr: f64, warmup_max_lr: f64, warmup_num_steps: u64, warmup_type: WarmupType },
    /// deepspeed.runtime.lr_schedules.WarmupDecayLR.
    WarmupDecayLR {
        total_num_steps: u64,
        warmup_min_lr: f64,
        warmup_max_lr: f64,
        warmup_num_steps: u64,
        warmup_type: WarmupType,
    },
    /// deepspeed.runtime.lr_schedules.WarmupCosineLR; `lr` is the optimizer's base rate, which
    /// this scheduler multiplies by a ratio.
    WarmupCosineLR {
        lr: f64,
        total_num_steps: u64,
        warmup_min_ratio: f64,
        warmup_num_steps: u64,
        cos_min_ratio: f64,
        warmup_type: WarmupType,
    },
}

impl LrSchedule {
    /// Rejects what would make the schedule meaningless (negative or non-finite rates, a zero
    /// warm-up where DeepSpeed raises).
    pub fn validate(&self) -> Result<(), OptimError> {
        let finite_nonneg = |name: &str, x: f64| {
            if x >= 0.0 && x.is_finite() {
                Ok(())
            } else {
                Err(OptimError::Schedule(format!("{name} = {x} must be a finite non-negative number")))
            }
        };
        match *self {
            LrSchedule::NanoGpt { max_lr, min_lr, .. } => {
                finite_nonneg("max_lr", max_lr)?;
                finite_nonneg("min_lr", min_lr)
            }
            LrSchedule::WarmupLR { warmup_min_lr, warmup_max_lr, warmup_num_steps, .. }
            | LrSchedule::WarmupDecayLR { warmup_min_lr, warmup_max_lr, warmup_num_steps, .. } => {
                finite_nonneg("warmup_min_lr", warmup_min_lr)?;
                finite_nonneg("warmup_max_lr", warmup_max_lr)?;
                positive_steps(warmup_num_steps)
            }
            LrSchedule::WarmupCosineLR { lr, warmup_min_ratio, cos_min_ratio, warmup_num_steps, .. } => {
                finite_nonneg("lr", lr)?;
                finite_nonneg("warmup_min_ratio", warmup_min_ratio)?;
                finite_nonneg("cos_min_ratio", cos_min_ratio)?;
                positive_steps(warmup_num_steps)
            }
        }
    }

    /// The learning rate of the optimizer step with index `it`.
    pub fn lr(&self, it: u64) -> f64 {
        match *self {
            LrSchedule::NanoGpt { warmup_iters, lr_decay_iters, max_lr, min_lr, decay } => {
                nanogpt_lr(it, warmup_iters, lr_decay_iters, max_lr, min_lr, decay)
            }
            LrSchedule::WarmupLR { warmup_min_lr, warmup_max_lr, warmup_num_steps, warmup_type } => {
                let Some(last) = it.checked_sub(1) else { return warmup_min_lr };
                let gamma = ds_warmup_gamma(last, warmup_num_steps, warmup_type).unwrap_or(1.0);
                warmup_min_lr + (warmup_max_lr - warmup_min_lr) * gamma
            }
            LrSchedule::WarmupDecayLR {
                total_num_steps,
                warmup_min_lr,
                warmup_max_lr,
                warmup_num_steps,
                warmup_type,
            } => {
                let Some(last) = it.checked_sub(1) else { return warmup_min_lr };
                let warmup = warmup_num_steps.max(2);
                let gamma = ds_warmup_gamma(last, warmup_num_steps, warmup_type).unwrap_or_else(|| {
                    let num = total_num_steps as f64 - last as f64;
                    let den = (total_num_steps as f64 - warmup as f64).max(1.0);
                    (num / den).max(0.0)
                });
                warmup_min_lr + (warmup_max_lr - warmup_min_lr) * gamma
            }
            LrSchedule::WarmupCosineLR {
                lr,
                total_num_steps,
                warmup_min_ratio,
                warmup_num_steps,
                cos_min_ratio,
                warmup_type,
            } => {
                let Some(last) = it.checked_sub(1) else { return 0.0 };
                let warmup = warmup_num_steps.max(2);
                let ratio = match ds_warmup_gamma(last, warmup_num_steps, warmup_type) {
                    Some(r) => warmup_min_ratio + r * (1.0 - warmup_min_ratio),
                    None => {
                        let real_last_step = (last - warmup + 1) as f64;
                        let real_total_steps = (total_num_steps as i128 - warmup as i128).max(1) as f64;
                        let progress = (real_last_step / real_total_steps).min(1.0);
                        let r = (1.0 + (std::f64::consts::PI * progress).cos()) / 2.0;
                        (cos_min_ratio + (1.0 - cos_min_ratio) * r).max(0.0)
                    }
                };
                lr * ratio
            }
        }
    }
}

fn positive_steps(n: u64) -> Result<(), OptimError> {
    if n == 0 {
        return Err(OptimError::Schedule("warmup_num_steps must be a positive integer".into()));
    }
    Ok(())
}

fn nanogpt_lr(it: u64, warmup_iters: u64, lr_decay_iters: u64, max_lr: f64, min_lr: f64, decay: Decay) -> f64 {
    if decay == Decay::Constant {
        return max_lr;
    }
    if it < warmup_iters {
        return max_lr * (it + 1) as f64 / (warmup_iters + 1) as f64;
    }
    // nanoGPT divides by zero when lr_decay_iters == warmup_iters; there is nothing to decay.
    if it > lr_decay_iters || lr_decay_iters <= warmup_iters {
        return min_lr;
    }
    let decay_ratio = (it - warmup_iters) as f64 / (lr_decay_iters - warmup_iters) as f64;
    let coeff = match decay {
        Decay::Cosine => 0.5 * (1.0 + (std::f64::consts::PI * decay_ratio).cos()),
        _ => 1.0 - decay_ratio,
    };
    min_lr + coeff * (max_lr - min_lr)
}

/// DeepSpeed's warm-up factor at `last_batch_iteration`, or None once warm-up is over.
/// DeepSpeed raises the warm-up length to at least 2 (log(1) would be 0).
fn ds_warmup_gamma(last: u64, warmup_num_steps: u64, kind: WarmupType) -> Option<f64> {
    let warmup = warmup_num_steps.max(2);
    if last >= warmup {
        return None;
    }
    Some(match kind {
        WarmupType::Log => (1.0 / (warmup as f64).ln()) * ((last + 1) as f64).ln(),
        WarmupType::Linear => last as f64 / warmup as f64,
    })
}
