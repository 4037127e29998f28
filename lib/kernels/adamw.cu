// AdamW over the pieces of one rank's partition, and the sum of squares of their gradients.
// Compiled at run time by NVRTC (lib/kernels/mod.rs), after common.cuh.
//
// libtorch's _fused_adamw_ reads an fp32 gradient and writes only the fp32 master weights, so
// around it the engine widened every 16-bit gradient into an fp32 partition (4 ms of GPT-2 XL's
// step on an H200) and copied the master weights back into the model's 16-bit ones (2.2 ms).
// Here one pass reads the gradient in whatever type it has (the model's own 16-bit gradients,
// or the fp32 partition) and writes the master weights, both moments and the model's weights.
//
// The update is torch's fused AdamW (ATen's fused_adam_utils.cuh, as libtorch 2.11 builds it)
// operation for operation: everything in fp32, the moments as fused multiply-adds, the bias
// corrections from the step count on the device (powf here as there), so that the same inputs
// give the same bits.
//
// A piece is a contiguous range of the flats (master, exp_avg, exp_avg_sq) with its gradient and
// weights elsewhere. The table holds ADAMW_FIELDS 64-bit values a piece: start in the flats,
// length, the gradient's address, the weights' address (0: none), the piece's first block, and
// whether it decays. Each block finds its piece by binary search and updates ADAMW_CHUNK
// elements of it.

#define ADAMW_FIELDS 6
#define ADAMW_CHUNK 8192
#define ADAMW_THREADS 256

struct AdamWArgs {
  float lr;
  float beta1;
  float beta2;
  float weight_decay;
  float eps;
  // The step count (from 1), as torch keeps it: an fp32 value.
  float step;
  // The gradient is divided by this (as torch's grad_scale) when `scaled`.
  float grad_scale;
  int scaled;
};

// The piece block blockIdx.x works on: the last one whose first block is at or before it.
__device__ __forceinline__ const long long* adamw_piece(const long long* table, int pieces) {
  int lo = 0, hi = pieces - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (table[mid * ADAMW_FIELDS + 4] <= (long long)blockIdx.x) {
      lo = mid;
    } else {
      hi = mid - 1;
    }
  }
  return table + lo * ADAMW_FIELDS;
}

__device__ __forceinline__ bool aligned_to(const void* p, unsigned bytes) {
  return ((unsigned long long)p & (bytes - 1)) == 0;
}

__device__ __forceinline__ void adamw_element(float& p, float g, float& m, float& v, const AdamWArgs& a, bool decay,
                                              float bias_correction1, float bias_correction2_sqrt) {
  if (a.scaled) g /= a.grad_scale;
  if (decay) p -= a.lr * a.weight_decay * p;
  m = fmaf(a.beta1, m, fmaf(-a.beta1, g, g));
  v = fmaf(a.beta2, v, fmaf(-a.beta2, g * g, g * g));
  const float step_size = a.lr / bias_correction1;
  const float denom = (sqrtf(v) / bias_correction2_sqrt) + a.eps;
  p -= step_size * m / denom;
}

template <typename G, typename W>
__device__ void adamw(const long long* table, int pieces, float* params, float* exp_avg, float* exp_avg_sq,
                      AdamWArgs a) {
  const long long* t = adamw_piece(table, pieces);
  const long long start = t[0], len = t[1];
  const G* grad = reinterpret_cast<const G*>(t[2]);
  W* weight = reinterpret_cast<W*>(t[3]);
  const bool decay = t[5] != 0 && a.weight_decay != 0.0f;
  const float bc1 = 1.0f - powf(a.beta1, a.step);
  const float bc2_sqrt = sqrtf(1.0f - powf(a.beta2, a.step));
  const long long begin = ((long long)blockIdx.x - t[4]) * ADAMW_CHUNK;
  const long long end = min(begin + ADAMW_CHUNK, len);
  float* p = params + start;
  float* m = exp_avg + start;
  float* v = exp_avg_sq + start;
  const bool vec = aligned_to(p + begin, 16) && aligned_to(m + begin, 16) && aligned_to(v + begin, 16) &&
                   aligned_to(grad + begin, 4 * sizeof(G)) && (!weight || aligned_to(weight + begin, 4 * sizeof(W)));
  long long i = begin + threadIdx.x;
  if (vec) {
    for (long long q = begin + 4 * threadIdx.x; q + 4 <= end; q += 4 * ADAMW_THREADS) {
      float pv[4], gv[4], mv[4], vv[4];
      quad_load(p + q, pv);
      quad_load(grad + q, gv);
      quad_load(m + q, mv);
      quad_load(v + q, vv);
      for (int j = 0; j < 4; ++j) adamw_element(pv[j], gv[j], mv[j], vv[j], a, decay, bc1, bc2_sqrt);
      quad_store(p + q, pv);
      quad_store(m + q, mv);
      quad_store(v + q, vv);
      if (weight) quad_store(weight + q, pv);
    }
    // The tail of the piece (fewer than 4 elements), one element a thread.
    i = begin + (end - begin) / 4 * 4 + threadIdx.x;
  }
  for (; i < end; i += ADAMW_THREADS) {
    float pi = p[i], mi = m[i], vi = v[i];
    adamw_element(pi, to_float(grad[i]), mi, vi, a, decay, bc1, bc2_sqrt);
    p[i] = pi;
    m[i] = mi;
    v[i] = vi;
    if (weight) store(&weight[i], pi);
  }
}

// Block sums of squares of the pieces' gradients (in double) into partial[blockIdx.x], the
// blocks laid out as adamw's: the caller adds the partials in order, so the sum is the same bits
// on every run.
template <typename G>
__device__ void sumsq(const long long* table, int pieces, double* partial) {
  const long long* t = adamw_piece(table, pieces);
  const G* grad = reinterpret_cast<const G*>(t[2]);
  const long long begin = ((long long)blockIdx.x - t[4]) * ADAMW_CHUNK;
  const long long end = min(begin + ADAMW_CHUNK, t[1]);
  double s = 0.0;
  long long i = begin + threadIdx.x;
  if (aligned_to(grad + begin, 4 * sizeof(G))) {
    for (long long q = begin + 4 * threadIdx.x; q + 4 <= end; q += 4 * ADAMW_THREADS) {
      float gv[4];
      quad_load(grad + q, gv);
      for (int j = 0; j < 4; ++j) s += (double)gv[j] * (double)gv[j];
    }
    i = begin + (end - begin) / 4 * 4 + threadIdx.x;
  }
  for (; i < end; i += ADAMW_THREADS) {
    const double g = to_float(grad[i]);
    s += g * g;
  }
  for (int off = 16; off > 0; off /= 2) s += __shfl_xor_sync(0xffffffffu, s, off);
  __shared__ double warp_sums[ADAMW_THREADS / 32];
  if (threadIdx.x % 32 == 0) warp_sums[threadIdx.x / 32] = s;
  __syncthreads();
  if (threadIdx.x == 0) {
    double total = 0.0;
    for (int w = 0; w < ADAMW_THREADS / 32; ++w) total += warp_sums[w];
    partial[blockIdx.x] = total;
  }
}

#define ADAMW_KERNEL(SUFFIX, G, W)                                                                          \
  extern "C" __global__ void adamw_##SUFFIX(const long long* table, int pieces, float* params, float* exp_avg, \
                                            float* exp_avg_sq, AdamWArgs a) {                                \
    adamw<G, W>(table, pieces, params, exp_avg, exp_avg_sq, a);                                            \
  }

// Gradient type, then weight type.
ADAMW_KERNEL(f32_f32, float, float)
ADAMW_KERNEL(f32_bf16, float, bf16)
ADAMW_KERNEL(f32_f16, float, f16)
ADAMW_KERNEL(bf16_bf16, bf16, bf16)
ADAMW_KERNEL(f16_f16, f16, f16)

extern "C" __global__ void sumsq_f32(const long long* table, int pieces, double* partial) {
  sumsq<float>(table, pieces, partial);
}
extern "C" __global__ void sumsq_bf16(const long long* table, int pieces, double* partial) {
  sumsq<bf16>(table, pieces, partial);
}
extern "C" __global__ void sumsq_f16(const long long* table, int pieces, double* partial) {
  sumsq<f16>(table, pieces, partial);
}
