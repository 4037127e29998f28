//! The models' ops in forms that keep less for backward than libtorch's composed ops:
//! the gated MLP's product and GPT-2's MLP projection on its GELU as autograd functions of
//! zerokit's own (ops.cpp), a Conv1D and LayerNorm whose parameter gradients come from the
//! column-sum kernel on a GPU (ops.cpp calls back into mod.rs), and RMSNorm as
//! libtorch's fused CUDA kernels on a GPU. Each has a reference in composed ops (what
//! transformers computes), which tests hold it to.

use std::ffi::c_void;
use tch::{Kind, TchError, Tensor};

extern "C" {
    // Tensors are tch handles, which point to at::Tensor as ops.cpp reads them.
    fn zerokit_gated_product(
        gate: *const c_void,
        up: *const c_void,
        act: i64,
        out: *mut *mut c_void,
    ) -> *mut std::ffi::c_char;
    fn zerokit_activated_linear(
        pre: *const c_void,
        weight: *const c_void,
        bias: *const c_void,
        act: i64,
        out: *mut *mut c_void,
    ) -> *mut std::ffi::c_char;
    fn zerokit_linear(
        x: *const c_void,
        weight: *const c_void,
        bias: *const c_void,
        out: *mut *mut c_void,
    ) -> *mut std::ffi::c_char;
    fn zerokit_layer_norm(
        x: *const c_void,
        weight: *const c_void,
        bias: *const c_void,
        eps: f64,
        out: *mut *mut c_void,
    ) -> *mut std::ffi::c_char;
    fn zerokit_add_layer_norm(
        x: *const c_void,
        res: *const c_void,
        weight: *const c_void,
        bias: *const c_void,
        eps: f64,
        sum: *mut *mut c_void,
        out: *mut *mut c_void,
    ) -> *mut std::ffi::c_char;
}

/// Hands ops.cpp the launchers of the kernels it calls back into (once per process).
fn register_kernels() {
    super::sums::register_column_sums();
    super::norm::register_layer_norm();
}

/// The gated MLP's activation: SwiGLU's SiLU or GeGLU's tanh-approximated GELU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Gate {
    Silu,
    GeluTanh,
}

impl Gate {
    /// The code ops.cpp reads.
    fn code(self) -> i64 {
        match self {
            Gate::Silu => 0,
            Gate::GeluTanh => 1,
        }
    }

    fn apply(self, x: &Tensor) -> Tensor {
        match self {
            Gate::Silu => x.silu(),
            Gate::GeluTanh => x.gelu("tanh"),
        }
    }
}

/// `act(gate) * up`, keeping only gate and up for backward (act(gate) is recomputed there): one
/// [tokens, intermediate] tensor a layer less than the composed ops keep, with bitwise the same
/// values and gradients (the same libtorch calls on the same inputs).
pub fn gated_product(gate: &Tensor, up: &Tensor, act: Gate) -> Result<Tensor, TchError> {
    let mut out: *mut c_void = std::ptr::null_mut();
    // SAFETY: both handles are live tch tensors; the shim writes a new at::Tensor handle to `out`
    // unless it returns an error, and catches every C++ exception.
    let status = unsafe { zerokit_gated_product(gate.as_ptr().cast(), up.as_ptr().cast(), act.code(), &mut out) };
    new_handle(status, out)
}

/// [`gated_product`] in composed ops (autograd keeps act(gate) as well).
pub fn gated_product_reference(gate: &Tensor, up: &Tensor, act: Gate) -> Tensor {
    act.apply(gate) * up
}

/// `bias + act(pre) @ weight` for pre [rows, in] and a Conv1D weight [in, out] (GPT-2's MLP
/// projection on GELU(c_fc)), keeping only pre for backward (act(pre) is recomputed there): one
/// [tokens, in] tensor a layer less than the composed ops keep, with bitwise the same values and
/// gradients.
pub fn activated_linear(pre: &Tensor, weight: &Tensor, bias: &Tensor, act: Gate) -> Result<Tensor, TchError> {
    register_kernels();
    let mut out: *mut c_void = std::ptr::null_mut();
    // SAFETY: as in `gated_product`: live handles in, a new handle out unless an error comes back.
    let status = unsafe {
        zerokit_activated_linear(
            pre.as_ptr().cast(),
            weight.as_ptr().cast(),
            bias.as_ptr().cast(),
            act.code(),
            &mut out,
        )
    };
    new_handle(status, out)
}

/// `bias + x @ weight` for x [rows, in] and a Conv1D weight [in, out]: addmm, whose backward takes
/// the bias's gradient from zerokit's column-sum kernel on a GPU (one read of the gradient at
/// close to the memory bandwidth) and autograd's own reduction elsewhere. Values and the other
/// gradients are bitwise addmm's; the bias's gradient on a GPU is the same sum in another order.
pub fn linear(x: &Tensor, weight: &Tensor, bias: &Tensor) -> Result<Tensor, TchError> {
    register_kernels();
    let mut out: *mut c_void = std::ptr::null_mut();
    // SAFETY: as in `gated_product`.
    let status = unsafe { zerokit_linear(x.as_ptr().cast(), weight.as_ptr().cast(), bias.as_ptr().cast(), &mut out) };
    new_handle(status, out)
}

/// [`linear`] in composed ops.
pub fn linear_reference(x: &Tensor, weight: &Tensor, bias: &Tensor) -> Tensor {
    bias.addmm(x, weight)
}

/// LayerNorm of x over its last dimension. On a GPU zerokit's kernels (layernorm.cu) compute it
/// in one pass over each row and its input's gradient in another, and the gain's and bias's
/// gradients come from the column-sum kernel; the values are within rounding of libtorch's
/// layer_norm (fp32 statistics from two passes, as exact as libtorch's Welford). Elsewhere
/// libtorch's layer_norm and its backward, bitwise.
pub fn layer_norm(x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor, TchError> {
    register_kernels();
    let mut out: *mut c_void = std::ptr::null_mut();
    // SAFETY: as in `gated_product`.
    let status =
        unsafe { zerokit_layer_norm(x.as_ptr().cast(), weight.as_ptr().cast(), bias.as_ptr().cast(), eps, &mut out) };
    new_handle(status, out)
}

/// [`layer_norm`] in composed ops.
pub fn layer_norm_reference(x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Tensor {
    let last = *x.size().last().expect("a normalised tensor has a last dimension");
    x.layer_norm([last], Some(weight), Some(bias), eps, true)
}

/// `(x + res, layer_norm(x + res))`: a pre-norm block's residual add and the LayerNorm that reads
/// its result, as one op. On a GPU one kernel makes both (the sum rounded to x's kind, as the
/// add would store it) and, in backward, adds the residual's gradient to the LayerNorm's input
/// gradient in the same pass: no add kernel either way. Elsewhere the add and [`layer_norm`]'s
/// libtorch path, bitwise [`add_layer_norm_reference`].
pub fn add_layer_norm(
    x: &Tensor,
    res: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    eps: f64,
) -> Result<(Tensor, Tensor), TchError> {
    register_kernels();
    let (mut sum, mut out): (*mut c_void, *mut c_void) = (std::ptr::null_mut(), std::ptr::null_mut());
    // SAFETY: as in `gated_product`, with two new handles out.
    let status = unsafe {
        zerokit_add_layer_norm(
            x.as_ptr().cast(),
            res.as_ptr().cast(),
            weight.as_ptr().cast(),
            bias.as_ptr().cast(),
            eps,
            &mut sum,
            &mut out,
        )
    };
    let sum = new_handle(status, sum)?;
    // SAFETY: no error came back, so `out` is a heap at::Tensor handle as well.
    Ok((sum, unsafe { Tensor::from_ptr(out.cast()) }))
}

/// [`add_layer_norm`] in composed ops.
pub fn add_layer_norm_reference(
    x: &Tensor,
    res: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    eps: f64,
) -> (Tensor, Tensor) {
    let sum = x + res;
    let out = layer_norm_reference(&sum, weight, bias, eps);
    (sum, out)
}

/// The tensor an ops.cpp function handed back, or its error message.
fn new_handle(status: *mut std::ffi::c_char, out: *mut c_void) -> Result<Tensor, TchError> {
    crate::device::shim_result(status).map_err(TchError::Torch)?;
    // SAFETY: without an error `out` is a heap at::Tensor handle, which tch takes over (and
    // deletes on drop).
    Ok(unsafe { Tensor::from_ptr(out.cast()) })
}

/// [`activated_linear`] in composed ops (autograd keeps act(pre) as well).
pub fn activated_linear_reference(pre: &Tensor, weight: &Tensor, bias: &Tensor, act: Gate) -> Tensor {
    bias.addmm(&act.apply(pre), weight)
}

/// transformers' LlamaRMSNorm over the last dimension: normalised in fp32, cast back to x's kind,
/// scaled by the gain. On a GPU (unless `ZEROKIT_FUSED=0`) libtorch's fused rms_norm kernels,
/// one pass each way that keep x and the fp32 inverse RMS for backward, where the composed ops
/// keep an fp32 copy of x and make about a dozen passes over it; the only difference in the
/// result is the one rounding of the product (fp32 into x's kind, once rather than twice).
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Tensor {
    if x.device().is_cuda() && !super::disabled() {
        let last = *x.size().last().expect("a normalised tensor has a last dimension");
        x.rms_norm([last], Some(weight), Some(eps))
    } else {
        rms_norm_reference(x, weight, eps)
    }
}

/// [`rms_norm`] in composed ops, exactly as LlamaRMSNorm computes it.
pub fn rms_norm_reference(x: &Tensor, weight: &Tensor, eps: f64) -> Tensor {
    let h = x.to_kind(Kind::Float);
    let variance = h.pow_tensor_scalar(2).mean_dim(-1, true, None);
    weight * (h * (variance + eps).rsqrt()).to_kind(x.kind())
}
