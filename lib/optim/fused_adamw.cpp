// libtorch's fused AdamW (`at::_fused_adamw_`, what torch.optim.AdamW(fused=True) calls) for
// zerokit's flat fp32 shards. tch 0.24 does not expose the op; build.rs compiles this file against
// the same libtorch headers, with the same C++ ABI, as tch's own C++ layer, so a tch tensor
// handle (a pointer to an at::Tensor) can be passed straight in. The caller is lib/optim/fused.rs.
//
// No C++ exception may unwind into Rust: every error comes back as a status and a malloc'd
// message that the caller frees.

#include <ATen/core/Tensor.h>
#include <ATen/ops/_fused_adamw.h>
#include <c10/util/Exception.h>

#include <cstddef>
#include <cstring>
#include <exception>
#include <optional>
#include <vector>

namespace {

// Status codes, mirrored in lib/optim/fused.rs.
constexpr int kOk = 0;
// The dispatcher has no `_fused_adamw_` kernel for the tensors' device; nothing was modified.
constexpr int kNoKernel = 1;
constexpr int kError = 2;

// Copies of the caller's handles (reference counts, no data).
std::vector<at::Tensor> list(const at::Tensor* const* tensors, size_t n) {
  std::vector<at::Tensor> v;
  v.reserve(n);
  for (size_t i = 0; i < n; ++i) {
    v.push_back(*tensors[i]);
  }
  return v;
}

}  // namespace

// One `_fused_adamw_` call on n tensors of each kind (views of the flat shards), all at one
// weight decay, amsgrad and maximize off. No grad_scale / found_inf: the engine unscales, clips
// and checks for overflow before the step. `step_tensor` is a one-element fp32 tensor on the
// tensors' device holding the step count; the op only reads it (torch increments it before the
// call), so the same tensor serves every entry.
extern "C" int zerokit_fused_adamw(const at::Tensor* const* params, const at::Tensor* const* grads,
                                   const at::Tensor* const* exp_avgs, const at::Tensor* const* exp_avg_sqs, size_t n,
                                   const at::Tensor* step_tensor, double lr, double beta1, double beta2,
                                   double weight_decay, double eps, const at::Tensor* grad_scale,
                                   char** error) {
  *error = nullptr;
  try {
    const std::vector<at::Tensor> steps(n, *step_tensor);
    at::_fused_adamw_(list(params, n), list(grads, n), list(exp_avgs, n), list(exp_avg_sqs, n), {}, steps, lr, beta1,
                      beta2, weight_decay, eps, /*amsgrad=*/false, /*maximize=*/false,
                      grad_scale ? std::optional<at::Tensor>(*grad_scale) : std::nullopt);
    return kOk;
  } catch (const c10::NotImplementedError& e) {
    *error = strdup(e.what_without_backtrace());
    return kNoKernel;
  } catch (const c10::Error& e) {
    *error = strdup(e.what_without_backtrace());
    return kError;
  } catch (const std::exception& e) {
    *error = strdup(e.what());
    return kError;
  } catch (...) {
    *error = strdup("unknown C++ exception");
    return kError;
  }
}
