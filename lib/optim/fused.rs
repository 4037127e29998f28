//! The Rust side of lib/optim/fused_adamw.cpp: libtorch's `_fused_adamw_` on views of the flat
//! shards, one call per weight-decay value.

use std::ffi::{c_char, c_int, c_void, CStr};
use tch::Tensor;

// Status codes of fused_adamw.cpp.
const OK: c_int = 0;
const NO_KERNEL: c_int = 1;

extern "C" {
    // Tensors are tch handles, which point to at::Tensor as fused_adamw.cpp reads them.
    fn zerokit_fused_adamw(
        params: *const *const c_void,
        grads: *const *const c_void,
        exp_avgs: *const *const c_void,
        exp_avg_sqs: *const *const c_void,
        n: usize,
        step_tensor: *const c_void,
        lr: f64,
        beta1: f64,
        beta2: f64,
        weight_decay: f64,
        eps: f64,
        grad_scale: *const c_void,
        error: *mut *mut c_char,
    ) -> c_int;
}

/// Why a fused step did not run.
pub(crate) enum FusedError {
    /// libtorch has no `_fused_adamw_` kernel for the tensors' device; nothing was modified.
    NoKernel(String),
    /// libtorch raised; the message is its own.
    Torch(String),
}

impl From<tch::TchError> for FusedError {
    fn from(e: tch::TchError) -> Self {
        FusedError::Torch(e.to_string())
    }
}

/// Views of params, grad, exp_avg and exp_avg_sq for one op call.
#[derive(Default)]
struct Group {
    views: [Vec<Tensor>; 4],
}

impl Group {
    fn cut(flats: [&Tensor; 4], pieces: &[(usize, usize)]) -> Result<Group, tch::TchError> {
        let mut g = Group::default();
        for (views, flat) in g.views.iter_mut().zip(flats) {
            *views = pieces.iter().map(|&(s, l)| flat.f_narrow(0, s as i64, l as i64)).collect::<Result<_, _>>()?;
        }
        Ok(g)
    }

    fn run(
        &self,
        step_tensor: &Tensor,
        lr: f64,
        betas: (f64, f64),
        weight_decay: f64,
        eps: f64,
        grad_scale: Option<&Tensor>,
    ) -> Result<(), FusedError> {
        let n = self.views[0].len();
        if n == 0 {
            return Ok(());
        }
        let ptrs: Vec<Vec<*const c_void>> =
            self.views.iter().map(|v| v.iter().map(|t| t.as_ptr().cast()).collect()).collect();
        let mut error: *mut c_char = std::ptr::null_mut();
        // SAFETY: the handles are live tch tensors borrowed for the call, each array holds n of
        // them; fused_adamw.cpp catches every C++ exception and sets `error` to a malloc'd
        // string or leaves it null.
        let status = unsafe {
            zerokit_fused_adamw(
                ptrs[0].as_ptr(),
                ptrs[1].as_ptr(),
                ptrs[2].as_ptr(),
                ptrs[3].as_ptr(),
                n,
                step_tensor.as_ptr().cast(),
                lr,
                betas.0,
                betas.1,
                weight_decay,
                eps,
                grad_scale.map_or(std::ptr::null(), |t| t.as_ptr().cast()),
                &mut error,
            )
        };
        let message = if error.is_null() {
            "no message (out of memory?)".to_owned()
        } else {
            // SAFETY: a NUL-terminated string from strdup, freed exactly once here.
            let s = unsafe { CStr::from_ptr(error) }.to_string_lossy().into_owned();
            unsafe { libc::free(error.cast()) };
            s
        };
        match status {
            OK => Ok(()),
            NO_KERNEL => Err(FusedError::NoKernel(message)),
            _ => Err(FusedError::Torch(message)),
        }
    }
}

/// The op's tensor lists, cut once and reused while the same parameter and gradient flats come
/// back: cutting them (four views for each of GPT-2 XL's ~400 pieces) costs about a
/// millisecond of host time, during which the GPU would wait. The views hold a reference to the
/// flats' storage, so a flat passed once stays allocated until other flats are passed.
pub(crate) struct FusedViews {
    /// Where the parameter and gradient flats the views were cut from start.
    source: (usize, usize),
    decay: Group,
    plain: Group,
}

impl FusedViews {
    /// `decay` and `plain` are (start, len) pieces that together cover the flats once.
    pub(crate) fn cut(
        flats: [&Tensor; 4],
        decay: &[(usize, usize)],
        plain: &[(usize, usize)],
    ) -> Result<FusedViews, FusedError> {
        Ok(FusedViews {
            source: source(flats[0], flats[1]),
            decay: Group::cut(flats, decay)?,
            plain: Group::cut(flats, plain)?,
        })
    }

    /// Whether the views were cut from these flats (same size and device, checked by the caller).
    pub(crate) fn cut_from(&self, params: &Tensor, grad: &Tensor) -> bool {
        self.source == source(params, grad)
    }

    /// One step: the decaying pieces at `weight_decay`, the others without. `step_tensor` holds
    /// the step count. A `NoKernel` error comes only from the first call, before anything changed.
    pub(crate) fn run(
        &self,
        step_tensor: &Tensor,
        lr: f64,
        betas: (f64, f64),
        weight_decay: f64,
        eps: f64,
        grad_scale: Option<&Tensor>,
    ) -> Result<(), FusedError> {
        self.decay.run(step_tensor, lr, betas, weight_decay, eps, grad_scale)?;
        match self.plain.run(step_tensor, lr, betas, 0.0, eps, grad_scale) {
            Err(FusedError::NoKernel(m)) if !self.decay.views[0].is_empty() => Err(FusedError::Torch(m)),
            r => r,
        }
    }
}

fn source(params: &Tensor, grad: &Tensor) -> (usize, usize) {
    (params.data_ptr() as usize, grad.data_ptr() as usize)
}
