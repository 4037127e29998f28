// LayerNorm over the last dimension, forward and the input's gradient, each with the residual add
// that precedes a pre-norm block's LayerNorm folded in. Compiled at run time by NVRTC
// (lib/kernels/mod.rs), after common.cuh.
//
// In GPT-2 every LayerNorm but the first reads the residual stream just after an add
// (x + attention, x + MLP). Eagerly that is an add kernel (read two tensors, write one), then
// libtorch's LayerNorm (1.8 TB/s on an H200 for GPT-2 XL's [8192, 1600] rows), and in backward
// autograd adds the LayerNorm's input gradient to the residual gradient in one more kernel.
// Here the forward reads x and the branch once and writes the sum and the normalised output;
// the backward reads dy, the sum and the residual's gradient once and writes their total.
//
// One warp a row. Rows of up to 2048 columns are held in registers (each read from DRAM once,
// all its loads in flight together); wider ones are read again by each pass, from L1/L2. Statistics are in fp32 from two passes (mean, then the mean squared deviation), as
// exact as libtorch's Welford; mean and rstd are kept in fp32 for backward and for the
// column-sum kernel that computes the gain's and bias's gradients (colsum.cu).

#define LN_WARPS 4
// Quads of 4 columns a lane keeps in registers in the cached kernels: rows up to 2048 wide.
#define LN_QUADS 16

// v as a T holds it: what an op that stores into T leaves for the next op to read.
template <typename T>
__device__ __forceinline__ float rounded(float v) {
  T t;
  store(&t, v);
  return to_float(t);
}

// out = LayerNorm(in) * w + b for in = x, or in = x + res (rounded to T and written to sum, as
// the add that it replaces would have), row by row; mean and rstd [rows] receive the statistics.
template <typename T>
__device__ void ln_forward_wide(const T* x, const T* res, T* sum, const T* w, const T* b, T* out, float* mean,
                                float* rstd, long long row, int cols, float eps, int vec) {
  const int lane = threadIdx.x;
  const long long at = row * cols;
  const T* in = x + at;
  float s = 0.0f;
  if (res) {
    for (int c = lane * 4; c < cols; c += 128) {
      float a[4], r[4];
      load4(x + at, c, cols, vec, a);
      load4(res + at, c, cols, vec, r);
      for (int j = 0; j < 4; ++j) {
        a[j] = rounded<T>(a[j] + r[j]);
        s += a[j];
      }
      store4(sum + at, c, cols, vec, a);
    }
    // The next passes read the sum back: each lane its own columns, which it has just written.
    in = sum + at;
  } else {
    for (int c = lane * 4; c < cols; c += 128) {
      float a[4];
      load4(in, c, cols, vec, a);
      for (int j = 0; j < 4; ++j) s += a[j];
    }
  }
  // Past the row's end load4 gives zeros, which add nothing to the sum but would add m^2 each to
  // the squared deviations: those are counted only within the row.
  const float m = warp_sum(s) / cols;
  float q = 0.0f;
  for (int c = lane * 4; c < cols; c += 128) {
    float a[4];
    load4(in, c, cols, vec, a);
    for (int j = 0; j < 4; ++j) {
      const float d = c + j < cols ? a[j] - m : 0.0f;
      q += d * d;
    }
  }
  const float r = rsqrtf(warp_sum(q) / cols + eps);
  for (int c = lane * 4; c < cols; c += 128) {
    float a[4], g[4], h[4];
    load4(in, c, cols, vec, a);
    load4(w, c, cols, vec, g);
    load4(b, c, cols, vec, h);
    for (int j = 0; j < 4; ++j) a[j] = (a[j] - m) * r * g[j] + h[j];
    store4(out + at, c, cols, vec, a);
  }
  if (lane == 0) {
    mean[row] = m;
    rstd[row] = r;
  }
}

// dx = rstd * (dy*w - mean(dy*w) - xhat * mean(dy*w*xhat)) (+ dres, the gradient that reached
// the LayerNorm's input by the residual path), xhat = (x - mean) * rstd, row by row.
template <typename T>
__device__ void ln_backward_wide(const T* dy, const T* x, const float* mean, const float* rstd, const T* w,
                                 const T* dres, T* dx, long long row, int cols, int vec) {
  const int lane = threadIdx.x;
  const long long at = row * cols;
  const float m = mean[row], r = rstd[row];
  // Past the row's end dy is zero, so both sums only count the row.
  float sg = 0.0f, sgx = 0.0f;
  for (int c = lane * 4; c < cols; c += 128) {
    float d[4], a[4], g[4];
    load4(dy + at, c, cols, vec, d);
    load4(x + at, c, cols, vec, a);
    load4(w, c, cols, vec, g);
    for (int j = 0; j < 4; ++j) {
      const float dg = __fmul_rn(d[j], g[j]);
      sg += dg;
      sgx += dg * ((a[j] - m) * r);
    }
  }
  const float mg = warp_sum(sg) / cols, mgx = warp_sum(sgx) / cols;
  for (int c = lane * 4; c < cols; c += 128) {
    float d[4], a[4], g[4], e[4];
    load4(dy + at, c, cols, vec, d);
    load4(x + at, c, cols, vec, a);
    load4(w, c, cols, vec, g);
    if (dres) {
      load4(dres + at, c, cols, vec, e);
    } else {
      for (int j = 0; j < 4; ++j) e[j] = 0.0f;
    }
    for (int j = 0; j < 4; ++j) d[j] = (__fmul_rn(d[j], g[j]) - mg - (a[j] - m) * r * mgx) * r + e[j];
    store4(dx + at, c, cols, vec, d);
  }
}

// A row's quad at column c as loaded, in T's own bits (two registers for 16-bit types, four for
// fp32): zero past the row's end.
template <typename T>
__device__ __forceinline__ void load_quad(const T* p, int c, int cols, bool vec, Quad<T>& q) {
  if (vec && c < cols) {
    q.raw = *reinterpret_cast<const typename QuadBits<T>::type*>(p + c);
  } else {
    for (int j = 0; j < 4; ++j) {
      if (c + j < cols) {
        q.v[j] = p[c + j];
      } else {
        store(&q.v[j], 0.0f);
      }
    }
  }
}

template <typename T>
__device__ __forceinline__ void unpack(const Quad<T>& q, float out[4]) {
  for (int j = 0; j < 4; ++j) out[j] = to_float(q.v[j]);
}

// The same, for rows of at most LN_QUADS * 128 columns (GPT-2's up to XL): each lane loads its
// quads of the row at once and keeps them in T's bits, so all of a row's loads are in flight
// together and DRAM is read once. Kept as floats, a row cost the backward 253 registers (8 warps
// an SM): slower than the loops that re-read it.
template <typename T>
__device__ void ln_forward_cached(const T* __restrict__ x, const T* __restrict__ res, T* __restrict__ sum,
                                  const T* __restrict__ w, const T* __restrict__ b, T* __restrict__ out, float* mean,
                                  float* rstd, long long row, int cols, float eps, int vec) {
  const int lane = threadIdx.x;
  const long long at = row * cols;
  Quad<T> v[LN_QUADS];
#pragma unroll
  for (int q = 0; q < LN_QUADS; ++q) load_quad(x + at, lane * 4 + q * 128, cols, vec, v[q]);
  if (res) {
    // The sum as the add would store it: rounded to T (v holds T's bits).
#pragma unroll
    for (int q = 0; q < LN_QUADS; ++q) {
      const int c = lane * 4 + q * 128;
      if (c < cols) {
        float a[4], r[4];
        unpack(v[q], a);
        load4(res + at, c, cols, vec, r);
        for (int j = 0; j < 4; ++j) store(&v[q].v[j], a[j] + r[j]);
        float t[4];
        unpack(v[q], t);
        store4(sum + at, c, cols, vec, t);
      }
    }
  }
  // Zeros past the row's end add nothing to the sum; the deviations are counted within the row.
  float s = 0.0f;
#pragma unroll
  for (int q = 0; q < LN_QUADS; ++q) {
    float a[4];
    unpack(v[q], a);
    for (int j = 0; j < 4; ++j) s += a[j];
  }
  const float m = warp_sum(s) / cols;
  float dev = 0.0f;
#pragma unroll
  for (int q = 0; q < LN_QUADS; ++q) {
    float a[4];
    unpack(v[q], a);
    for (int j = 0; j < 4; ++j) {
      const float d = lane * 4 + q * 128 + j < cols ? a[j] - m : 0.0f;
      dev += d * d;
    }
  }
  const float r = rsqrtf(warp_sum(dev) / cols + eps);
#pragma unroll
  for (int q = 0; q < LN_QUADS; ++q) {
    const int c = lane * 4 + q * 128;
    if (c < cols) {
      float a[4], g[4], h[4];
      unpack(v[q], a);
      load4(w, c, cols, vec, g);
      load4(b, c, cols, vec, h);
      for (int j = 0; j < 4; ++j) a[j] = (a[j] - m) * r * g[j] + h[j];
      store4(out + at, c, cols, vec, a);
    }
  }
  if (lane == 0) {
    mean[row] = m;
    rstd[row] = r;
  }
}

template <typename T>
__device__ void ln_backward_cached(const T* __restrict__ dy, const T* __restrict__ x, const float* mean,
                                   const float* rstd, const T* __restrict__ w, const T* __restrict__ dres,
                                   T* __restrict__ dx, long long row, int cols, int vec) {
  const int lane = threadIdx.x;
  const long long at = row * cols;
  const float m = mean[row], r = rstd[row];
  // dy and x in T's bits; dy * w and xhat are recomputed from them in the second pass.
  Quad<T> d[LN_QUADS], a[LN_QUADS];
#pragma unroll
  for (int q = 0; q < LN_QUADS; ++q) {
    load_quad(dy + at, lane * 4 + q * 128, cols, vec, d[q]);
    load_quad(x + at, lane * 4 + q * 128, cols, vec, a[q]);
  }
  // Past the row's end dy is zero, so both sums only count the row.
  float sg = 0.0f, sgx = 0.0f;
#pragma unroll
  for (int q = 0; q < LN_QUADS; ++q) {
    const int c = lane * 4 + q * 128;
    if (c < cols) {
      float dv[4], av[4], g[4];
      unpack(d[q], dv);
      unpack(a[q], av);
      load4(w, c, cols, vec, g);
      for (int j = 0; j < 4; ++j) {
        const float dg = __fmul_rn(dv[j], g[j]);
        sg += dg;
        sgx += dg * ((av[j] - m) * r);
      }
    }
  }
  const float mg = warp_sum(sg) / cols, mgx = warp_sum(sgx) / cols;
#pragma unroll
  for (int q = 0; q < LN_QUADS; ++q) {
    const int c = lane * 4 + q * 128;
    if (c < cols) {
      float dv[4], av[4], g[4], e[4] = {0.0f, 0.0f, 0.0f, 0.0f};
      unpack(d[q], dv);
      unpack(a[q], av);
      load4(w, c, cols, vec, g);
      if (dres) load4(dres + at, c, cols, vec, e);
      for (int j = 0; j < 4; ++j) dv[j] = (__fmul_rn(dv[j], g[j]) - mg - (av[j] - m) * r * mgx) * r + e[j];
      store4(dx + at, c, cols, vec, dv);
    }
  }
}

#define LN_KERNELS(SUFFIX, T)                                                                                        \
  extern "C" __global__ void ln_forward_##SUFFIX(const T* x, const T* res, T* sum, const T* w, const T* b, T* out,   \
                                                 float* mean, float* rstd, long long rows, int cols, float eps,      \
                                                 int vec) {                                                          \
    const long long row = (long long)blockIdx.x * LN_WARPS + threadIdx.y;                                            \
    if (row >= rows) return;                                                                                         \
    if (cols <= LN_QUADS * 128) {                                                                                    \
      ln_forward_cached(x, res, sum, w, b, out, mean, rstd, row, cols, eps, vec);                                    \
    } else {                                                                                                         \
      ln_forward_wide(x, res, sum, w, b, out, mean, rstd, row, cols, eps, vec);                                      \
    }                                                                                                                \
  }                                                                                                                  \
  extern "C" __global__ void ln_backward_##SUFFIX(const T* dy, const T* x, const float* mean, const float* rstd,     \
                                                  const T* w, const T* dres, T* dx, long long rows, int cols,        \
                                                  int vec) {                                                         \
    const long long row = (long long)blockIdx.x * LN_WARPS + threadIdx.y;                                            \
    if (row >= rows) return;                                                                                         \
    if (cols <= LN_QUADS * 128) {                                                                                    \
      ln_backward_cached(dy, x, mean, rstd, w, dres, dx, row, cols, vec);                                            \
    } else {                                                                                                         \
      ln_backward_wide(dy, x, mean, rstd, w, dres, dx, row, cols, vec);                                              \
    }                                                                                                                \
  }

LN_KERNELS(f32, float)
LN_KERNELS(bf16, bf16)
LN_KERNELS(f16, f16)
