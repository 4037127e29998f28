//! The launches of adamw.cu: AdamW over pieces of a rank's partition, reading each piece's
//! gradient where it is (the model's 16-bit gradients, or the fp32 gradient partition) and
//! writing the model's weights in the same pass; and the sum of squares of those gradients.
//!
//! The reference is libtorch's `_fused_adamw_` (lib/optim.rs's default path), which the
//! kernel follows operation for operation; tests/kernels.rs compares the two on the GPU.

use super::{kernel_params, kernels_for, launch};
use std::marker::PhantomData;
use tch::{Device, Kind, TchError, Tensor};

/// adamw.cu's ADAMW_FIELDS, ADAMW_CHUNK and ADAMW_THREADS.
const FIELDS: usize = 6;
const CHUNK: usize = 8192;
const THREADS: u32 = 256;

/// `len` elements (the piece's) of a contiguous tensor, from element `offset`.
#[derive(Clone, Copy)]
pub struct Span<'a> {
    pub tensor: &'a Tensor,
    pub offset: usize,
}

/// A contiguous range `[start, start + len)` of the optimizer's flats (fp32 master weights and
/// both moments), where its gradient is and where its updated weights go in the compute dtype.
#[derive(Clone, Copy)]
pub struct AdamWPiece<'a> {
    pub start: usize,
    pub len: usize,
    pub grad: Span<'a>,
    pub weight: Option<Span<'a>>,
    /// Weight decay applies to the piece.
    pub decay: bool,
}

/// One step's hyper-parameters, as torch.optim.AdamW takes them; `step` counts from 1, and the
/// gradient is divided by `grad_scale` as it is read.
#[derive(Debug, Clone, Copy)]
pub struct AdamWScalars {
    pub lr: f64,
    pub betas: (f64, f64),
    pub eps: f64,
    pub weight_decay: f64,
    pub step: u64,
    pub grad_scale: f64,
}

/// adamw.cu's AdamWArgs, field for field.
#[repr(C)]
struct AdamWArgs {
    lr: f32,
    beta1: f32,
    beta2: f32,
    weight_decay: f32,
    eps: f32,
    step: f32,
    grad_scale: f32,
    scaled: i32,
}

impl AdamWScalars {
    /// torch's fused CUDA kernel rounds its hyper-parameters to fp32 and keeps the step count
    /// as an fp32 value (exact to 2^24 steps); likewise here.
    fn args(&self) -> AdamWArgs {
        AdamWArgs {
            lr: self.lr as f32,
            beta1: self.betas.0 as f32,
            beta2: self.betas.1 as f32,
            weight_decay: self.weight_decay as f32,
            eps: self.eps as f32,
            step: self.step as f32,
            grad_scale: self.grad_scale as f32,
            scaled: i32::from(self.grad_scale != 1.0),
        }
    }
}

/// The pieces as the kernels read them: adamw.cu's table, checked against the pieces'
/// tensors and on its way to the device. It borrows those tensors (`'a`), whose addresses it
/// holds, so it cannot outlive them; one table serves a step's gradient norm and its update.
pub struct PieceTable<'a> {
    /// The table in device memory (on the host for a CPU).
    table: Tensor,
    pieces: i32,
    blocks: u32,
    grad_kind: Kind,
    weight_kind: Option<Kind>,
    /// One past the last element of the flats any piece reaches.
    end: usize,
    device: Device,
    _tensors: PhantomData<&'a Tensor>,
}

fn bad(msg: String) -> TchError {
    TchError::Kind(format!("AdamW kernel pieces: {msg}"))
}

/// What `address` learnt of the last tensor it checked.
struct Seen {
    tensor: *const Tensor,
    numel: usize,
    base: i64,
}

/// The address of a span's first element, after checking that the span lies inside its
/// tensor, which is contiguous, on `device`, and of the kind the other pieces have. Each
/// tensor is checked once: consecutive pieces usually share one (the gradient partition, the
/// flat weights), and each check is a call into libtorch.
fn address(
    span: Span,
    len: usize,
    device: Device,
    kind: &mut Option<Kind>,
    seen: &mut Option<Seen>,
) -> Result<i64, TchError> {
    let t = span.tensor;
    if seen.as_ref().is_none_or(|s| !std::ptr::eq(s.tensor, t)) {
        let k = t.kind();
        if let Some(first) = *kind {
            if first != k {
                return Err(bad(format!("{k:?} beside {first:?}")));
            }
        }
        *kind = Some(k);
        if t.device() != device || !t.is_contiguous() {
            return Err(bad(format!(
                "a tensor on {:?} (contiguous: {}), not a contiguous one on {device:?}",
                t.device(),
                t.is_contiguous()
            )));
        }
        *seen = Some(Seen { tensor: t, numel: t.numel(), base: t.data_ptr() as i64 });
    }
    let s = seen.as_ref().expect("set above");
    if span.offset.checked_add(len).is_none_or(|e| e > s.numel) {
        return Err(bad(format!("[{}, +{len}) of a tensor of {} elements", span.offset, s.numel)));
    }
    let elem = kind.expect("set above").elt_size_in_bytes();
    Ok(s.base + (span.offset * elem) as i64)
}

impl<'a> PieceTable<'a> {
    /// Checks the pieces (each span inside its tensor, contiguous, on `device`; one gradient
    /// kind and one weight kind; pieces in order without overlap) and sends the table to the
    /// device. The copy comes from page-locked memory and does not wait: built while the device
    /// still runs the backward, the table is there when the step needs it.
    pub fn new(pieces: &[AdamWPiece<'a>], device: Device) -> Result<PieceTable<'a>, TchError> {
        let mut host = Vec::with_capacity(pieces.len() * FIELDS);
        let (mut grad_kind, mut weight_kind) = (None, None);
        let (mut grad_seen, mut weight_seen) = (None, None);
        let (mut blocks, mut end, mut count) = (0usize, 0usize, 0usize);
        for p in pieces.iter().filter(|p| p.len > 0) {
            if p.start < end {
                return Err(bad(format!("piece at {} overlaps or precedes the one ending at {end}", p.start)));
            }
            let grad = address(p.grad, p.len, device, &mut grad_kind, &mut grad_seen)?;
            let weight = match p.weight {
                Some(w) => address(w, p.len, device, &mut weight_kind, &mut weight_seen)?,
                None => 0,
            };
            host.extend([p.start as i64, p.len as i64, grad, weight, blocks as i64, i64::from(p.decay)]);
            blocks += p.len.div_ceil(CHUNK);
            end = p.start + p.len;
            count += 1;
        }
        let blocks = u32::try_from(blocks).map_err(|_| bad(format!("{blocks} blocks")))?;
        let pieces = i32::try_from(count).map_err(|_| bad(format!("{count} pieces")))?;
        let grad_kind = grad_kind.unwrap_or(Kind::Float);
        let table = crate::zero::host::to_device_async(&Tensor::f_from_slice(&host)?, device)?;
        Ok(PieceTable { table, pieces, blocks, grad_kind, weight_kind, end, device, _tensors: PhantomData })
    }
}

/// One AdamW step over the table's pieces of the flats `params`, `exp_avg` and `exp_avg_sq`
/// (fp32, contiguous, on one GPU), writing each piece's weights where it has some. Ok(false):
/// zerokit's kernels are not available for the device (a CPU, or NVRTC missing), and nothing
/// changed.
pub fn adamw(
    table: &PieceTable,
    params: &Tensor,
    exp_avg: &Tensor,
    exp_avg_sq: &Tensor,
    s: &AdamWScalars,
) -> Result<bool, TchError> {
    let device = table.device;
    for (what, t) in [("parameters", params), ("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq)] {
        if t.kind() != Kind::Float || t.device() != device || !t.is_contiguous() || t.numel() < table.end {
            return Err(bad(format!(
                "{what} is {:?} {:?} on {:?}, not a contiguous fp32 flat of at least {} elements on {device:?}",
                t.kind(),
                t.size(),
                t.device(),
                table.end
            )));
        }
    }
    let Some(k) = kernels_for(device) else { return Ok(false) };
    if table.blocks == 0 {
        return Ok(true);
    }
    let which = match (table.grad_kind, table.weight_kind) {
        (Kind::Float, None | Some(Kind::Float)) => 0,
        (Kind::Float, Some(Kind::BFloat16)) => 1,
        (Kind::Float, Some(Kind::Half)) => 2,
        (Kind::BFloat16, None | Some(Kind::BFloat16)) => 3,
        (Kind::Half, None | Some(Kind::Half)) => 4,
        (g, w) => return Err(bad(format!("{g:?} gradients with {w:?} weights"))),
    };
    let (mut t, mut n) = (table.table.data_ptr(), table.pieces);
    let (mut p, mut m, mut v) = (params.data_ptr(), exp_avg.data_ptr(), exp_avg_sq.data_ptr());
    let mut args = s.args();
    let mut params = kernel_params![t, n, p, m, v, args];
    // SAFETY: adamw_* takes (const long long*, int, float*, float*, float*, AdamWArgs), as
    // `params`; the table's addresses were checked against their tensors, the flats against its
    // extent.
    unsafe { launch(k, k.adamw[which], (table.blocks, 1, 1), (THREADS, 1, 1), &mut params, "adamw") }
        .map_err(TchError::Kind)?;
    Ok(true)
}

/// The sum of squares of the table's gradients (divided by nothing), as a 0-dim fp64 tensor on
/// their GPU; the same bits on every run. None: zerokit's kernels are not available there.
pub fn sum_of_squares(table: &PieceTable) -> Result<Option<Tensor>, TchError> {
    let device = table.device;
    let Some(k) = kernels_for(device) else { return Ok(None) };
    if table.blocks == 0 {
        return Ok(Some(Tensor::f_zeros([], (Kind::Double, device))?));
    }
    let which = match table.grad_kind {
        Kind::Float => 0,
        Kind::BFloat16 => 1,
        Kind::Half => 2,
        g => return Err(bad(format!("{g:?} gradients"))),
    };
    let partial = Tensor::f_empty([table.blocks as i64], (Kind::Double, device))?;
    let (mut t, mut n, mut out) = (table.table.data_ptr(), table.pieces, partial.data_ptr());
    let mut params = kernel_params![t, n, out];
    // SAFETY: sumsq_* takes (const long long*, int, double*), as `params`; `partial` has a slot a
    // block.
    unsafe { launch(k, k.sumsq[which], (table.blocks, 1, 1), (THREADS, 1, 1), &mut params, "sumsq") }
        .map_err(TchError::Kind)?;
    // libtorch's full reduction adds in an order fixed by the size: deterministic.
    Ok(Some(partial.f_sum(Kind::Double)?))
}
