// A 16-bit tensor widened into an fp32 one: a gradient bucket converted into the fp32 gradient
// partition. Compiled at run time by NVRTC (lib/kernels/mod.rs), after common.cuh.
//
// libtorch's copy_ between different types runs its unrolled elementwise kernel with a cast on
// every load and store (2 TB/s on an H200: 4.7 ms of GPT-2 XL's step); this moves 8 elements a
// thread with one 16-byte load and two 16-byte stores where both ends are aligned. Widening is
// exact, so the result is the same bits as libtorch's.

template <typename T>
__device__ void widen(const T* src, float* dst, long long n, int vec) {
  const long long stride = (long long)gridDim.x * blockDim.x;
  long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  if (vec) {
    const long long groups = n / 8;
    for (long long k = i; k < groups; k += stride) {
      union {
        uint4 raw;
        T v[8];
      } in;
      in.raw = reinterpret_cast<const uint4*>(src)[k];
      float4 lo = make_float4(to_float(in.v[0]), to_float(in.v[1]), to_float(in.v[2]), to_float(in.v[3]));
      float4 hi = make_float4(to_float(in.v[4]), to_float(in.v[5]), to_float(in.v[6]), to_float(in.v[7]));
      reinterpret_cast<float4*>(dst)[2 * k] = lo;
      reinterpret_cast<float4*>(dst)[2 * k + 1] = hi;
    }
    // The tail (fewer than 8 elements), one element a thread.
    for (long long k = groups * 8 + i; k < n; k += stride) dst[k] = to_float(src[k]);
  } else {
    for (long long k = i; k < n; k += stride) dst[k] = to_float(src[k]);
  }
}

extern "C" __global__ void widen_bf16(const bf16* src, float* dst, long long n, int vec) { widen(src, dst, n, vec); }
extern "C" __global__ void widen_f16(const f16* src, float* dst, long long n, int vec) { widen(src, dst, n, vec); }
