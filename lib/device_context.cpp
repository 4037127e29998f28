// libtorch's process-wide settings that tch does not expose: which scaled-dot-product attention
// kernels are tried first, deterministic algorithms, and its profiler's kernel traces. Compiled
// by build.rs as
// lib/optim/fused_adamw.cpp is (same headers, same C++ ABI); the caller is lib/device.rs.
//
// No C++ exception may unwind into Rust: errors come back as a malloc'd message the caller frees.

#include <ATen/Context.h>
#include <torch/csrc/autograd/profiler_kineto.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <cstring>
#include <exception>
#include <set>
#include <string>
#include <vector>

namespace {

char* message(const char* what) { return strdup(what); }

}  // namespace

// Puts `first` (an at::SDPBackend value: 0 math, 1 flash, 2 efficient, 3 cudnn) ahead of
// libtorch's default order; -1 restores that order. A backend that cannot run a call (a head
// size or dtype it lacks) is still skipped for the next in the order.
extern "C" char* zerokit_sdp_prefer(int32_t first) {
  try {
    std::vector<int64_t> order = {static_cast<int64_t>(at::SDPBackend::flash_attention),
                                  static_cast<int64_t>(at::SDPBackend::efficient_attention),
                                  static_cast<int64_t>(at::SDPBackend::math),
                                  static_cast<int64_t>(at::SDPBackend::cudnn_attention),
                                  static_cast<int64_t>(at::SDPBackend::overrideable)};
    if (first >= 0) {
      std::vector<int64_t> rest;
      for (int64_t b : order) {
        if (b != first) rest.push_back(b);
      }
      order = {first};
      order.insert(order.end(), rest.begin(), rest.end());
    }
    at::globalContext().setSDPPriorityOrder(order);
    // libtorch leaves cuDNN attention off unless asked; asking for it first turns it on.
    if (first == static_cast<int32_t>(at::SDPBackend::cudnn_attention)) {
      at::globalContext().setSDPUseCuDNN(true);
    }
    return nullptr;
  } catch (const c10::Error& e) {
    return message(e.what_without_backtrace());
  } catch (const std::exception& e) {
    return message(e.what());
  }
}

// torch.use_deterministic_algorithms(on) plus cuDNN's deterministic, non-benchmarking mode.
// warn_only: an op with no deterministic kernel warns instead of failing the run; but libtorch's
// flash and memory-efficient attention take their deterministic backward only when warn_only is
// off. Filling fresh allocations with NaN (libtorch's default in this mode) is turned off: it
// costs a pass over every new tensor, and no zerokit op reads memory it did not write.
extern "C" char* zerokit_set_deterministic(bool on, bool warn_only) {
  try {
    at::globalContext().setDeterministicAlgorithms(on, warn_only);
    at::globalContext().setDeterministicFillUninitializedMemory(false);
    at::globalContext().setDeterministicCuDNN(on);
    if (on) at::globalContext().setBenchmarkCuDNN(false);
    return nullptr;
  } catch (const c10::Error& e) {
    return message(e.what_without_backtrace());
  } catch (const std::exception& e) {
    return message(e.what());
  }
}

// A kernel-level trace through libtorch's own profiler (Kineto, with CUPTI on CUDA builds):
// every operator on the host and every kernel on the device between start and stop, saved by
// stop as a Chrome trace (chrome://tracing, Perfetto) at `path`.
extern "C" char* zerokit_trace_start() {
  try {
    using namespace torch::profiler::impl;
    const ProfilerConfig config(ProfilerState::KINETO);
    const std::set<ActivityType> activities = {ActivityType::CPU, ActivityType::CUDA};
    torch::autograd::profiler::prepareProfiler(config, activities);
    torch::autograd::profiler::enableProfiler(config, activities);
    return nullptr;
  } catch (const c10::Error& e) {
    return message(e.what_without_backtrace());
  } catch (const std::exception& e) {
    return message(e.what());
  }
}

extern "C" char* zerokit_trace_stop(const char* path) {
  try {
    auto result = torch::autograd::profiler::disableProfiler();
    if (result) result->save(path);
    return nullptr;
  } catch (const c10::Error& e) {
    return message(e.what_without_backtrace());
  } catch (const std::exception& e) {
    return message(e.what());
  }
}
