// Column sums of a [rows, cols] gradient, for the parameter gradients that libtorch computes as a
// reduction over rows: a linear layer's bias (sum of dy) and LayerNorm's gain and bias (sums of
// dy * xhat and of dy, xhat = (x - mean) * rstd). Compiled at run time by NVRTC
// (lib/kernels/mod.rs), after common.cuh's types and conversions.
//
// libtorch's reductions read these [tokens, C] tensors at a third to a half of the memory
// bandwidth (GPT-2's LayerNorm gain/bias backward most slowly). Here every block streams a tile of
// 128 columns over one chunk of rows, each thread 4 adjacent columns, and writes fp32 partial
// sums; the last block of each column tile adds the tile's partials in chunk order. The
// chunking depends on the shape only (lib/kernels/ops.cpp chooses it), so the result is the same
// bits on every run: the one atomic only counts blocks.

#define COLSUM_TILE 128
#define COLSUM_WARPS 8
#define COLSUM_UNROLL 4

// Block (32, COLSUM_WARPS) sums columns [blockIdx.x * 128, +128) over rows [blockIdx.y * rpc, +rpc)
// into part_b (sum of dy) and, when x is given, part_g (sum of dy * xhat): [chunks, cols] each.
// The last block of a column tile to finish (counted in counters[blockIdx.x], which it resets to
// zero for the next launch) adds the tile's partials in chunk order into out_b and out_g: one
// launch, where a second kernel for the final sums cost a launch of its own (392 of them in a
// GPT-2 XL step).
template <typename T>
__device__ void colsum(const T* dy, const T* x, const float* mean, const float* rstd, long long rows, int cols,
                       long long rpc, int vec, float* part_b, float* part_g, T* out_b, T* out_g,
                       unsigned int* counters) {
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
  if (threadIdx.y == 0) {
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
  // Publish this block's partials, then count it in; the last of the tile's blocks sees all.
  __threadfence();
  __syncthreads();
  __shared__ bool last;
  if (threadIdx.x == 0 && threadIdx.y == 0) last = atomicAdd(&counters[blockIdx.x], 1u) == gridDim.y - 1;
  __syncthreads();
  if (!last) return;
  __threadfence();
  // 256 threads: the first 128 finish the tile's b sums, the next 128 its g sums. Volatile
  // loads: the other blocks' partials are not in this SM's L1.
  const int t = threadIdx.y * 32 + threadIdx.x;
  const int col = blockIdx.x * COLSUM_TILE + t % COLSUM_TILE;
  const bool g_sum = t >= COLSUM_TILE;
  if (col < cols && (!g_sum || x)) {
    const volatile float* part = g_sum ? part_g : part_b;
    float sum = 0.0f;
    for (unsigned k = 0; k < gridDim.y; ++k) sum += part[k * (long long)cols + col];
    store(g_sum ? &out_g[col] : &out_b[col], sum);
  }
  if (t == 0) counters[blockIdx.x] = 0;
}

#define COLSUM_KERNEL(SUFFIX, T)                                                                             \
  extern "C" __global__ void colsum_##SUFFIX(const T* dy, const T* x, const float* mean, const float* rstd,      \
                                             long long rows, int cols, long long rpc, int vec, float* part_b,     \
                                             float* part_g, T* out_b, T* out_g, unsigned int* counters) {         \
    colsum(dy, x, mean, rstd, rows, cols, rpc, vec, part_b, part_g, out_b, out_g, counters);                     \
  }

COLSUM_KERNEL(f32, float)
COLSUM_KERNEL(bf16, bf16)
COLSUM_KERNEL(f16, f16)
