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
