//! The LayerNorm kernels' launches (layernorm.cu), which ops.cpp's LayerNorm autograd function
//! calls back into: the forward (with the residual add before it folded in) and the input's
//! gradient (with the residual's gradient added). The gain's and bias's gradients come from the
//! column sums (sums.rs).

use super::{callback_error, kernel_params, kernels_for, launch, Loaded};
use std::ffi::{c_char, c_void};
use tch::Device;

extern "C" {
    /// Takes ops.cpp's `LayerNormForwardFn` and `LayerNormBackwardFn`: the launchers below, whose
    /// signatures are those types.
    fn zerokit_set_layer_norm(forward: *const c_void, backward: *const c_void);
}

/// Hands ops.cpp the LayerNorm launchers (once per process).
pub(super) fn register_layer_norm() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    // SAFETY: stores two function pointers in atomics; each launcher has the signature of its
    // ops.cpp type, parameter for parameter.
    ONCE.call_once(|| unsafe {
        zerokit_set_layer_norm(launch_layer_norm_forward as *const c_void, launch_layer_norm_backward as *const c_void)
    });
}

/// Rows per block of the LayerNorm kernels (layernorm.cu's LN_WARPS: one warp a row).
const LN_WARPS: u32 = 4;

/// The loaded kernels, the kind's index (fp32, bf16, fp16) and whether the rows can be read four
/// elements at a time, for a launch over [rows, cols] tensors at `ptrs`; Err(status) for ops.cpp.
///
/// # Safety
/// `error` must point to a writable `char*` slot.
unsafe fn prepare(
    kind: i64,
    rows: i64,
    cols: i64,
    device: i64,
    ptrs: &[*const c_void],
    error: *mut *mut c_char,
) -> Result<(&'static Loaded, usize, i32), i32> {
    let k = kernels_for(Device::Cuda(device as usize)).ok_or(1)?;
    let which = match usize::try_from(kind) {
        Ok(w) if w <= 2 && cols <= i32::MAX as i64 && (rows as u64).div_ceil(LN_WARPS as u64) <= u32::MAX as u64 => w,
        // SAFETY: the caller's slot.
        _ => return Err(unsafe { callback_error(error, format!("layer_norm: kind {kind}, {rows} x {cols}")) }),
    };
    let quad = 4 * [4, 2, 2][which];
    let vec = i32::from(cols % 4 == 0 && ptrs.iter().all(|p| (*p as usize) % quad == 0));
    Ok((k, which, vec))
}

/// Launches ln_forward: out (and sum = x + res, where res is not null) from x [rows, cols] with
/// the gain w and bias b [cols]; mean and rstd [rows] fp32. 0 launched, 1 no kernels for this
/// device (ops.cpp then runs libtorch's ops), 2 failed with a message in `*error`. Called by
/// ops.cpp, which keeps every tensor alive, contiguous and of these sizes.
#[allow(clippy::too_many_arguments)]
unsafe extern "C" fn launch_layer_norm_forward(
    kind: i64,
    x: *const c_void,
    res: *const c_void,
    sum: *mut c_void,
    w: *const c_void,
    b: *const c_void,
    out: *mut c_void,
    mean: *mut c_void,
    rstd: *mut c_void,
    rows: i64,
    cols: i64,
    eps: f64,
    device: i64,
    error: *mut *mut c_char,
) -> i32 {
    let ptrs = [x, res, sum as *const c_void, w, b, out as *const c_void];
    // SAFETY: ops.cpp passes a valid `error` slot.
    let (k, which, mut vec) = match unsafe { prepare(kind, rows, cols, device, &ptrs, error) } {
        Ok(p) => p,
        Err(status) => return status,
    };
    let (mut x, mut res, mut sum, mut w, mut b, mut out, mut mean, mut rstd) = (x, res, sum, w, b, out, mean, rstd);
    let (mut rows, mut cols, mut eps) = (rows, cols as i32, eps as f32);
    let mut params = kernel_params![x, res, sum, w, b, out, mean, rstd, rows, cols, eps, vec];
    let grid = ((rows as u64).div_ceil(LN_WARPS as u64) as u32, 1, 1);
    // SAFETY: ln_forward_* takes (const T*, const T*, T*, const T*, const T*, T*, float*, float*,
    // long long, int, float, int), matching `params`; ops.cpp sized every buffer.
    match unsafe { launch(k, k.ln_forward[which], grid, (32, LN_WARPS, 1), &mut params, "ln_forward") } {
        Ok(()) => 0,
        // SAFETY: as above.
        Err(e) => unsafe { callback_error(error, e) },
    }
}

/// Launches ln_backward: dx [rows, cols] from dy and the LayerNorm's input x (both [rows, cols]),
/// its mean and rstd [rows] and gain w [cols], plus dres where it is not null. Returns as
/// [`launch_layer_norm_forward`].
#[allow(clippy::too_many_arguments)]
unsafe extern "C" fn launch_layer_norm_backward(
    kind: i64,
    dy: *const c_void,
    x: *const c_void,
    mean: *const c_void,
    rstd: *const c_void,
    w: *const c_void,
    dres: *const c_void,
    dx: *mut c_void,
    rows: i64,
    cols: i64,
    device: i64,
    error: *mut *mut c_char,
) -> i32 {
    let ptrs = [dy, x, w, dres, dx as *const c_void];
    // SAFETY: ops.cpp passes a valid `error` slot.
    let (k, which, mut vec) = match unsafe { prepare(kind, rows, cols, device, &ptrs, error) } {
        Ok(p) => p,
        Err(status) => return status,
    };
    let (mut dy, mut x, mut mean, mut rstd, mut w, mut dres, mut dx) = (dy, x, mean, rstd, w, dres, dx);
    let (mut rows, mut cols) = (rows, cols as i32);
    let mut params = kernel_params![dy, x, mean, rstd, w, dres, dx, rows, cols, vec];
    let grid = ((rows as u64).div_ceil(LN_WARPS as u64) as u32, 1, 1);
    // SAFETY: ln_backward_* takes (const T*, const T*, const float*, const float*, const T*,
    // const T*, T*, long long, int, int), matching `params`; ops.cpp sized every buffer.
    match unsafe { launch(k, k.ln_backward[which], grid, (32, LN_WARPS, 1), &mut params, "ln_backward") } {
        Ok(()) => 0,
        // SAFETY: as above.
        Err(e) => unsafe { callback_error(error, e) },
    }
}
