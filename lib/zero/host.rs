//! Host memory for offloading: page-locked buffers of exactly the bytes asked for, and copies
//! between them and the device that do not wait for the device.
//!
//! libtorch's own pinned allocator (`pin_memory`) rounds every block up to a power of two and
//! keeps it cached: a 30 GB optimizer partition would take 32 GiB, and the transient pageable copy
//! that `pin_memory` starts from doubles the peak. Here the driver allocates the pinned bytes
//! (`cuMemHostAlloc`, through cudarc's dynamically loaded driver, so building needs no CUDA) and
//! lib/zero/host.cpp wraps them as a tensor whose storage returns them to the driver when its last
//! view goes.

use crate::device::{cuda_primary_context, shim_result};
use std::ffi::{c_char, c_void};
use std::sync::OnceLock;
use tch::{Device, Kind, TchError, Tensor};

extern "C" {
    fn zerokit_host_tensor(
        data: *mut c_void,
        numel: i64,
        like: *const c_void,
        release: extern "C" fn(*mut c_void),
        out: *mut *mut c_void,
    ) -> *mut c_char;
    fn zerokit_copy_async(dst: *mut c_void, src: *const c_void) -> *mut c_char;
}

/// The context pinned allocations were made in; frees may run on any thread (libtorch's), which
/// must have it current.
static CONTEXT: OnceLock<usize> = OnceLock::new();

extern "C" fn release_pinned(ptr: *mut c_void) {
    use cudarc::driver::result as cu;
    // SAFETY: `ptr` came from cuMemHostAlloc in `pinned`, which set CONTEXT first; each storage
    // releases its pointer once.
    unsafe {
        if let Some(&ctx) = CONTEXT.get() {
            let _ = cu::ctx::set_current(ctx as cudarc::driver::sys::CUcontext);
        }
        if let Err(e) = cu::free_host(ptr) {
            tracing::warn!("returning pinned host memory failed: {e:?}");
        }
    }
}

/// A zeroed 1-D host tensor of `numel` elements of `kind`. With `pin` on a CUDA `device` it is
/// page-locked, so copies to and from that device overlap compute; if the driver refuses (the
/// locked-memory limit), or on CPU runs, it is ordinary memory and the reason is logged once.
pub fn host_buffer(numel: usize, kind: Kind, pin: bool, device: Device) -> Result<Tensor, TchError> {
    if let (true, Device::Cuda(ordinal)) = (pin, device) {
        match pinned(numel, kind, ordinal) {
            Ok(t) => return Ok(t),
            Err(e) => {
                static ONCE: std::sync::Once = std::sync::Once::new();
                ONCE.call_once(|| tracing::warn!("pinned host memory refused ({e}); offload copies will not overlap"));
            }
        }
    }
    Tensor::f_zeros([numel as i64], (kind, Device::Cpu))
}

fn pinned(numel: usize, kind: Kind, ordinal: usize) -> Result<Tensor, String> {
    use cudarc::driver::result as cu;
    let bytes = numel * kind.elt_size_in_bytes();
    let (_, ctx) = cuda_primary_context(ordinal)?;
    CONTEXT.get_or_init(|| ctx as usize);
    // CU_MEMHOSTALLOC_PORTABLE: page-locked for every context, libtorch's included.
    // SAFETY: a fresh allocation of `bytes` (at least one, the driver refuses zero).
    let ptr = unsafe { cu::malloc_host(bytes.max(1), 1) }
        .map_err(|e| format!("cuMemHostAlloc of {bytes} bytes failed: {e:?}"))?;
    // The driver does not zero it; every buffer starts as zeros like `Tensor::zeros`.
    // SAFETY: `ptr` points to `bytes` writable bytes just allocated.
    unsafe { std::ptr::write_bytes(ptr.cast::<u8>(), 0, bytes) };
    let mut out: *mut c_void = std::ptr::null_mut();
    // SAFETY: the shim takes ownership of `ptr` (released through `release_pinned`) and writes a
    // new at::Tensor handle to `out` unless it returns an error.
    let like = Tensor::f_empty([0], (kind, Device::Cpu)).map_err(|e| e.to_string())?;
    let status = unsafe { zerokit_host_tensor(ptr, numel as i64, like.as_ptr().cast(), release_pinned, &mut out) };
    if let Err(e) = shim_result(status) {
        release_pinned(ptr);
        return Err(e);
    }
    // SAFETY: `out` is a heap at::Tensor handle, which tch takes over (and deletes on drop).
    Ok(unsafe { Tensor::from_ptr(out.cast()) })
}

/// `dst.copy_(src)` without waiting for the device: between page-locked host memory and the
/// device the copy is queued on the current stream, so the host side may be read (or reused)
/// only after the stream is synchronized. Between two host tensors it is an ordinary copy.
pub fn copy_async(dst: &mut Tensor, src: &Tensor) -> Result<(), TchError> {
    // SAFETY: both handles are live tch tensors; the shim catches every C++ exception.
    let status = unsafe { zerokit_copy_async(dst.as_mut_ptr().cast(), src.as_ptr().cast()) };
    shim_result(status).map_err(TchError::Torch)
}
