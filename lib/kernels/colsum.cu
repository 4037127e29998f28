// Column sums of a [rows, cols] gradient, for the parameter gradients that libtorch computes as a
// reduction over rows: a linear layer's bias (sum of dy) and LayerNorm's gain and bias (sums of
// dy * xhat and of dy, xhat = (x - mean) * rstd). Compiled at run time by NVRTC
// (lib/kernels/mod.rs), after common.cuh's types and conversions.
//
// libtorch's reductions read these [tokens, C] tensors at a third to a half of the memory
// bandwidth (GPT-2's LayerNorm gain/bias backward most slowly). Here every block streams a tile of
// 128 columns over one chunk of rows, each thread 4 adjacent columns, and writes fp32 partial
// sums; the last block of each column tile adds the tile's partials in a fixed order. The
// chunking depends on the shape only (lib/kernels/ops.cpp chooses it), so the result is the same
// bits on every run: the one atomic only counts blocks.

#define COLSUM_TILE 128
#define COLSUM_WARPS 8
#define COLSUM_UNROLL 4

// load4 of fp32 partials through L2 only (ld.global.cg): other blocks wrote them.
__device__ __forceinline__ void load4_l2(const float* p, int c, int cols, bool vec, float out[4]) {
  if (vec) {
    asm volatile("ld.global.cg.v4.f32 {%0, %1, %2, %3}, [%4];"
                 : "=f"(out[0]), "=f"(out[1]), "=f"(out[2]), "=f"(out[3])
                 : "l"(p + c));
  } else {
    for (int j = 0; j < 4; ++j) {
      out[j] = 0.0f;
      if (c + j < cols) asm volatile("ld.global.cg.f32 %0, [%1];" : "=f"(out[j]) : "l"(p + c + j));
    }
  }
}

// The block's warps' 4-column sums b and g, added in warp order: the totals land in the first
// warp's b and g.
__device__ __forceinline__ void add_warps(float b[4], float g[4]) {
  __shared__ float sh_b[COLSUM_WARPS][COLSUM_TILE], sh_g[COLSUM_WARPS][COLSUM_TILE];
  __syncthreads();  // an earlier call's reads are done
  for (int j = 0; j < 4; ++j) {
    sh_b[threadIdx.y][threadIdx.x * 4 + j] = b[j];
    sh_g[threadIdx.y][threadIdx.x * 4 + j] = g[j];
  }
  __syncthreads();
  if (threadIdx.y != 0) return;
  for (int j = 0; j < 4; ++j) {
    b[j] = 0.0f;
    g[j] = 0.0f;
    for (int w = 0; w < COLSUM_WARPS; ++w) {
      b[j] += sh_b[w][threadIdx.x * 4 + j];
      g[j] += sh_g[w][threadIdx.x * 4 + j];
    }
  }
}

// Block (32, COLSUM_WARPS) sums columns [blockIdx.x * 128, +128) over rows [blockIdx.y * rpc, +rpc)
// into part_b (sum of dy) and, when x is given, part_g (sum of dy * xhat): [chunks, cols] each.
// The last block of a column tile to finish (counted in counters[blockIdx.x], which it resets to
// zero for the next launch) adds the tile's partials into out_b and out_g: one
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
  add_warps(sb, sg);
  if (threadIdx.y == 0) {
    for (int j = 0; j < 4 && c + j < cols; ++j) {
      part_b[blockIdx.y * (long long)cols + c + j] = sb[j];
      if (x) part_g[blockIdx.y * (long long)cols + c + j] = sg[j];
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
  // Warp w adds the tile's partials of chunks w, w + COLSUM_WARPS, ... (each lane its 4 columns,
  // UNROLL loads in flight), then the first warp adds the warps' sums in warp order. One thread
  // a column walking every chunk left the whole launch waiting on this block: about 10 us a
  // launch, whatever the tensor's size. Loads bypass L1: the other blocks' partials are not in
  // this SM's L1.
  float fb[4] = {0.0f, 0.0f, 0.0f, 0.0f}, fg[4] = {0.0f, 0.0f, 0.0f, 0.0f};
  if (c < cols) {
#pragma unroll 4
    for (unsigned k = threadIdx.y; k < gridDim.y; k += COLSUM_WARPS) {
      float pb[4], pg[4];
      load4_l2(part_b + k * (long long)cols, c, cols, vec, pb);
      for (int j = 0; j < 4; ++j) fb[j] += pb[j];
      if (x) {
        load4_l2(part_g + k * (long long)cols, c, cols, vec, pg);
        for (int j = 0; j < 4; ++j) fg[j] += pg[j];
      }
    }
  }
  add_warps(fb, fg);
  if (threadIdx.y == 0) {
    for (int j = 0; j < 4 && c + j < cols; ++j) {
      store(&out_b[c + j], fb[j]);
      if (x) store(&out_g[c + j], fg[j]);
    }
  }
  if (threadIdx.x == 0 && threadIdx.y == 0) counters[blockIdx.x] = 0;
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
