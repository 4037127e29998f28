//! The widening copy's launch (widen.cu): 16-bit tensors into fp32 ones.

use super::{kernel_params, kernels_for, launch};
use tch::{Kind, TchError, Tensor};

/// Threads per block of widen, and its blocks at most (a grid-stride loop covers the rest).
const WIDEN_THREADS: u32 = 256;
const WIDEN_MAX_BLOCKS: i64 = 132 * 16;

/// `dst.copy_(src)` for a contiguous 16-bit `src` (bf16, fp16) and fp32 `dst` of the same size on
/// one GPU, by zerokit's kernel: 16-byte loads and stores where libtorch's casting copy makes
/// one element at a time. Widening is exact, so the bits are libtorch's. Elsewhere (CPU, other
/// kinds, kernels unavailable) libtorch's copy_.
pub fn widen_into(dst: &Tensor, src: &Tensor) -> Result<(), TchError> {
    let which = match src.kind() {
        Kind::BFloat16 => Some(0),
        Kind::Half => Some(1),
        _ => None,
    };
    let fits = dst.kind() == Kind::Float
        && dst.device() == src.device()
        && dst.numel() == src.numel()
        && dst.is_contiguous()
        && src.is_contiguous();
    let k = kernels_for(src.device());
    let (Some(which), true, Some(k)) = (which, fits, k) else {
        dst.shallow_clone().f_copy_(src)?;
        return Ok(());
    };
    let n = src.numel() as i64;
    if n == 0 {
        return Ok(());
    }
    let (mut s, mut d) = (src.data_ptr(), dst.data_ptr());
    let mut vec = i32::from((s as usize) % 16 == 0 && (d as usize) % 16 == 0);
    let mut n64 = n;
    let mut params = kernel_params![s, d, n64, vec];
    let blocks = (n as u64).div_ceil(8 * WIDEN_THREADS as u64).clamp(1, WIDEN_MAX_BLOCKS as u64) as u32;
    // SAFETY: widen takes (const T*, float*, long long, int), matching `params`; both tensors are
    // live, contiguous and of n elements on this device, kept alive by the caller.
    unsafe { launch(k, k.widen[which], (blocks, 1, 1), (WIDEN_THREADS, 1, 1), &mut params, "widen") }
        .map_err(TchError::Kind)
}
