// zerokit's fused classifier: softmax cross-entropy and its gradient, one row of logits per
// thread block, written back over the logits. Compiled at run time by NVRTC (lib/kernels/mod.rs),
// after common.cuh's types and conversions.
//
// Eager libtorch spends five whole passes over the [N, V] logits here (the fp32 copy, log_softmax,
// its backward, the nll scatter and the cast back); this reads the row twice (the second read
// mostly from L2) and writes it once, in the logits' own type, with fp32 arithmetic throughout,
// as the fp32 upcast computes it.
//
// For row r with target t (-1: ignored) and g = scale / *count:
//   losses[r] = logsumexp(x) - x[t]                      (0 when t == -1)
//   x[i]     <- (softmax(x)[i] - [i == t]) * g           (0 when t == -1)
// A target outside [-1, V) makes the row's loss NaN, which the caller's finiteness checks report.

#define NEG_INF __int_as_float(0xff800000)

// Running maximum and sum of exp(x - max).
struct MaxSum {
  float m, s;
};

__device__ __forceinline__ MaxSum add(MaxSum a, float x) {
  if (x > a.m) {
    a.s = a.s * expf(a.m - x) + 1.0f;
    a.m = x;
  } else {
    a.s += expf(x - a.m);
  }
  return a;
}

__device__ __forceinline__ MaxSum merge(MaxSum a, MaxSum b) {
  if (a.s == 0.0f) return b;
  if (b.s == 0.0f) return a;
  float m = fmaxf(a.m, b.m);
  MaxSum r;
  r.m = m;
  r.s = a.s * expf(a.m - m) + b.s * expf(b.m - m);
  return r;
}

// Every thread gets the block's combined value.
__device__ MaxSum block_merge(MaxSum v) {
  __shared__ MaxSum warps[32];
  __shared__ MaxSum total;
  for (int off = 16; off > 0; off >>= 1) {
    MaxSum o;
    o.m = __shfl_xor_sync(0xffffffffu, v.m, off);
    o.s = __shfl_xor_sync(0xffffffffu, v.s, off);
    v = merge(v, o);
  }
  int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) warps[warp] = v;
  __syncthreads();
  if (warp == 0) {
    int n = (blockDim.x + 31) / 32;
    MaxSum w = lane < n ? warps[lane] : MaxSum{NEG_INF, 0.0f};
    for (int off = 16; off > 0; off >>= 1) {
      MaxSum o;
      o.m = __shfl_xor_sync(0xffffffffu, w.m, off);
      o.s = __shfl_xor_sync(0xffffffffu, w.s, off);
      w = merge(w, o);
    }
    if (lane == 0) total = w;
  }
  __syncthreads();
  return total;
}

// VEC elements per 16-byte access.
template <typename T>
struct Pack {
  static const int VEC = 16 / sizeof(T);
  union {
    uint4 raw;
    T v[16 / sizeof(T)];
  };
};

template <typename T>
__device__ void classifier(T* logits, const long long* targets, float* losses, const float* count, float scale,
                           int V, int vectorized) {
  const long long row = blockIdx.x;
  T* x = logits + row * (long long)V;
  const long long t = targets[row];
  const bool valid = t >= 0 && t < V;
  __shared__ float target_logit;
  if (threadIdx.x == 0) target_logit = valid ? to_float(x[t]) : 0.0f;

  const int VEC = Pack<T>::VEC;
  MaxSum ms = {NEG_INF, 0.0f};
  if (vectorized) {
    const uint4* xv = reinterpret_cast<const uint4*>(x);
    for (int j = threadIdx.x; j < V / VEC; j += blockDim.x) {
      Pack<T> p;
      p.raw = xv[j];
      for (int k = 0; k < VEC; ++k) ms = add(ms, to_float(p.v[k]));
    }
  } else {
    for (int i = threadIdx.x; i < V; i += blockDim.x) ms = add(ms, to_float(x[i]));
  }
  ms = block_merge(ms);  // its __syncthreads also publishes target_logit

  if (threadIdx.x == 0) {
    float loss = logf(ms.s) + ms.m - target_logit;
    losses[row] = t == -1 ? 0.0f : (valid ? loss : __int_as_float(0x7fc00000));
  }
  const float g = t == -1 ? 0.0f : scale / *count;
  const float inv = 1.0f / ms.s;
  if (vectorized) {
    uint4* xv = reinterpret_cast<uint4*>(x);
    for (int j = threadIdx.x; j < V / VEC; j += blockDim.x) {
      Pack<T> p;
      p.raw = xv[j];
      for (int k = 0; k < VEC; ++k) {
        const int i = j * VEC + k;
        float d = expf(to_float(p.v[k]) - ms.m) * inv - (i == t ? 1.0f : 0.0f);
        store(&p.v[k], d * g);
      }
      xv[j] = p.raw;
    }
  } else {
    for (int i = threadIdx.x; i < V; i += blockDim.x) {
      float d = expf(to_float(x[i]) - ms.m) * inv - (i == t ? 1.0f : 0.0f);
      store(&x[i], d * g);
    }
  }
}

extern "C" __global__ void classifier_f32(float* logits, const long long* targets, float* losses, const float* count,
                                          float scale, int V, int vectorized) {
  classifier(logits, targets, losses, count, scale, V, vectorized);
}
extern "C" __global__ void classifier_bf16(bf16* logits, const long long* targets, float* losses, const float* count,
                                           float scale, int V, int vectorized) {
  classifier(logits, targets, losses, count, scale, V, vectorized);
}
extern "C" __global__ void classifier_f16(f16* logits, const long long* targets, float* losses, const float* count,
                                          float scale, int V, int vectorized) {
  classifier(logits, targets, losses, count, scale, V, vectorized);
}
