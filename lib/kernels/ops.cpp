// Autograd functions that keep less for backward than libtorch's composed ops do, for the
// decoder's layers. tch 0.24 cannot define an autograd function; build.rs compiles this file
// against the same libtorch headers and C++ ABI as tch's own C++ layer, so a tch tensor handle
// (a pointer to an at::Tensor) can be passed in and a new handle handed back. The caller is
// lib/kernels/ops.rs.
//
// No C++ exception may unwind into Rust: errors come back as a malloc'd message the caller frees.

#include <ATen/core/Tensor.h>
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

char* message(const char* what) { return strdup(what); }

}  // namespace

// *out = act(gate) * up through GatedProduct (a new tensor handle the caller owns).
extern "C" char* zerokit_gated_product(const at::Tensor* gate, const at::Tensor* up, int64_t act, at::Tensor** out) {
  try {
    TORCH_CHECK(act == kSilu || act == kGeluTanh, "unknown activation code ", act);
    *out = new at::Tensor(GatedProduct::apply(*gate, *up, act));
    return nullptr;
  } catch (const c10::Error& e) {
    return message(e.what_without_backtrace());
  } catch (const std::exception& e) {
    return message(e.what());
  }
}
