//! zerokit's own CUDA kernels, for the places where eager libtorch makes several passes over
//! large tensors that one kernel can make once. Each kernel is CUDA C source compiled at run time
//! by NVRTC (loaded dynamically through cudarc, from the CUDA build of libtorch's own libnvrtc),
//! so the build needs no CUDA, as for NCCL. Each has a reference written in libtorch ops, which
//! runs on CPU and wherever NVRTC is missing, and which tests/kernels.rs holds the kernel to.
//!
//! Kernels run on the legacy default stream, libtorch's compute stream in zerokit, so they are
//! ordered with the ops around them without events.
//!
//! `ZEROKIT_FUSED=0` turns the kernels off (the references run instead), for comparisons.
//!
//! This file compiles and loads the kernels (one NVRTC source per device); each kernel's launch
//! lives beside its source: classifier.rs (classifier.cu), sums.rs (colsum.cu, which ops.cpp
//! calls back into), widen.rs (widen.cu), adamw.rs (adamw.cu: the optimizer step and the
//! gradient's sum of squares). ops.rs holds the models' ops that keep less for
//! backward or take their parameter gradients from the column sums: autograd functions of
//! zerokit's own (ops.cpp, compiled against libtorch's headers) and RMSNorm through libtorch's
//! fused CUDA kernels.

mod adamw;
mod classifier;
mod norm;
mod ops;
mod sums;
mod widen;

pub use adamw::{adamw, sum_of_squares, AdamWPiece, AdamWScalars, PieceTable, Span};
pub use classifier::{classifier, classifier_reference};
pub use widen::widen_into;

pub use ops::{
    activated_linear, activated_linear_reference, gated_product, gated_product_reference, layer_norm,
    layer_norm_reference, linear, linear_reference, rms_norm, rms_norm_reference, Gate,
};
pub use ops::{add_layer_norm, add_layer_norm_reference};

use cudarc::driver::{result as cu, sys as cusys};
use std::ffi::{c_void, CString};
use std::sync::OnceLock;
use tch::Device;

/// One NVRTC source: the shared types first, then each kernel file. Public so that CI can
/// compile it with NVRTC on machines without a GPU (tests/kernels.rs, tools/nvrtc_check.py).
pub const KERNELS_SRC: &str = concat!(
    include_str!("common.cuh"),
    include_str!("classifier.cu"),
    include_str!("colsum.cu"),
    include_str!("widen.cu"),
    include_str!("adamw.cu"),
    include_str!("layernorm.cu")
);
/// The kernels of KERNELS_SRC that `load` looks up, in the order it unpacks them.
pub const KERNEL_ENTRIES: [&str; 22] = [
    "classifier_f32",
    "classifier_bf16",
    "classifier_f16",
    "colsum_f32",
    "colsum_bf16",
    "colsum_f16",
    "widen_bf16",
    "widen_f16",
    "adamw_f32_f32",
    "adamw_f32_bf16",
    "adamw_f32_f16",
    "adamw_bf16_bf16",
    "adamw_f16_f16",
    "sumsq_f32",
    "sumsq_bf16",
    "sumsq_f16",
    "ln_forward_f32",
    "ln_forward_bf16",
    "ln_forward_f16",
    "ln_backward_f32",
    "ln_backward_bf16",
    "ln_backward_f16",
];

/// The loaded module of one device. CUDA function handles are plain pointers into the driver's
/// module, valid in the device's primary context for the life of the process.
struct Loaded {
    device: usize,
    ctx: cusys::CUcontext,
    classifier: [cusys::CUfunction; 3],
    /// colsum for fp32, bf16, fp16.
    colsum: [cusys::CUfunction; 3],
    /// COLSUM_MAX_TILES zeroed counters for colsum's last-block detection; each launch leaves
    /// them zero again. Launches are ordered on the one stream, so one set serves them all.
    colsum_counters: cusys::CUdeviceptr,
    /// widen_bf16, widen_f16.
    widen: [cusys::CUfunction; 2],
    /// adamw by (gradient, weight) type: f32/f32, f32/bf16, f32/f16, bf16/bf16, f16/f16.
    adamw: [cusys::CUfunction; 5],
    /// sumsq for fp32, bf16, fp16 gradients.
    sumsq: [cusys::CUfunction; 3],
    /// ln_forward and ln_backward for fp32, bf16, fp16.
    ln_forward: [cusys::CUfunction; 3],
    ln_backward: [cusys::CUfunction; 3],
}

// SAFETY: CUfunction and CUcontext handles may be used from any thread; a launch makes the
// context current first.
unsafe impl Send for Loaded {}
unsafe impl Sync for Loaded {}

static LOADED: OnceLock<Result<Loaded, String>> = OnceLock::new();

/// Compiles and loads the kernels for `device` once per process (a rank drives one device).
/// Err says why the kernels are not available; the callers then run the references.
fn loaded(device: usize) -> Result<&'static Loaded, String> {
    let l = LOADED.get_or_init(|| {
        let l = load(device);
        match &l {
            Ok(_) => tracing::info!("fused kernels compiled by NVRTC for cuda:{device}"),
            Err(e) => tracing::warn!("fused kernels unavailable ({e}); running libtorch's ops instead"),
        }
        l
    });
    match l {
        Ok(l) if l.device == device => Ok(l),
        Ok(l) => Err(format!("kernels were loaded for cuda:{}, not cuda:{device}", l.device)),
        Err(e) => Err(e.clone()),
    }
}

/// `ZEROKIT_FUSED=0`: the references run instead of the kernels and fused ops.
fn disabled() -> bool {
    std::env::var("ZEROKIT_FUSED").is_ok_and(|v| v == "0")
}

fn load(device: usize) -> Result<Loaded, String> {
    if disabled() {
        return Err("ZEROKIT_FUSED=0".into());
    }
    // SAFETY: only asks the dynamic loader whether one of NVRTC's names resolves.
    if !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
        return Err("libnvrtc was not found on the library path".into());
    }
    let (dev, ctx) = crate::device::cuda_primary_context(device)?;
    let opts = cudarc::nvrtc::CompileOptions {
        arch: Some(arch(dev)?),
        options: vec!["--std=c++17".into()],
        name: Some("zerokit_kernels.cu".into()),
        ..Default::default()
    };
    let ptx = cudarc::nvrtc::compile_ptx_with_opts(KERNELS_SRC, opts).map_err(|e| format!("NVRTC: {e}"))?;
    let image = CString::new(ptx.to_src()).map_err(|_| "NVRTC returned PTX with a NUL byte".to_string())?;
    // SAFETY: `image` is NUL-terminated PTX text; the module is never unloaded.
    let module = unsafe { cu::module::load_data(image.as_ptr() as *const c_void) }
        .map_err(|e| format!("cuModuleLoadData: {e:?}"))?;
    let get = |name: &str| {
        let n = CString::new(name).expect("static kernel name");
        // SAFETY: `module` is live; the name is NUL-terminated.
        unsafe { cu::module::get_function(module, n) }.map_err(|e| format!("cuModuleGetFunction {name}: {e:?}"))
    };
    let f = KERNEL_ENTRIES.iter().map(|name| get(name)).collect::<Result<Vec<_>, _>>()?;
    let classifier = [f[0], f[1], f[2]];
    let colsum = [f[3], f[4], f[5]];
    let bytes = sums::COLSUM_MAX_TILES as usize * std::mem::size_of::<u32>();
    // SAFETY: a plain allocation in the current (primary) context, zeroed before any use; it is
    // never freed (it lives as long as the loaded module).
    let colsum_counters = unsafe {
        let p = cu::malloc_sync(bytes).map_err(|e| format!("cuMemAlloc: {e:?}"))?;
        cu::memset_d8_sync(p, 0, bytes).map_err(|e| format!("cuMemsetD8: {e:?}"))?;
        p
    };
    let widen = [f[6], f[7]];
    let adamw = [f[8], f[9], f[10], f[11], f[12]];
    let sumsq = [f[13], f[14], f[15]];
    let (ln_forward, ln_backward) = ([f[16], f[17], f[18]], [f[19], f[20], f[21]]);
    Ok(Loaded { device, ctx, classifier, colsum, colsum_counters, widen, adamw, sumsq, ln_forward, ln_backward })
}

/// The device's virtual architecture, so NVRTC emits PTX the driver compiles for this GPU.
fn arch(dev: cusys::CUdevice) -> Result<&'static str, String> {
    // SAFETY: `dev` is a valid device handle; the attribute queries only read.
    let attr = |a| unsafe { cu::device::get_attribute(dev, a) }.map_err(|e| format!("cuDeviceGetAttribute: {e:?}"));
    let major = attr(cusys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)?;
    let minor = attr(cusys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR)?;
    // The kernels convert with cvt.rn.bf16.f32, an sm_80 instruction.
    Ok(match (major, minor) {
        (m, _) if m >= 10 => "compute_100",
        (9, _) => "compute_90",
        (8, n) if n >= 9 => "compute_89",
        (8, 6..=8) => "compute_86",
        (8, 0..=5) => "compute_80",
        (m, n) => return Err(format!("compute capability {m}.{n} is below the 8.0 the kernels need")),
    })
}

/// Pointers to a kernel's arguments, in the order of its parameters, for [`launch`]: each
/// argument is a local variable of the parameter's C type (a device address as a pointer,
/// `long long` as i64, `int` as i32, `float` as f32).
macro_rules! kernel_params {
    ($($arg:ident),* $(,)?) => {
        [$(&mut $arg as *mut _ as *mut std::ffi::c_void),*]
    };
}
pub(crate) use kernel_params;

/// Launches `f`, a kernel of `k`'s module, on the legacy default stream (libtorch's compute
/// stream in zerokit) with the device's context current. `what` names it in the error.
///
/// # Safety
/// `params` must match f's parameters in number, order and type, and every device address among
/// them must stay valid until the kernel has run (the callers' tensors, kept alive by them or by
/// the caching allocator's stream order).
unsafe fn launch(
    k: &Loaded,
    f: cusys::CUfunction,
    grid: (u32, u32, u32),
    block: (u32, u32, u32),
    params: &mut [*mut c_void],
    what: &str,
) -> Result<(), String> {
    // SAFETY: the context is live for the process (retained, never released).
    unsafe { cu::ctx::set_current(k.ctx) }.map_err(|e| format!("cuCtxSetCurrent: {e:?}"))?;
    // SAFETY: the caller's contract; grid and block are within the device's limits.
    unsafe { cu::launch_kernel(f, grid, block, 0, std::ptr::null_mut(), params) }
        .map_err(|e| format!("{what} launch: {e:?}"))
}

/// What a launcher that ops.cpp calls back into returns on failure: 2, with `msg` in `*error`
/// (ops.cpp frees it with free()).
///
/// # Safety
/// `error` must point to a writable `char*` slot.
unsafe fn callback_error(error: *mut *mut std::ffi::c_char, msg: String) -> i32 {
    let c = CString::new(msg).unwrap_or_default();
    // SAFETY: the caller's slot; strdup allocates with malloc, as ops.cpp's free() expects.
    unsafe { *error = libc::strdup(c.as_ptr()) };
    2
}

/// The fused kernels for tensors on `device`, if they are on a GPU and available.
fn kernels_for(device: Device) -> Option<&'static Loaded> {
    match device {
        Device::Cuda(i) => loaded(i).ok(),
        _ => None,
    }
}

/// Whether [`classifier`] runs zerokit's kernel for tensors on `device` (else its reference).
pub fn fused_on(device: Device) -> bool {
    kernels_for(device).is_some()
}
