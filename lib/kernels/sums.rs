//! The column-sum kernel's launch (colsum.cu), which ops.cpp calls back into for the parameter
//! gradients that are sums over rows (biases, LayerNorm gains and biases).

use super::{callback_error, kernel_params, kernels_for, launch};
use std::ffi::c_void;
use tch::Device;

extern "C" {
    /// Takes ops.cpp's `ColumnSumsFn`: `launch_column_sums` below, whose signature is that type.
    fn zerokit_set_column_sums(f: *const c_void);
}

/// Hands ops.cpp the column-sum launcher (once per process).
pub(super) fn register_column_sums() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    // SAFETY: stores a function pointer in an atomic; `launch_column_sums` has the signature of
    // ops.cpp's ColumnSumsFn, parameter for parameter.
    ONCE.call_once(|| unsafe { zerokit_set_column_sums(launch_column_sums as *const c_void) });
}

/// Columns per block and warps per block of colsum (colsum.cu's COLSUM_TILE and COLSUM_WARPS),
/// and the most column tiles one launch may have (counters allocated at load).
const COLSUM_TILE: i64 = 128;
const COLSUM_WARPS: u32 = 8;
pub(super) const COLSUM_MAX_TILES: i64 = 1 << 14;

/// Launches colsum over `chunks` chunks of `rows_per_chunk` rows into out_b (and out_g with
/// x): 0 launched, 1 no kernels for this device or too many columns (ops.cpp then runs
/// libtorch's ops), 2 failed with a message in `*error`. Called by ops.cpp from libtorch's
/// autograd thread; every pointer is device memory that ops.cpp keeps alive and sized.
unsafe extern "C" fn launch_column_sums(
    kind: i64,
    dy: *const c_void,
    x: *const c_void,
    mean: *const c_void,
    rstd: *const c_void,
    rows: i64,
    cols: i64,
    rows_per_chunk: i64,
    chunks: i64,
    part_b: *mut c_void,
    part_g: *mut c_void,
    out_b: *mut c_void,
    out_g: *mut c_void,
    device: i64,
    error: *mut *mut std::ffi::c_char,
) -> i32 {
    let Some(k) = kernels_for(Device::Cuda(device as usize)) else { return 1 };
    let tiles = (cols + COLSUM_TILE - 1) / COLSUM_TILE;
    if tiles > COLSUM_MAX_TILES {
        return 1;
    }
    // SAFETY: ops.cpp passes a valid `error` slot.
    let fail = |msg: String| unsafe { callback_error(error, msg) };
    let Ok(which) = usize::try_from(kind) else { return fail(format!("kind code {kind}")) };
    if which > 2 || chunks > i32::MAX as i64 || cols > i32::MAX as i64 {
        return fail(format!("kind {kind}, {rows} x {cols} in {chunks} chunks"));
    }
    let elem: i64 = [4, 2, 2][which];
    let aligned = |p: *const c_void| p.is_null() || (p as usize) % (4 * elem as usize) == 0;
    let mut vec = i32::from(cols % 4 == 0 && aligned(dy) && aligned(x));
    let (mut dy, mut x, mut mean, mut rstd, mut part_b, mut part_g) = (dy, x, mean, rstd, part_b, part_g);
    let (mut out_b, mut out_g, mut counters) = (out_b, out_g, k.colsum_counters);
    let (mut rows, mut cols32, mut rpc) = (rows, cols as i32, rows_per_chunk);
    let mut params = kernel_params![dy, x, mean, rstd, rows, cols32, rpc, vec, part_b, part_g, out_b, out_g, counters];
    let grid = (tiles as u32, chunks as u32, 1);
    // SAFETY: colsum takes (const T*, const T*, const float*, const float*, long long, int,
    // long long, int, float*, float*, T*, T*, unsigned*), matching `params`; ops.cpp sized every
    // buffer, and the counters cover `tiles`.
    match unsafe { launch(k, k.colsum[which], grid, (32, COLSUM_WARPS, 1), &mut params, "colsum") } {
        Ok(()) => 0,
        Err(e) => fail(e),
    }
}
