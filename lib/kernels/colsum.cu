// Column sums of a [rows, cols] gradient, for the parameter gradients that libtorch computes as a
// reduction over rows: a linear layer's bias (sum of dy) and LayerNorm's gain and bias (sums of
// dy * xhat and of dy, xhat = (x - mean) * rstd). Compiled at run time by NVRTC
// (lib/kernels/mod.rs), after common.cuh's types and conversions.
//
// libtorch's reductions read these [tokens, C] tensors at a third to a half of the memory
// bandwidth (GPT-2's LayerNorm gain/bias backward most slowly). Here every block streams a tile of
// 128 columns over one chunk of rows, each thread 4 adjacent columns, and writes fp32 partial
// sums; a second kernel adds a column's partials in chunk order. The chunking depends on the
// shape only (lib/kernels/ops.cpp chooses it), so the result is the same bits on every run:
// no atomics.

#define COLSUM_TILE 128
#define COLSUM_WARPS 8
#define COLSUM_UNROLL 4

// Four adjacent elements, read as one 8-byte (16-bit types) or 16-byte (fp32) load when `vec`.
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
__device__ __forceinline__ void load4(const T* p, int c, int cols, bool vec, float out[4]) {
  if (vec) {
    Quad<T> q;
    q.raw = *reinterpret_cast<const typename QuadBits<T>::type*>(p + c);
    for (int j = 0; j < 4; ++j) out[j] = to_float(q.v[j]);
  } else {
    for (int j = 0; j < 4; ++j) out[j] = c + j < cols ? to_float(p[c + j]) : 0.0f;
  }
}

// Block (32, COLSUM_WARPS) sums columns [blockIdx.x * 128, +128) over rows [blockIdx.y * rpc, +rpc)
// into part_b (sum of dy) and, when x is given, part_g (sum of dy * xhat): [chunks, cols] each.
template <typename T>
__device__ void colsum_partial(const T* dy, const T* x, const float* mean, const float* rstd, long long rows,
                               int cols, long long rpc, int vec, float* part_b, float* part_g) {
  const int c = blockIdx.x * COLSUM_TILE + threadIdx.x * 4;
  const long long r0 = blockIdx.y * rpc;
  const long long r1 = min(rows, r0 + rpc);
  float sb[4] = {0.0f, 0.0f, 0.0f, 0.0f}, sg[4] = {0.0f, 0.0f, 0.0f, 0.0f};
  if (c < cols) {
    // UNROLL rows a warp at a time, their loads issued before any is used: one row's 8 bytes a
    // thread leave too few bytes in flight to cover memory latency (the first version of this
    // kernel read at 1.9 TB/s). The rows are still added in increasing order.
    long long r = r0 + threadIdx.y;
    for (; r + (COLSUM_UNROLL - 1) * COLSUM_WARPS < r1; r += COLSUM_UNROLL * COLSUM_WARPS) {
      float g[COLSUM_UNROLL][4], xv[COLSUM_UNROLL][4];
#pragma unroll
      for (int u = 0; u < COLSUM_UNROLL; ++u) load4(dy + (r + u * COLSUM_WARPS) * cols, c, cols, vec, g[u]);
      if (x) {
#pragma unroll
        for (int u = 0; u < COLSUM_UNROLL; ++u) load4(x + (r + u * COLSUM_WARPS) * cols, c, cols, vec, xv[u]);
      }
#pragma unroll
      for (int u = 0; u < COLSUM_UNROLL; ++u) {
        for (int j = 0; j < 4; ++j) sb[j] += g[u][j];
        if (x) {
          const float m = mean[r + u * COLSUM_WARPS], s = rstd[r + u * COLSUM_WARPS];
          for (int j = 0; j < 4; ++j) sg[j] += g[u][j] * ((xv[u][j] - m) * s);
        }
      }
    }
    for (; r < r1; r += COLSUM_WARPS) {
      float g[4];
      load4(dy + r * cols, c, cols, vec, g);
      for (int j = 0; j < 4; ++j) sb[j] += g[j];
      if (x) {
        float xv[4];
        load4(x + r * cols, c, cols, vec, xv);
        const float m = mean[r], s = rstd[r];
        for (int j = 0; j < 4; ++j) sg[j] += g[j] * ((xv[j] - m) * s);
      }
    }
  }
  // The warps' sums, added in warp order by the first warp.
  __shared__ float sh_b[COLSUM_WARPS][COLSUM_TILE], sh_g[COLSUM_WARPS][COLSUM_TILE];
  for (int j = 0; j < 4; ++j) {
    sh_b[threadIdx.y][threadIdx.x * 4 + j] = sb[j];
    sh_g[threadIdx.y][threadIdx.x * 4 + j] = sg[j];
  }
  __syncthreads();
  if (threadIdx.y != 0) return;
  for (int j = 0; j < 4; ++j) {
    const int col = c + j;
    if (col >= cols) break;
    float b = 0.0f, gg = 0.0f;
    for (int w = 0; w < COLSUM_WARPS; ++w) {
      b += sh_b[w][threadIdx.x * 4 + j];
      gg += sh_g[w][threadIdx.x * 4 + j];
    }
    part_b[blockIdx.y * (long long)cols + col] = b;
    if (x) part_g[blockIdx.y * (long long)cols + col] = gg;
  }
}

// One thread per column: out[c] = the sum of part[0..chunks][c], in chunk order.
template <typename T>
__device__ void colsum_finish(const float* part, int chunks, int cols, T* out) {
  const int c = blockIdx.x * blockDim.x + threadIdx.x;
  if (c >= cols) return;
  float s = 0.0f;
  for (int k = 0; k < chunks; ++k) s += part[k * (long long)cols + c];
  store(&out[c], s);
}

#define COLSUM_KERNELS(SUFFIX, T)                                                                                \
  extern "C" __global__ void colsum_partial_##SUFFIX(const T* dy, const T* x, const float* mean,                \
                                                     const float* rstd, long long rows, int cols, long long rpc, \
                                                     int vec, float* part_b, float* part_g) {                  \
    colsum_partial(dy, x, mean, rstd, rows, cols, rpc, vec, part_b, part_g);                                    \
  }                                                                                                              \
  extern "C" __global__ void colsum_finish_##SUFFIX(const float* part, int chunks, int cols, T* out) {          \
    colsum_finish(part, chunks, cols, out);                                                                      \
  }

COLSUM_KERNELS(f32, float)
COLSUM_KERNELS(bf16, bf16)
COLSUM_KERNELS(f16, f16)
