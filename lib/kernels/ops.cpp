// Autograd functions that keep less for backward than libtorch's composed ops do, for the
// decoder's layers. tch 0.24 cannot define an autograd function; build.rs compiles this file
// against the same libtorch headers and C++ ABI as tch's own C++ layer, so a tch tensor handle
// (a pointer to an at::Tensor) can be passed in and a new handle handed back. The caller is
// lib/kernels/ops.rs.
//
// No C++ exception may unwind into Rust: errors come back as a malloc'd message the caller frees.

#include <ATen/core/Tensor.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/gelu.h>
#include <ATen/ops/gelu_backward.h>
#include <ATen/ops/silu.h>
#include <ATen/ops/silu_backward.h>
#include <c10/util/Exception.h>
#include <torch/csrc/autograd/custom_function.h>

#include <cstdint>
#include <cstring>
#include <exception>

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// The activation codes, mirrored in lib/kernels/ops.rs.
constexpr int64_t kSilu = 0;
constexpr int64_t kGeluTanh = 1;

at::Tensor activation(const at::Tensor& gate, int64_t act) {
  return act == kSilu ? at::silu(gate) : at::gelu(gate, "tanh");
}

// act(gate) * up, the gated MLP's product (SwiGLU, GeGLU). Composed, autograd keeps gate,
// act(gate) and up; this keeps gate and up and recomputes act(gate) in backward: one
// [tokens, intermediate] tensor less per layer, for one more elementwise pass. Forward and
// backward make the same calls on the same values as the composed ops, so the results are
// bitwise the same.
struct GatedProduct : public torch::autograd::Function<GatedProduct> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& gate, const at::Tensor& up, int64_t act) {
    ctx->save_for_backward({gate, up});
    ctx->saved_data["act"] = act;
    return activation(gate, act).mul_(up);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor& gate = saved[0];
    const at::Tensor& up = saved[1];
    const int64_t act = ctx->saved_data["act"].toInt();
    const at::Tensor& grad = grads[0];
    at::Tensor grad_act = grad.mul(up);
    at::Tensor grad_up = activation(gate, act).mul_(grad);
    at::Tensor grad_gate =
        act == kSilu ? at::silu_backward(grad_act, gate) : at::gelu_backward(grad_act, gate, "tanh");
    return {grad_gate, grad_up, at::Tensor()};
  }
};

// bias + act(pre) @ weight, a Conv1D (weight [in, out], pre [rows, in]) applied to an activation:
// GPT-2's MLP projection on GELU(c_fc). Composed, autograd keeps pre (for the activation's
// derivative) and act(pre) (the product's input); this keeps pre and recomputes act(pre) in
// backward for the weight's gradient: one [tokens, 4 * hidden] tensor less per layer, for one
// more elementwise pass. The backward makes libtorch's own calls for addmm's gradients of
// row-major operands (grad @ weight^T, act^T @ grad, the bias's sum over rows) and the
// activation's, so values and gradients are bitwise the composed ops'.
struct ActivatedLinear : public torch::autograd::Function<ActivatedLinear> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& pre, const at::Tensor& weight,
                            const at::Tensor& bias, int64_t act) {
    ctx->save_for_backward({pre, weight});
    ctx->saved_data["act"] = act;
    return at::addmm(bias, activation(pre, act), weight);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor& pre = saved[0];
    const at::Tensor& weight = saved[1];
    const int64_t act = ctx->saved_data["act"].toInt();
    const at::Tensor& grad = grads[0];
    at::Tensor grad_weight = activation(pre, act).t().mm(grad);
    at::Tensor grad_bias = grad.sum(0);
    at::Tensor grad_act = grad.mm(weight.t());
    at::Tensor grad_pre =
        act == kSilu ? at::silu_backward(grad_act, pre) : at::gelu_backward(grad_act, pre, "tanh");
    return {grad_pre, grad_weight, grad_bias, at::Tensor()};
  }
};

// Runs f, turning any C++ exception into a malloc'd message for the Rust caller (nullptr: none).
template <typename F>
char* guarded(F&& f) {
  try {
    f();
    return nullptr;
  } catch (const c10::Error& e) {
    return strdup(e.what_without_backtrace());
  } catch (const std::exception& e) {
    return strdup(e.what());
  }
}

}  // namespace

// *out = act(gate) * up through GatedProduct (a new tensor handle the caller owns).
extern "C" char* zerokit_gated_product(const at::Tensor* gate, const at::Tensor* up, int64_t act, at::Tensor** out) {
  return guarded([&] {
    TORCH_CHECK(act == kSilu || act == kGeluTanh, "unknown activation code ", act);
    *out = new at::Tensor(GatedProduct::apply(*gate, *up, act));
  });
}

// *out = bias + act(pre) @ weight through ActivatedLinear (a new tensor handle the caller owns).
extern "C" char* zerokit_activated_linear(const at::Tensor* pre, const at::Tensor* weight, const at::Tensor* bias,
                                          int64_t act, at::Tensor** out) {
  return guarded([&] {
    TORCH_CHECK(act == kSilu || act == kGeluTanh, "unknown activation code ", act);
    TORCH_CHECK(pre->dim() == 2 && weight->dim() == 2 && bias->dim() == 1, "activated_linear takes pre [rows, in], ",
                "weight [in, out] and bias [out], not ", pre->sizes(), ", ", weight->sizes(), " and ", bias->sizes());
    *out = new at::Tensor(ActivatedLinear::apply(*pre, *weight, *bias, act));
  });
}
