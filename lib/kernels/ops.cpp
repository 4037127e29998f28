// Autograd functions that keep less for backward than libtorch's composed ops do, for the
// decoder's layers. tch 0.24 cannot define an autograd function; build.rs compiles this file
// against the same libtorch headers and C++ ABI as tch's own C++ layer, so a tch tensor handle
// (a pointer to an at::Tensor) can be passed in and a new handle handed back. The caller is
// lib/kernels/ops.rs.
//
// No C++ exception may unwind into Rust: errors come back as a malloc'd message the caller frees.

#include <ATen/core/Tensor.h>
#include <ATen/ops/add.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/gelu.h>
#include <ATen/ops/gelu_backward.h>
#include <ATen/ops/native_layer_norm.h>
#include <ATen/ops/native_layer_norm_backward.h>
#include <ATen/ops/silu.h>
#include <ATen/ops/silu_backward.h>
#include <c10/util/Exception.h>
#include <torch/csrc/autograd/custom_function.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <initializer_list>
#include <optional>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// The activation codes, mirrored in lib/kernels/ops.rs.
constexpr int64_t kSilu = 0;
constexpr int64_t kGeluTanh = 1;

at::Tensor activation(const at::Tensor& gate, int64_t act) {
  return act == kSilu ? at::silu(gate) : at::gelu(gate, "tanh");
}

// zerokit's column-sum kernels (lib/kernels/colsum.cu), launched by Rust (lib/kernels/mod.rs),
// which registers this entry once. It returns kLaunched, kUnavailable (no kernels for this
// device: the caller runs libtorch's ops) or kFailed with a malloc'd message in *error.
constexpr int kLaunched = 0;
// Columns a block of colsum.cu sums (its COLSUM_TILE), for the chunking chosen here.
constexpr int64_t kColumnTile = 128;
constexpr int kUnavailable = 1;
using ColumnSumsFn = int (*)(int64_t kind, const void* dy, const void* x, const void* mean, const void* rstd,
                             int64_t rows, int64_t cols, int64_t rows_per_chunk, int64_t chunks, void* part_b,
                             void* part_g, void* out_b, void* out_g, int64_t device, char** error);
std::atomic<ColumnSumsFn> column_sums_fn{nullptr};

// Throws the message of a launcher that failed (kFailed), freeing it.
void launch_failed(const char* what, char* error) {
  std::string msg = error ? error : "failed";
  free(error);
  TORCH_CHECK(false, what, ": ", msg);
}

// The kind codes of the kernels, mirrored in lib/kernels/mod.rs; -1: none for this type.
int64_t kind_code(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return 0;
    case at::kBFloat16: return 1;
    case at::kHalf: return 2;
    default: return -1;
  }
}

// The sums over rows of dy [rows, cols] (b) and, with x, mean and rstd (a LayerNorm's input and
// statistics), of dy * (x - mean) * rstd (g), in dy's type, by the column-sum kernels; nullopt
// where they cannot run (the caller then makes libtorch's own calls). The chunking depends only
// on the shape, so the sums are the same bits on every run: about 1024 blocks of 128 columns.
std::optional<std::pair<at::Tensor, at::Tensor>> column_sums(const at::Tensor& dy_in, const at::Tensor* x_in,
                                                             const at::Tensor* mean, const at::Tensor* rstd) {
  const ColumnSumsFn fn = column_sums_fn.load();
  const int64_t kind = kind_code(dy_in.scalar_type());
  if (!fn || !dy_in.is_cuda() || kind < 0 || dy_in.dim() < 1) return std::nullopt;
  const int64_t cols = dy_in.size(-1);
  const int64_t rows = cols == 0 ? 0 : dy_in.numel() / cols;
  if (rows == 0 || cols == 0 || cols > INT32_MAX) return std::nullopt;
  const at::Tensor dy = dy_in.contiguous();
  at::Tensor x, m, r;
  if (x_in) {
    if (x_in->scalar_type() != dy.scalar_type() || mean->scalar_type() != at::kFloat) return std::nullopt;
    x = x_in->contiguous();
    m = mean->contiguous();
    r = rstd->contiguous();
  }
  const int64_t tiles = (cols + kColumnTile - 1) / kColumnTile;
  const int64_t want = std::max<int64_t>(1, std::min<int64_t>((1024 + tiles - 1) / tiles, (rows + 7) / 8));
  const int64_t rows_per_chunk = (rows + want - 1) / want;
  const int64_t chunks = (rows + rows_per_chunk - 1) / rows_per_chunk;
  at::Tensor part = at::empty({x_in ? 2 * chunks : chunks, cols}, dy.options().dtype(at::kFloat));
  at::Tensor out_b = at::empty({cols}, dy.options());
  at::Tensor out_g = x_in ? at::empty({cols}, dy.options()) : at::Tensor();
  char* error = nullptr;
  const int status = fn(kind, dy.data_ptr(), x_in ? x.data_ptr() : nullptr, x_in ? m.data_ptr() : nullptr,
                        x_in ? r.data_ptr() : nullptr, rows, cols, rows_per_chunk, chunks, part.data_ptr(),
                        x_in ? part[chunks].data_ptr() : nullptr, out_b.data_ptr(),
                        x_in ? out_g.data_ptr() : nullptr, dy.get_device(), &error);
  if (status == kUnavailable) return std::nullopt;
  if (status != kLaunched) launch_failed("column sums", error);
  return std::make_pair(out_b, out_g);
}

// A bias's gradient, the sum of grad's rows ([rows, out]): the kernel where it runs, else the
// reduction autograd makes for addmm's broadcast bias.
at::Tensor bias_grad(const at::Tensor& grad) {
  if (auto sums = column_sums(grad, nullptr, nullptr, nullptr)) return sums->first;
  return grad.sum(0);
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
// row-major operands (grad @ weight^T, act^T @ grad) and the activation's, so values and those
// gradients are bitwise the composed ops'; the bias's is Linear's.
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
    at::Tensor grad_bias = bias_grad(grad);
    at::Tensor grad_act = grad.mm(weight.t());
    at::Tensor grad_pre =
        act == kSilu ? at::silu_backward(grad_act, pre) : at::gelu_backward(grad_act, pre, "tanh");
    return {grad_pre, grad_weight, grad_bias, at::Tensor()};
  }
};

// bias + x @ weight, a Conv1D (weight [in, out], x [rows, in]), as addmm computes it. Its backward
// makes addmm's own calls for row-major operands (grad @ weight^T, x^T @ grad), so those
// gradients are bitwise autograd's; the bias's comes from the column-sum kernel on a GPU, which
// reads grad once at close to the memory bandwidth (libtorch's reduction reaches about a third
// to a half), and from autograd's reduction elsewhere.
struct Linear : public torch::autograd::Function<Linear> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& weight,
                            const at::Tensor& bias) {
    ctx->save_for_backward({x, weight});
    return at::addmm(bias, x, weight);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor& x = saved[0];
    const at::Tensor& weight = saved[1];
    const at::Tensor& grad = grads[0];
    at::Tensor grad_x = ctx->needs_input_grad(0) ? grad.mm(weight.t()) : at::Tensor();
    return {grad_x, x.t().mm(grad), bias_grad(grad)};
  }
};

// zerokit's LayerNorm kernels (lib/kernels/layernorm.cu), launched by Rust (lib/kernels/norm.rs),
// which registers both entries once; they return as ColumnSumsFn does.
using LayerNormForwardFn = int (*)(int64_t kind, const void* x, const void* res, void* sum, const void* w,
                                   const void* b, void* out, void* mean, void* rstd, int64_t rows, int64_t cols,
                                   double eps, int64_t device, char** error);
using LayerNormBackwardFn = int (*)(int64_t kind, const void* dy, const void* x, const void* mean, const void* rstd,
                                    const void* w, const void* dres, void* dx, int64_t rows, int64_t cols,
                                    int64_t device, char** error);
std::atomic<LayerNormForwardFn> layer_norm_forward_fn{nullptr};
std::atomic<LayerNormBackwardFn> layer_norm_backward_fn{nullptr};

// Whether the LayerNorm kernels can take these tensors: one CUDA device, one supported type.
bool layer_norm_kernels_take(std::initializer_list<const at::Tensor*> ts) {
  const at::Tensor& first = **ts.begin();
  if (!first.is_cuda() || kind_code(first.scalar_type()) < 0 || first.dim() < 1 || first.numel() == 0) return false;
  for (const at::Tensor* t : ts)
    if (t->defined() && (t->scalar_type() != first.scalar_type() || t->device() != first.device())) return false;
  return first.size(-1) <= INT32_MAX;
}

// The LayerNorm's forward by the kernel: {input, out, mean, rstd} with input = x, or x + res when
// res is defined (a new tensor); nullopt where the kernel cannot run. mean and rstd have
// native_layer_norm's shape (x's with a last dimension of 1), so either backward can read them.
std::optional<std::array<at::Tensor, 4>> layer_norm_kernel_forward(const at::Tensor& x_in, const at::Tensor& res_in,
                                                                   const at::Tensor& w_in, const at::Tensor& b_in,
                                                                   double eps) {
  const LayerNormForwardFn fn = layer_norm_forward_fn.load();
  if (!fn || !layer_norm_kernels_take({&x_in, &res_in, &w_in, &b_in})) return std::nullopt;
  const at::Tensor x = x_in.contiguous(), w = w_in.contiguous(), b = b_in.contiguous();
  const at::Tensor res = res_in.defined() ? res_in.contiguous() : at::Tensor();
  const int64_t cols = x.size(-1), rows = x.numel() / cols;
  const at::Tensor input = res.defined() ? at::empty_like(x) : x;
  at::Tensor out = at::empty_like(x);
  std::vector<int64_t> stat_shape = x.sizes().vec();
  stat_shape.back() = 1;
  at::Tensor mean = at::empty(stat_shape, x.options().dtype(at::kFloat)), rstd = at::empty_like(mean);
  char* error = nullptr;
  const int status =
      fn(kind_code(x.scalar_type()), x.data_ptr(), res.defined() ? res.data_ptr() : nullptr,
         res.defined() ? input.data_ptr() : nullptr, w.data_ptr(), b.data_ptr(), out.data_ptr(), mean.data_ptr(),
         rstd.data_ptr(), rows, cols, eps, x.get_device(), &error);
  if (status == kUnavailable) return std::nullopt;
  if (status != kLaunched) launch_failed("layer_norm forward", error);
  return std::array<at::Tensor, 4>{input, out, mean, rstd};
}

// The LayerNorm's input gradient by the kernel, plus dres where it is defined; nullopt where the
// kernel cannot run.
std::optional<at::Tensor> layer_norm_kernel_backward(const at::Tensor& dy_in, const at::Tensor& x,
                                                     const at::Tensor& mean, const at::Tensor& rstd,
                                                     const at::Tensor& w_in, const at::Tensor& dres_in) {
  const LayerNormBackwardFn fn = layer_norm_backward_fn.load();
  if (!fn || !layer_norm_kernels_take({&x, &dy_in, &w_in, &dres_in}) || mean.scalar_type() != at::kFloat)
    return std::nullopt;
  const at::Tensor dy = dy_in.contiguous(), w = w_in.contiguous();
  const at::Tensor dres = dres_in.defined() ? dres_in.contiguous() : at::Tensor();
  const int64_t cols = x.size(-1), rows = x.numel() / cols;
  at::Tensor dx = at::empty_like(x);
  char* error = nullptr;
  const int status = fn(kind_code(x.scalar_type()), dy.data_ptr(), x.data_ptr(), mean.data_ptr(), rstd.data_ptr(),
                        w.data_ptr(), dres.defined() ? dres.data_ptr() : nullptr, dx.data_ptr(), rows, cols,
                        x.get_device(), &error);
  if (status == kUnavailable) return std::nullopt;
  if (status != kLaunched) launch_failed("layer_norm backward", error);
  return dx;
}

// The two functions' shared work. forward: saves what backward reads and returns {input, out}.
std::pair<at::Tensor, at::Tensor> layer_norm_forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& res,
                              const at::Tensor& weight, const at::Tensor& bias, double eps) {
  at::Tensor input, out, mean, rstd;
  if (auto k = layer_norm_kernel_forward(x, res, weight, bias, eps)) {
    input = (*k)[0];
    out = (*k)[1];
    mean = (*k)[2];
    rstd = (*k)[3];
  } else {
    input = res.defined() ? at::add(x, res) : x;
    std::tie(out, mean, rstd) = at::native_layer_norm(input, {x.size(-1)}, weight, bias, eps);
  }
  ctx->save_for_backward({input, weight, bias, mean, rstd});
  return {input, out};
}

// {input's gradient (plus dres where defined), weight's, bias's} for out's gradient `grad`.
std::array<at::Tensor, 3> layer_norm_backward(AutogradContext* ctx, const at::Tensor& grad, const at::Tensor& dres,
                                              bool input_grad) {
  const auto saved = ctx->get_saved_variables();
  const at::Tensor &x = saved[0], &weight = saved[1], &bias = saved[2], &mean = saved[3], &rstd = saved[4];
  if (!grad.defined()) return {dres, at::Tensor(), at::Tensor()};
  std::optional<std::pair<at::Tensor, at::Tensor>> sums;
  if (weight.scalar_type() == x.scalar_type()) sums = column_sums(grad, &x, &mean, &rstd);
  const bool fused = sums.has_value();
  std::optional<at::Tensor> kernel_dx;
  if (input_grad) kernel_dx = layer_norm_kernel_backward(grad, x, mean, rstd, weight, dres);
  const bool need_libtorch_dx = input_grad && !kernel_dx;
  at::Tensor grad_x, grad_w, grad_b;
  if (need_libtorch_dx || !fused) {
    std::tie(grad_x, grad_w, grad_b) = at::native_layer_norm_backward(grad, x, {x.size(-1)}, mean, rstd, weight, bias,
                                                                     {need_libtorch_dx, !fused, !fused});
    // The order in which autograd would add the two paths' gradients.
    if (need_libtorch_dx && dres.defined()) grad_x = at::add(dres, grad_x);
  }
  if (kernel_dx) grad_x = *kernel_dx;
  if (fused) {
    grad_b = sums->first;
    grad_w = sums->second;
  }
  return {grad_x, grad_w, grad_b};
}

// LayerNorm over the last dimension of x. On a GPU zerokit's kernels (one pass over the rows
// each way); the gain's and bias's gradients come from the column-sum kernel (libtorch's
// gamma/beta kernel is the slowest part of GPT-2's LayerNorm backward). Elsewhere
// native_layer_norm and native_layer_norm_backward, as autograd would call them.
struct LayerNorm : public torch::autograd::Function<LayerNorm> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& weight,
                            const at::Tensor& bias, double eps) {
    return layer_norm_forward(ctx, x, at::Tensor(), weight, bias, eps).second;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    auto [gx, gw, gb] = layer_norm_backward(ctx, grads[0], at::Tensor(), ctx->needs_input_grad(0));
    return {gx, gw, gb, at::Tensor()};
  }
};

// {x + res, LayerNorm(x + res)}: the residual add before a pre-norm block's LayerNorm, with it.
// On a GPU the kernels make the add in the normalisation's pass and, in backward, add the sum's
// gradient (the residual path's) to the LayerNorm's input gradient in its pass, where autograd
// would make a kernel of each. Elsewhere the add and LayerNorm's libtorch path.
struct AddLayerNorm : public torch::autograd::Function<AddLayerNorm> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& res,
                               const at::Tensor& weight, const at::Tensor& bias, double eps) {
    auto [input, out] = layer_norm_forward(ctx, x, res, weight, bias, eps);
    return {input, out};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const bool input_grad = ctx->needs_input_grad(0) || ctx->needs_input_grad(1);
    auto [gx, gw, gb] = layer_norm_backward(ctx, grads[1], grads[0], input_grad);
    return {gx, gx, gw, gb, at::Tensor()};
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

// *out = bias + x @ weight through Linear (a new tensor handle the caller owns).
extern "C" char* zerokit_linear(const at::Tensor* x, const at::Tensor* weight, const at::Tensor* bias,
                                at::Tensor** out) {
  return guarded([&] {
    TORCH_CHECK(x->dim() == 2 && weight->dim() == 2 && bias->dim() == 1, "linear takes x [rows, in], ",
                "weight [in, out] and bias [out], not ", x->sizes(), ", ", weight->sizes(), " and ", bias->sizes());
    *out = new at::Tensor(Linear::apply(*x, *weight, *bias));
  });
}

// LayerNorm's shape check: x [..., C], weight [C] and bias [C] (and res as x).
static void check_layer_norm(const at::Tensor& x, const at::Tensor* res, const at::Tensor& weight, const at::Tensor& bias) {
  TORCH_CHECK(x.dim() >= 1 && weight.dim() == 1 && bias.dim() == 1 && weight.size(0) == x.size(-1) &&
                  bias.size(0) == x.size(-1) && (!res || res->sizes() == x.sizes()),
              "layer_norm takes x [..., C]", res ? ", res as x" : "", ", weight [C] and bias [C], not ", x.sizes(),
              res ? ", " : "", res ? res->sizes() : at::IntArrayRef{}, ", ", weight.sizes(), " and ", bias.sizes());
}

// *out = LayerNorm of x over its last dimension through LayerNorm (a new handle the caller owns).
extern "C" char* zerokit_layer_norm(const at::Tensor* x, const at::Tensor* weight, const at::Tensor* bias, double eps,
                                    at::Tensor** out) {
  return guarded([&] {
    check_layer_norm(*x, nullptr, *weight, *bias);
    *out = new at::Tensor(LayerNorm::apply(*x, *weight, *bias, eps));
  });
}

// *sum = x + res and *out = LayerNorm of the sum through AddLayerNorm (new handles the caller owns).
extern "C" char* zerokit_add_layer_norm(const at::Tensor* x, const at::Tensor* res, const at::Tensor* weight,
                                        const at::Tensor* bias, double eps, at::Tensor** sum, at::Tensor** out) {
  return guarded([&] {
    check_layer_norm(*x, res, *weight, *bias);
    variable_list outs = AddLayerNorm::apply(*x, *res, *weight, *bias, eps);
    *sum = new at::Tensor(std::move(outs[0]));
    *out = new at::Tensor(std::move(outs[1]));
  });
}

// Registers the column-sum kernels' launcher (lib/kernels/sums.rs); nullptr unregisters it.
extern "C" void zerokit_set_column_sums(ColumnSumsFn fn) { column_sums_fn.store(fn); }

// Registers the LayerNorm kernels' launchers (lib/kernels/norm.rs); nullptr unregisters them.
extern "C" void zerokit_set_layer_norm(LayerNormForwardFn forward, LayerNormBackwardFn backward) {
  layer_norm_forward_fn.store(forward);
  layer_norm_backward_fn.store(backward);
}
