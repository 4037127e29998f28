//! The column-sum kernel's launch (colsum.cu), which ops.cpp calls back into for the parameter
//! gradients that are sums over rows (biases, LayerNorm gains and biases).

use super::kernels_for;
use cudarc::driver::result as cu;
use std::ffi::{c_void, CString};
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
    let fail = |msg: String| {
        let c = CString::new(msg).unwrap_or_default();
        // SAFETY: ops.cpp frees the message with free(); strdup allocates with malloc.
        unsafe { *error = libc::strdup(c.as_ptr()) };
        2
    };
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
    let mut params: [*mut c_void; 13] = [
        &mut dy as *mut _ as *mut c_void,
        &mut x as *mut _ as *mut c_void,
        &mut mean as *mut _ as *mut c_void,
        &mut rstd as *mut _ as *mut c_void,
        &mut rows as *mut _ as *mut c_void,
        &mut cols32 as *mut _ as *mut c_void,
        &mut rpc as *mut _ as *mut c_void,
        &mut vec as *mut _ as *mut c_void,
        &mut part_b as *mut _ as *mut c_void,
        &mut part_g as *mut _ as *mut c_void,
        &mut out_b as *mut _ as *mut c_void,
        &mut out_g as *mut _ as *mut c_void,
        &mut counters as *mut _ as *mut c_void,
    ];
    // SAFETY: the context is live for the process (retained, never released).
    if let Err(e) = unsafe { cu::ctx::set_current(k.ctx) } {
        return fail(format!("cuCtxSetCurrent: {e:?}"));
    }
    // SAFETY: colsum takes (const T*, const T*, const float*, const float*, long long, int,
    // long long, int, float*, float*, T*, T*, unsigned*), matching `params`; ops.cpp sized every
    // buffer, and the counters cover `tiles`.
    let launched = unsafe {
        cu::launch_kernel(
            k.colsum[which],
            (tiles as u32, chunks as u32, 1),
            (32, COLSUM_WARPS, 1),
            0,
            std::ptr::null_mut(),
            &mut params,
        )
    };
    if let Err(e) = launched {
        return fail(format!("colsum launch: {e:?}"));
    }
    0
}
