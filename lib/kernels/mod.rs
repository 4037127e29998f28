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
//! ops.rs holds the decoder's ops that keep less for backward: the gated MLP's product as an
//! autograd function of zerokit's own (ops.cpp, compiled against libtorch's headers) and
//! RMSNorm through libtorch's fused CUDA kernels.

mod ops;

pub use ops::{
    activated_linear, activated_linear_reference, gated_product, gated_product_reference, layer_norm,
    layer_norm_reference, linear, linear_reference, rms_norm, rms_norm_reference, Gate,
};

use cudarc::driver::{result as cu, sys as cusys};
use std::ffi::{c_void, CString};
use std::sync::OnceLock;
use tch::{Device, Kind, TchError, Tensor};

/// One NVRTC source: the shared types first, then each kernel file. Public so that CI can
/// compile it with NVRTC on machines without a GPU (tests/kernels.rs, tools/nvrtc_check.py).
pub const KERNELS_SRC: &str = concat!(
    include_str!("common.cuh"),
    include_str!("classifier.cu"),
    include_str!("colsum.cu"),
    include_str!("widen.cu")
);
/// Threads per row of the classifier: enough 16-byte loads in flight to stream a 100 KB row.
const CLASSIFIER_THREADS: u32 = 1024;

/// The kernels of KERNELS_SRC that `load` looks up, in the order it unpacks them.
pub const KERNEL_ENTRIES: [&str; 8] = [
    "classifier_f32",
    "classifier_bf16",
    "classifier_f16",
    "colsum_f32",
    "colsum_bf16",
    "colsum_f16",
    "widen_bf16",
    "widen_f16",
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
    let bytes = COLSUM_MAX_TILES as usize * std::mem::size_of::<u32>();
    // SAFETY: a plain allocation in the current (primary) context, zeroed before any use; it is
    // never freed (it lives as long as the loaded module).
    let colsum_counters = unsafe {
        let p = cu::malloc_sync(bytes).map_err(|e| format!("cuMemAlloc: {e:?}"))?;
        cu::memset_d8_sync(p, 0, bytes).map_err(|e| format!("cuMemsetD8: {e:?}"))?;
        p
    };
    let widen = [f[6], f[7]];
    Ok(Loaded { device, ctx, classifier, colsum, colsum_counters, widen })
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

/// Softmax cross-entropy of `logits` [N, V] (fp32, fp16 or bf16, contiguous) against `targets`
/// [N] (Int64; -1 is ignored), computed in fp32, and its gradient written over the logits:
/// `logits <- (softmax(logits) - onehot(targets)) * scale / count` for every counted row, zero for
/// ignored rows. `count` is a one-element fp32 tensor on the logits' device (the number of counted
/// targets in the whole micro-batch, so chunks of it add up), so that nothing waits for the host.
/// Returns the per-row losses [N] in fp32 (zero for ignored rows).
pub fn classifier(logits: &Tensor, targets: &Tensor, count: &Tensor, scale: f64) -> Result<Tensor, TchError> {
    let size = logits.size();
    let shape_ok = size.len() == 2 && targets.size() == [size[0]] && targets.kind() == Kind::Int64;
    if !shape_ok || !logits.is_contiguous() || count.kind() != Kind::Float || count.numel() != 1 {
        return Err(TchError::Kind(format!(
            "classifier: logits {size:?} {:?} (contiguous: {}), targets {:?} {:?}, count {:?}",
            logits.kind(),
            logits.is_contiguous(),
            targets.size(),
            targets.kind(),
            count.kind()
        )));
    }
    match kernels_for(logits.device()) {
        Some(k) => launch_classifier(k, logits, targets, count, scale),
        None => classifier_reference(logits, targets, count, scale),
    }
}

/// [`classifier`] in libtorch ops: an fp32 copy of the logits, log-softmax, and the gradient
/// of the mean cross-entropy written back in the logits' kind.
pub fn classifier_reference(logits: &Tensor, targets: &Tensor, count: &Tensor, scale: f64) -> Result<Tensor, TchError> {
    let counted = targets.f_ne(-1)?.f_to_kind(Kind::Float)?;
    let safe = targets.f_clamp_min(0)?.f_unsqueeze(1)?;
    // log-probabilities in fp32, then turned into the gradient in place.
    let mut p = logits.f_to_kind(Kind::Float)?.f_log_softmax(1, Kind::Float)?;
    let losses = p.f_gather(1, &safe, false)?.f_squeeze_dim(1)?.f_neg()?.f_mul(&counted)?;
    let _ = p.f_exp_()?;
    let minus_one = Tensor::f_full([targets.size()[0], 1], -1.0, (Kind::Float, logits.device()))?;
    let _ = p.f_scatter_add_(1, &safe, &minus_one)?;
    let _ = p.f_mul_(&counted.f_unsqueeze(1)?.f_mul(&(count.f_reciprocal()? * scale))?)?;
    logits.shallow_clone().f_copy_(&p)?;
    Ok(losses)
}

fn launch_classifier(
    k: &Loaded,
    logits: &Tensor,
    targets: &Tensor,
    count: &Tensor,
    scale: f64,
) -> Result<Tensor, TchError> {
    let (n, v) = (logits.size()[0], logits.size()[1]);
    let which = match logits.kind() {
        Kind::Float => 0,
        Kind::BFloat16 => 1,
        Kind::Half => 2,
        other => return Err(TchError::Kind(format!("classifier: logits of kind {other:?}"))),
    };
    let device = logits.device();
    let (targets, count) = (targets.f_to_device(device)?.f_contiguous()?, count.f_to_device(device)?);
    let losses = Tensor::f_empty([n], (Kind::Float, device))?;
    if n == 0 {
        return Ok(losses);
    }
    if v > i32::MAX as i64 || n > i32::MAX as i64 {
        return Err(TchError::Kind(format!("classifier: logits {n} x {v} exceed the kernel's 32-bit grid")));
    }
    let elem = logits.kind().elt_size_in_bytes() as i64;
    let mut data = logits.data_ptr();
    let vectorized = i32::from((data as usize) % 16 == 0 && (v * elem) % 16 == 0);
    let (mut t, mut l, mut c) = (targets.data_ptr(), losses.data_ptr(), count.data_ptr());
    let (mut scale, mut v32, mut vec) = (scale as f32, v as i32, vectorized);
    let mut params: [*mut c_void; 7] = [
        &mut data as *mut _ as *mut c_void,
        &mut t as *mut _ as *mut c_void,
        &mut l as *mut _ as *mut c_void,
        &mut c as *mut _ as *mut c_void,
        &mut scale as *mut _ as *mut c_void,
        &mut v32 as *mut _ as *mut c_void,
        &mut vec as *mut _ as *mut c_void,
    ];
    // SAFETY: the context is live for the process (retained, never released).
    unsafe { cu::ctx::set_current(k.ctx) }.map_err(|e| TchError::Kind(format!("cuCtxSetCurrent: {e:?}")))?;
    // SAFETY: the function takes (T*, const i64*, float*, const float*, float, int, int), matching
    // `params`; every pointer is a live, contiguous device tensor of the checked shape, kept alive
    // by the caller (logits, losses) or by the caching allocator's stream order (targets, count
    // copies are freed only after work queued on this stream).
    unsafe {
        cu::launch_kernel(
            k.classifier[which],
            (n as u32, 1, 1),
            (CLASSIFIER_THREADS, 1, 1),
            0,
            std::ptr::null_mut(),
            &mut params,
        )
    }
    .map_err(|e| TchError::Kind(format!("classifier launch: {e:?}")))?;
    Ok(losses)
}

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
    let mut params: [*mut c_void; 4] = [
        &mut s as *mut _ as *mut c_void,
        &mut d as *mut _ as *mut c_void,
        &mut n64 as *mut _ as *mut c_void,
        &mut vec as *mut _ as *mut c_void,
    ];
    let blocks = (n as u64).div_ceil(8 * WIDEN_THREADS as u64).clamp(1, WIDEN_MAX_BLOCKS as u64) as u32;
    // SAFETY: the context is live for the process (retained, never released).
    unsafe { cu::ctx::set_current(k.ctx) }.map_err(|e| TchError::Kind(format!("cuCtxSetCurrent: {e:?}")))?;
    // SAFETY: widen takes (const T*, float*, long long, int), matching `params`; both tensors are
    // live, contiguous and of n elements on this device, kept alive by the caller.
    unsafe {
        cu::launch_kernel(k.widen[which], (blocks, 1, 1), (WIDEN_THREADS, 1, 1), 0, std::ptr::null_mut(), &mut params)
    }
    .map_err(|e| TchError::Kind(format!("widen launch: {e:?}")))
}

extern "C" {
    /// Takes ops.cpp's `ColumnSumsFn`: `launch_column_sums` below, whose signature is that type.
    fn zerokit_set_column_sums(f: *const c_void);
}

/// Hands ops.cpp the column-sum launcher (once per process).
fn register_column_sums() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    // SAFETY: stores a function pointer in an atomic; `launch_column_sums` has the signature of
    // ops.cpp's ColumnSumsFn, parameter for parameter.
    ONCE.call_once(|| unsafe { zerokit_set_column_sums(launch_column_sums as *const c_void) });
}

/// Columns per block and warps per block of colsum (colsum.cu's COLSUM_TILE and COLSUM_WARPS),
/// and the most column tiles one launch may have (counters allocated at load).
const COLSUM_TILE: i64 = 128;
const COLSUM_WARPS: u32 = 8;
const COLSUM_MAX_TILES: i64 = 1 << 14;

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
