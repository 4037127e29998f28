// Types and conversions shared by zerokit's NVRTC kernels (lib/kernels/mod.rs compiles this file
// first, then each kernel file, as one source). No headers: NVRTC runs without CUDA's, and the
// half-precision conversions are single PTX instructions.

typedef unsigned short u16;

struct bf16 { u16 bits; };
struct f16 { u16 bits; };

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(bf16 x) { return __uint_as_float(((unsigned)x.bits) << 16); }
__device__ __forceinline__ float to_float(f16 x) {
  float f;
  asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(x.bits));
  return f;
}

// Round to nearest even, as libtorch's casts do.
__device__ __forceinline__ void store(float* p, float v) { *p = v; }
__device__ __forceinline__ void store(bf16* p, float v) {
  u16 b;
  asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(b) : "f"(v));
  p->bits = b;
}
__device__ __forceinline__ void store(f16* p, float v) {
  u16 b;
  asm("cvt.rn.f16.f32 %0, %1;" : "=h"(b) : "f"(v));
  p->bits = b;
}
