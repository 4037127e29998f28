//! Choosing the compute device. zerokit links only libtorch_cpu, so one binary runs on machines
//! with and without GPUs; on a GPU machine it loads libtorch_cuda.so at start-up, before any
//! tensor work, which registers the CUDA backend with libtorch's dispatcher.

use std::ffi::CString;
use std::sync::OnceLock;

static CUDA_LOADED: OnceLock<bool> = OnceLock::new();

/// Loads libtorch_cuda.so once (found through LD_LIBRARY_PATH or the binary's RUNPATH).
/// Returns whether CUDA is usable. Never fails: no library means CPU.
pub fn load_cuda() -> bool {
    *CUDA_LOADED.get_or_init(|| {
        if std::env::var_os("ZEROKIT_NO_CUDA").is_some() {
            return false;
        }
        let name = CString::new("libtorch_cuda.so").expect("static name has no NUL");
        // SAFETY: dlopen with a valid C string; the handle is intentionally never closed, the
        // library must stay loaded for the life of the process.
        let handle = unsafe { libc::dlopen(name.as_ptr(), libc::RTLD_NOW | libc::RTLD_GLOBAL) };
        if handle.is_null() {
            return false;
        }
        tch::Cuda::is_available()
    })
}

/// The device the user asked for: `auto` (CUDA if present, else CPU), `cpu`, `cuda` or `cuda:N`.
pub fn parse_device(spec: &str) -> Result<tch::Device, String> {
    match spec {
        "cpu" => Ok(tch::Device::Cpu),
        "auto" => Ok(if load_cuda() { tch::Device::Cuda(0) } else { tch::Device::Cpu }),
        "cuda" => cuda_or_err(0),
        s => match s.strip_prefix("cuda:").map(str::parse::<usize>) {
            Some(Ok(i)) => cuda_or_err(i),
            _ => Err(format!("unknown device '{s}' (expected auto, cpu, cuda or cuda:N)")),
        },
    }
}

fn cuda_or_err(i: usize) -> Result<tch::Device, String> {
    if !load_cuda() {
        return Err("CUDA requested but libtorch_cuda.so could not be loaded or no GPU is visible".into());
    }
    let n = tch::Cuda::device_count() as usize;
    if i >= n {
        return Err(format!("cuda:{i} requested but only {n} GPU(s) are visible"));
    }
    Ok(tch::Device::Cuda(i))
}

/// Bytes in use on the current CUDA device, as nvidia-smi counts them (CUDA context, libtorch's
/// caching allocator, NCCL and cuBLAS buffers). The allocator keeps what it reserved, so read
/// after a step this is the step's peak. None on CPU or when the driver cannot be asked.
pub fn gpu_memory_used() -> Option<u64> {
    if !load_cuda() {
        return None;
    }
    use cudarc::driver::result as cu;
    cu::init().ok()?;
    // libtorch's runtime calls made the device's primary context current on this thread.
    let (free, total) = cu::mem_get_info().ok()?;
    Some(total.saturating_sub(free) as u64)
}

/// The primary context of CUDA device `ordinal`, the one libtorch's runtime calls use, retained
/// (never released: it lives as long as libtorch's) and made current on this thread, with the
/// device's driver handle. For zerokit's own driver calls (NCCL's streams, its kernels).
pub fn cuda_primary_context(
    ordinal: usize,
) -> Result<(cudarc::driver::sys::CUdevice, cudarc::driver::sys::CUcontext), String> {
    use cudarc::driver::result as cu;
    cu::init().map_err(|e| format!("cuInit failed: {e:?}"))?;
    let dev = cu::device::get(ordinal as i32).map_err(|e| format!("cuDeviceGet failed: {e:?}"))?;
    // SAFETY: retaining a device's primary context is reference-counted; making it current only
    // changes this thread's binding.
    unsafe {
        let ctx = cu::primary_ctx::retain(dev).map_err(|e| format!("cuDevicePrimaryCtxRetain failed: {e:?}"))?;
        cu::ctx::set_current(ctx).map_err(|e| format!("cuCtxSetCurrent failed: {e:?}"))?;
        Ok((dev, ctx))
    }
}

extern "C" {
    // lib/device_context.cpp; each returns NULL or a malloc'd error message.
    fn zerokit_sdp_prefer(first: i32) -> *mut std::ffi::c_char;
    fn zerokit_set_deterministic(on: bool, warn_only: bool) -> *mut std::ffi::c_char;
    fn zerokit_trace_start() -> *mut std::ffi::c_char;
    fn zerokit_trace_stop(path: *const std::ffi::c_char) -> *mut std::ffi::c_char;
}

/// The attention kernel families `attention` may name, as libtorch numbers them (at::SDPBackend).
const ATTENTION_BACKENDS: [(&str, i32); 5] = [("auto", -1), ("math", 0), ("flash", 1), ("efficient", 2), ("cudnn", 3)];

pub(crate) fn shim_result(msg: *mut std::ffi::c_char) -> Result<(), String> {
    if msg.is_null() {
        return Ok(());
    }
    // SAFETY: a NUL-terminated string from strdup, freed here once.
    let text = unsafe { std::ffi::CStr::from_ptr(msg) }.to_string_lossy().into_owned();
    unsafe { libc::free(msg as *mut libc::c_void) };
    Err(text)
}

/// libtorch's number for the attention kernels `name` names, or why the name is not one.
pub fn attention_backend(name: &str) -> Result<i32, String> {
    ATTENTION_BACKENDS.iter().find(|(n, _)| *n == name).map(|(_, code)| *code).ok_or_else(|| {
        let names: Vec<&str> = ATTENTION_BACKENDS.iter().map(|(n, _)| *n).collect();
        format!("attention = {name:?}: expected one of {}", names.join(", "))
    })
}

/// Makes libtorch try the attention kernels `name` names first ("auto": libtorch's own order,
/// flash attention first). Process-wide; kernels that cannot run a call are still skipped.
pub fn prefer_attention(name: &str) -> Result<(), String> {
    let code = attention_backend(name)?;
    // SAFETY: plain call into the shim; it catches every C++ exception.
    shim_result(unsafe { zerokit_sdp_prefer(code) })
}

/// Deterministic kernels, so that two runs with the same seed and configuration give
/// bitwise-identical results: libtorch's deterministic algorithms in their strict mode (an op
/// with no deterministic kernel fails the run, naming itself, rather than breaking the promise
/// quietly; it is also the only mode in which flash attention's backward is deterministic), cuDNN
/// without benchmarking, and cuBLAS with a fixed workspace (which cuBLAS reads when its first
/// handle is made, so call this before any CUDA work).
pub fn set_deterministic(on: bool) -> Result<(), String> {
    if on && std::env::var_os("CUBLAS_WORKSPACE_CONFIG").is_none() {
        // Set during start-up, before the threads that read the environment exist.
        std::env::set_var("CUBLAS_WORKSPACE_CONFIG", ":4096:8");
    }
    // SAFETY: plain call into the shim; it catches every C++ exception.
    shim_result(unsafe { zerokit_set_deterministic(on, false) })
}

/// Starts libtorch's profiler (Kineto: host operators, and device kernels through CUPTI on CUDA
/// builds) until [`trace_stop`].
pub fn trace_start() -> Result<(), String> {
    // SAFETY: plain call into the shim; it catches every C++ exception.
    shim_result(unsafe { zerokit_trace_start() })
}

/// Stops the profiler and saves what it saw as a Chrome trace (chrome://tracing, Perfetto).
pub fn trace_stop(path: &std::path::Path) -> Result<(), String> {
    let c = CString::new(path.to_string_lossy().as_bytes()).map_err(|_| format!("{}: NUL in path", path.display()))?;
    // SAFETY: `c` is NUL-terminated and outlives the call.
    shim_result(unsafe { zerokit_trace_stop(c.as_ptr()) })
}
