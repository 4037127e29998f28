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

// Four adjacent elements as one 8-byte (16-bit types) or 16-byte (fp32) load or store; the
// address must be aligned to that size.
template <typename T>
struct QuadBits {
  typedef uint2 type;
};
template <>
struct QuadBits<float> {
  typedef uint4 type;
};
template <typename T>
struct Quad {
  union {
    typename QuadBits<T>::type raw;
    T v[4];
  };
};

template <typename T>
__device__ __forceinline__ void quad_load(const T* p, float out[4]) {
  Quad<T> q;
  q.raw = *reinterpret_cast<const typename QuadBits<T>::type*>(p);
  for (int j = 0; j < 4; ++j) out[j] = to_float(q.v[j]);
}

template <typename T>
__device__ __forceinline__ void quad_store(T* p, const float in[4]) {
  Quad<T> q;
  for (int j = 0; j < 4; ++j) store(&q.v[j], in[j]);
  *reinterpret_cast<typename QuadBits<T>::type*>(p) = q.raw;
}

// Four adjacent columns from c of a row of `cols`, as one load when `vec` (cols a multiple of 4,
// the row aligned); otherwise one at a time, zero past the row's end.
template <typename T>
__device__ __forceinline__ void load4(const T* p, int c, int cols, bool vec, float out[4]) {
  if (vec) {
    quad_load(p + c, out);
  } else {
    for (int j = 0; j < 4; ++j) out[j] = c + j < cols ? to_float(p[c + j]) : 0.0f;
  }
}

// load4's store: nothing past the row's end.
template <typename T>
__device__ __forceinline__ void store4(T* p, int c, int cols, bool vec, const float in[4]) {
  if (vec) {
    quad_store(p + c, in);
  } else {
    for (int j = 0; j < 4; ++j)
      if (c + j < cols) store(&p[c + j], in[j]);
  }
}

// The sum of a warp's 32 values, in every lane (the same tree in every lane and on every run).
__device__ __forceinline__ float warp_sum(float s) {
  for (int off = 16; off > 0; off /= 2) s += __shfl_xor_sync(0xffffffffu, s, off);
  return s;
}
