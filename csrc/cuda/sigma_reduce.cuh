// Device building blocks of the sigma kernels (sigma_cuda.cu, whose top comment fixes the
// summation order): the launch table (Desc, Pack), per-element accumulation in float64, a
// thread's share of one chunk, the block reductions, and the per-tensor statistics between
// the passes. Internal to sigma_cuda.cu (anonymous namespace): include it there only.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <limits>
#include <type_traits>

namespace pni_fast {
namespace sigma_cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kWarpSize = 32;
constexpr int kWarps = kThreads / kWarpSize;
constexpr int kVec = 4;                                   // consecutive elements per thread and step
constexpr int kIters = 4;                                 // steps per thread and chunk
constexpr int64_t kStep = int64_t{kThreads} * kVec;       // elements per block and step
constexpr int64_t kChunk = kStep * kIters;                // elements per chunk (4096)
constexpr int64_t kFusedMaxChunks = 16;                   // tensors up to 64 Ki elements: one block
constexpr int kMaxPack = 64;                              // tensors per launch

enum Op : int { kMax = 0, kSum = 1, kSq = 2 };

struct Desc {
  const void* x;   // contiguous, dtype T
  int64_t n;       // elements
  int64_t part;    // first chunk partial of this tensor in the global buffer (big pack)
  int32_t out;     // index of the result in the output
  int32_t vec;     // x is aligned for kVec-element vector loads
};

struct Pack {
  Desc d[kMaxPack];
  int64_t start[kMaxPack + 1];  // big pack: unit (chunk) prefix sums
  int32_t count;
};
static_assert(sizeof(Pack) <= 4000, "the pack must fit the 4 KiB kernel-parameter limit");

template <typename T>
using out_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

__host__ __device__ inline int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

template <int kOp>
__device__ __forceinline__ double combine(double a, double b) {
  if constexpr (kOp == kMax) {
    return fmax(a, b);
  } else {
    return __dadd_rn(a, b);
  }
}

// acc <- f(acc, v) for one element (see the top of sigma_cuda.cu).
template <int kOp>
__device__ __forceinline__ double accumulate(double acc, double v, double scale, double mean) {
  if constexpr (kOp == kMax) {
    return fmax(acc, fabs(v));  // fmax ignores a NaN operand
  } else if constexpr (kOp == kSum) {
    return __dadd_rn(acc, __dmul_rn(v, scale));
  } else {
    const double d = __dsub_rn(__dmul_rn(v, scale), mean);
    return __dadd_rn(acc, __dmul_rn(d, d));
  }
}

// The kVec elements starting at i (i a multiple of kVec; all < n), widened to double.
template <typename T>
__device__ __forceinline__ void load_vec(const T* __restrict__ x, int64_t i, double (&v)[kVec]) {
  if constexpr (std::is_same_v<T, float>) {
    const float4 q = *reinterpret_cast<const float4*>(x + i);
    v[0] = q.x, v[1] = q.y, v[2] = q.z, v[3] = q.w;
  } else if constexpr (std::is_same_v<T, double>) {
    const double2 a = reinterpret_cast<const double2*>(x + i)[0];
    const double2 b = reinterpret_cast<const double2*>(x + i)[1];
    v[0] = a.x, v[1] = a.y, v[2] = b.x, v[3] = b.y;
  } else {  // c10::Half / c10::BFloat16: 4 x 16 bits in one 8-byte load
    const uint2 q = *reinterpret_cast<const uint2*>(x + i);
    const uint16_t bits[kVec] = {static_cast<uint16_t>(q.x & 0xFFFFu), static_cast<uint16_t>(q.x >> 16),
                                 static_cast<uint16_t>(q.y & 0xFFFFu), static_cast<uint16_t>(q.y >> 16)};
#pragma unroll
    for (int e = 0; e < kVec; ++e) v[e] = static_cast<double>(static_cast<float>(T(bits[e], T::from_bits())));
  }
}

// One element widened to double (16-bit types through float; both conversions are exact).
template <typename T>
__device__ __forceinline__ double widen(T x) {
  if constexpr (std::is_same_v<T, double>) {
    return x;
  } else {
    return static_cast<double>(static_cast<float>(x));
  }
}

// This thread's accumulation over chunk c of tensor d.
template <int kOp, typename T>
__device__ double thread_chunk(const Desc& d, int64_t c, double scale, double mean) {
  const T* __restrict__ x = static_cast<const T*>(d.x);
  double acc = 0.0;
#pragma unroll
  for (int r = 0; r < kIters; ++r) {
    const int64_t i = c * kChunk + r * kStep + static_cast<int64_t>(threadIdx.x) * kVec;
    if (i >= d.n) break;
    if (d.vec && i + kVec <= d.n) {
      double v[kVec];
      load_vec(x, i, v);
#pragma unroll
      for (int e = 0; e < kVec; ++e) acc = accumulate<kOp>(acc, v[e], scale, mean);
    } else {
      const int64_t m = d.n - i < kVec ? d.n - i : kVec;
      for (int64_t e = 0; e < m; ++e) acc = accumulate<kOp>(acc, widen<T>(x[i + e]), scale, mean);
    }
  }
  return acc;
}

// The block's combination of one value per thread, in the fixed order of the top of sigma_cuda.cu;
// every thread gets the result. smem: kWarps + 1 doubles.
template <int kOp>
__device__ double block_reduce(double v, double* smem) {
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
#pragma unroll
  for (int o = kWarpSize / 2; o > 0; o >>= 1) v = combine<kOp>(v, __shfl_xor_sync(0xffffffffu, v, o));
  if (lane == 0) smem[warp] = v;
  __syncthreads();
  if (warp == 0) {
    double w = lane < kWarps ? smem[lane] : 0.0;
#pragma unroll
    for (int o = kWarps / 2; o > 0; o >>= 1) w = combine<kOp>(w, __shfl_xor_sync(0xffffffffu, w, o));
    if (lane == 0) smem[kWarps] = w;
  }
  __syncthreads();
  const double r = smem[kWarps];
  __syncthreads();  // smem is free again
  return r;
}

// Combination of a tensor's m chunk partials p (shared or global memory); every thread gets it.
template <int kOp>
__device__ double block_combine(const double* p, int64_t m, double* smem) {
  double acc = 0.0;
  for (int64_t i = threadIdx.x; i < m; i += kThreads) acc = combine<kOp>(acc, p[i]);
  return block_reduce<kOp>(acc, smem);
}

// Per-tensor state between the passes (big pack: kept in a global buffer).
struct Stats {
  double scale;  // 2^-k (float64), else 1
  double mean;   // of x * scale
  int32_t k;
  int32_t inf;   // float64: an infinity in the tensor (result NaN)
};

__device__ __forceinline__ void stats_from_amax(double amax, Stats& s) {
  s.scale = 1.0;
  s.k = 0;
  s.inf = isinf(amax) ? 1 : 0;
  if (!s.inf && amax > 0.0) {
    s.k = min(1022, max(-1022, ilogb(amax)));
    s.scale = ldexp(1.0, -s.k);
  }
}

template <typename T>
__device__ __forceinline__ out_t<T> result_of(double ss, int64_t n, const Stats& s) {
  const double sd = sqrt(ss / static_cast<double>(n - 1));
  if constexpr (std::is_same_v<T, double>) {
    return s.inf ? std::numeric_limits<double>::quiet_NaN() : ldexp(sd, s.k);
  } else {
    return static_cast<float>(sd);  // the one rounding to float32
  }
}

}  // namespace
}  // namespace sigma_cuda
}  // namespace pni_fast
