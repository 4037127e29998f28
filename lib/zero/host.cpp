// What optimizer and parameter offload need of libtorch that tch does not expose: a tensor over
// host memory that zerokit allocated itself (page-locked, sized exactly: libtorch's pinned
// allocator rounds each block up to a power of two, up to twice the bytes), and a copy that does
// not wait for the device (`copy_(src, non_blocking=true)`). Compiled by build.rs with the other
// shims; the caller is lib/zero/host.rs.
//
// No C++ exception may unwind into Rust: errors come back as a malloc'd message the caller frees.

#include <ATen/core/Tensor.h>
#include <ATen/ops/from_blob.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <cstring>
#include <exception>

namespace {

char* message(const char* what) { return strdup(what); }

}  // namespace

// A 1-D CPU tensor of `numel` elements of `like`'s element type over `data`.
// libtorch calls `release(data)` when the last reference to the tensor's storage goes, so the
// memory lives exactly as long as some tensor views it.
extern "C" char* zerokit_host_tensor(void* data, int64_t numel, const at::Tensor* like, void (*release)(void*),
                                     at::Tensor** out) {
  try {
    auto options = at::TensorOptions().dtype(like->scalar_type()).device(at::kCPU);
    *out = new at::Tensor(at::from_blob(data, {numel}, [release](void* p) { release(p); }, options));
    return nullptr;
  } catch (const c10::Error& e) {
    return message(e.what_without_backtrace());
  } catch (const std::exception& e) {
    return message(e.what());
  }
}

// dst.copy_(src, non_blocking=true): between page-locked host memory and the device the copy is
// queued on the current stream and this call returns at once.
// A page-locked copy of a host tensor from libtorch's caching pinned allocator, which keeps each
// block until the non-blocking copies that read it have run. (tch's pin_memory passes a device,
// which libtorch now warns about.)
extern "C" char* zerokit_pin_memory(const at::Tensor* src, at::Tensor** out) {
  try {
    *out = new at::Tensor(src->pin_memory());
    return nullptr;
  } catch (const c10::Error& e) {
    return message(e.what_without_backtrace());
  } catch (const std::exception& e) {
    return message(e.what());
  }
}

extern "C" char* zerokit_copy_async(at::Tensor* dst, const at::Tensor* src) {
  try {
    dst->copy_(*src, /*non_blocking=*/true);
    return nullptr;
  } catch (const c10::Error& e) {
    return message(e.what_without_backtrace());
  } catch (const std::exception& e) {
    return message(e.what());
  }
}
