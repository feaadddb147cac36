// CUDA kernels of pni_fast::sigma and pni_fast::sigma_multi (schemas in csrc/ops.cpp),
// registered for the CUDA dispatch key.
//
// The definition is the CPU op's (csrc/cpu/sigma_cpu.cpp): the two-pass unbiased std in
// float64 (mean = sum(x) / n, then sqrt(sum((x - mean)^2) / (n - 1))), rounded once to
// float32 for float32/float16/bfloat16 inputs; for float64 inputs the two passes run on
// x * 2^-k with 2^k <= max|x| < 2^(k+1) (k clamped to [-1022, 1022]) and the result is
// scaled back by 2^k; fewer than 2 elements: 0; NaN or Inf anywhere: NaN. float16/bfloat16
// are read as they are (no float32 copy) and widened in registers.
//
// Only the summation order differs from the CPU op, so the float64 values before the final
// rounding agree within the summation error (a few ulps for data that is not badly
// conditioned) and the rounded float32 results are equal unless the float64 value lies
// within that error of a float32 rounding midpoint (rare). The order is fixed and
// documented here, and tests/ops/test_sigma.py emulates it bit for bit in numpy:
//   * a tensor is cut into chunks of kChunk = 4096 elements; in chunk c, thread j (of 256)
//     handles, for r = 0..3, the 4 consecutive elements c*4096 + r*1024 + 4j + {0..3}
//     (those < n), accumulating f(x) into one float64 starting from 0 in that order;
//   * block_reduce: a warp xor-butterfly (offsets 16, 8, 4, 2, 1: v = v + shfl_xor(v, o)),
//     then warp 0 takes the 8 warp sums (lane w holds warp w's) and does the butterfly with
//     offsets 4, 2, 1; lane 0's value is the chunk partial;
//   * a tensor's chunk partials p[0..m) are combined the same way: thread j sums
//     p[j], p[j + 256], ... from 0 in order, then block_reduce;
//   * f is max(acc, |x|) (NaN ignored) for max|x|, x * scale for the mean pass and
//     (x * scale - mean)^2 for the second pass; every float64 operation is a separately
//     rounded __dmul_rn / __dadd_rn / __dsub_rn (no FMA contraction).
// The chunk partials of a tensor do not depend on who computes them: a tensor of at most
// kFusedMaxChunks chunks is done by one block in one launch (all passes, partials in shared
// memory), a bigger one by one block per chunk and a finalize kernel per pass (partials in a
// global buffer). The result bits are the same either way, so sigma_multi returns sigma's
// bits for every tensor. Deterministic: no atomics; no host sync; the current stream.
//
// sigma_multi passes up to kMaxPack tensor descriptors by value as one __grid_constant__
// kernel parameter (no host-to-device copy, safe under CUDA graph capture): one launch for
// all small tensors of a pack, plus 4 (6 for float64) launches for the big ones.
//
// The kernels' building blocks (accumulation, block reductions) are in sigma_reduce.cuh.
// This file includes c10/cuda headers only (no ATen/cuda/CUDAContext.h) so it
// compile-checks on machines without a GPU (design.md section 9).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <vector>

#include "../checks.h"
#include "sigma_reduce.cuh"

namespace pni_fast {
namespace sigma_cuda {
namespace {

// One block per tensor of at most kFusedMaxChunks chunks (or fewer than 2 elements): all passes.
template <typename T>
__global__ void __launch_bounds__(kThreads) sigma_small_kernel(const __grid_constant__ Pack pack,
                                                               out_t<T>* __restrict__ out) {
  __shared__ double part[kFusedMaxChunks];
  __shared__ double smem[kWarps + 1];
  const Desc& d = pack.d[blockIdx.x];
  if (d.n < 2) {
    if (threadIdx.x == 0) out[d.out] = out_t<T>(0);
    return;
  }
  const int64_t m = cdiv(d.n, kChunk);
  Stats s{1.0, 0.0, 0, 0};
  if constexpr (std::is_same_v<T, double>) {
    for (int64_t c = 0; c < m; ++c) {
      const double r = block_reduce<kMax>(thread_chunk<kMax, T>(d, c, 1.0, 0.0), smem);
      if (threadIdx.x == 0) part[c] = r;
    }
    __syncthreads();
    stats_from_amax(block_combine<kMax>(part, m, smem), s);
  }
  for (int64_t c = 0; c < m; ++c) {
    const double r = block_reduce<kSum>(thread_chunk<kSum, T>(d, c, s.scale, 0.0), smem);
    if (threadIdx.x == 0) part[c] = r;
  }
  __syncthreads();
  s.mean = block_combine<kSum>(part, m, smem) / static_cast<double>(d.n);
  for (int64_t c = 0; c < m; ++c) {
    const double r = block_reduce<kSq>(thread_chunk<kSq, T>(d, c, s.scale, s.mean), smem);
    if (threadIdx.x == 0) part[c] = r;
  }
  __syncthreads();
  const double ss = block_combine<kSum>(part, m, smem);
  if (threadIdx.x == 0) out[d.out] = result_of<T>(ss, d.n, s);
}

// Tensor of a big-pack unit (binary search over the prefix sums).
__device__ __forceinline__ int find_desc(const Pack& pack, int64_t unit) {
  int lo = 0, hi = pack.count - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (pack.start[mid] <= unit) lo = mid; else hi = mid - 1;
  }
  return lo;
}

// Big pack, one pass: one block per chunk writes the chunk's partial.
template <int kOp, typename T>
__global__ void __launch_bounds__(kThreads) sigma_chunk_kernel(const __grid_constant__ Pack pack,
                                                               const Stats* __restrict__ stats,
                                                               double* __restrict__ part) {
  __shared__ double smem[kWarps + 1];
  const int64_t unit = blockIdx.x;
  const int t = find_desc(pack, unit);
  const Desc& d = pack.d[t];
  double scale = 1.0, mean = 0.0;
  if constexpr (kOp != kMax && std::is_same_v<T, double>) scale = stats[t].scale;
  if constexpr (kOp == kSq) mean = stats[t].mean;
  const int64_t c = unit - pack.start[t];
  const double r = block_reduce<kOp>(thread_chunk<kOp, T>(d, c, scale, mean), smem);
  if (threadIdx.x == 0) part[d.part + c] = r;
}

// Big pack, end of a pass: one block per tensor combines its partials.
template <int kOp, typename T>
__global__ void __launch_bounds__(kThreads) sigma_finalize_kernel(const __grid_constant__ Pack pack,
                                                                  Stats* __restrict__ stats,
                                                                  const double* __restrict__ part,
                                                                  out_t<T>* __restrict__ out) {
  __shared__ double smem[kWarps + 1];
  const int t = blockIdx.x;
  const Desc& d = pack.d[t];
  const double v = block_combine<kOp == kMax ? kMax : kSum>(part + d.part, cdiv(d.n, kChunk), smem);
  if (threadIdx.x != 0) return;
  Stats& s = stats[t];
  if constexpr (kOp == kMax) {
    stats_from_amax(v, s);
  } else if constexpr (kOp == kSum) {
    if constexpr (!std::is_same_v<T, double>) s = Stats{1.0, 0.0, 0, 0};  // no max pass
    s.mean = v / static_cast<double>(d.n);
  } else {
    out[d.out] = result_of<T>(v, d.n, s);
  }
}

// ---------------------------------------------------------------------------
// Host side
// ---------------------------------------------------------------------------

Desc make_desc(const at::Tensor& c, int32_t out_index) {
  Desc d{};
  d.x = c.const_data_ptr();
  d.n = c.numel();
  d.out = out_index;
  d.vec = reinterpret_cast<uintptr_t>(d.x) % (kVec * c.element_size()) == 0 ? 1 : 0;
  return d;
}

template <typename T>
void launch_small(const std::vector<at::Tensor>& cs, const std::vector<int32_t>& idx, out_t<T>* out,
                  cudaStream_t stream) {
  for (size_t b = 0; b < idx.size(); b += kMaxPack) {
    Pack pack{};
    pack.count = static_cast<int32_t>(std::min<size_t>(kMaxPack, idx.size() - b));
    for (int j = 0; j < pack.count; ++j) pack.d[j] = make_desc(cs[idx[b + j]], idx[b + j]);
    sigma_small_kernel<T><<<pack.count, kThreads, 0, stream>>>(pack, out);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

template <typename T>
void launch_big(const std::vector<at::Tensor>& cs, const std::vector<int32_t>& idx, out_t<T>* out,
                cudaStream_t stream, const at::TensorOptions& options) {
  for (size_t b = 0; b < idx.size(); b += kMaxPack) {
    Pack pack{};
    pack.count = static_cast<int32_t>(std::min<size_t>(kMaxPack, idx.size() - b));
    int64_t units = 0;
    for (int j = 0; j < pack.count; ++j) {
      pack.d[j] = make_desc(cs[idx[b + j]], idx[b + j]);
      pack.d[j].part = units;
      pack.start[j] = units;
      units += cdiv(pack.d[j].n, kChunk);
    }
    pack.start[pack.count] = units;
    TORCH_CHECK(units <= std::numeric_limits<int32_t>::max(), "sigma: tensors too large (", units, " chunks)");
    // partials, then the Stats of each tensor (stream-ordered caching allocator: no sync)
    const int64_t stats_doubles = cdiv(static_cast<int64_t>(sizeof(Stats)) * pack.count, sizeof(double));
    const at::Tensor buf = at::empty({units + stats_doubles}, options.dtype(at::kDouble));
    double* part = buf.data_ptr<double>();
    Stats* stats = reinterpret_cast<Stats*>(part + units);
    const auto grid = static_cast<unsigned int>(units);
    if constexpr (std::is_same_v<T, double>) {
      sigma_chunk_kernel<kMax, T><<<grid, kThreads, 0, stream>>>(pack, stats, part);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      sigma_finalize_kernel<kMax, T><<<pack.count, kThreads, 0, stream>>>(pack, stats, part, out);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    sigma_chunk_kernel<kSum, T><<<grid, kThreads, 0, stream>>>(pack, stats, part);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    sigma_finalize_kernel<kSum, T><<<pack.count, kThreads, 0, stream>>>(pack, stats, part, out);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    sigma_chunk_kernel<kSq, T><<<grid, kThreads, 0, stream>>>(pack, stats, part);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    sigma_finalize_kernel<kSq, T><<<pack.count, kThreads, 0, stream>>>(pack, stats, part, out);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

at::Tensor sigmas_cuda(at::TensorList vs) {
  c10::cuda::CUDAGuard guard(vs[0].device());
  const at::ScalarType st = vs[0].scalar_type();
  std::vector<at::Tensor> cs;
  std::vector<int32_t> small, big;
  for (size_t i = 0; i < vs.size(); ++i) {
    cs.push_back(vs[i].contiguous());
    (cdiv(cs.back().numel(), kChunk) > kFusedMaxChunks ? big : small).push_back(static_cast<int32_t>(i));
  }
  const auto options = vs[0].options();
  at::Tensor out = at::empty({static_cast<int64_t>(vs.size())}, options.dtype(opmath_dtype(st)));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(vs[0].device().index());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, st, "pni_fast_sigma_cuda", [&] {
    auto* o = out.data_ptr<out_t<scalar_t>>();
    launch_small<scalar_t>(cs, small, o, stream);
    launch_big<scalar_t>(cs, big, o, stream, options);
  });
  return out;
}

at::Tensor sigma_cuda(const at::Tensor& v) {
  TORCH_CHECK(is_supported_float(v.scalar_type()), "v must be float32, float64, float16 or bfloat16, got ",
              v.scalar_type());
  TORCH_CHECK(v.is_cuda(), "v must be a CUDA tensor, got ", v.device());
  return sigmas_cuda({v}).reshape({});
}

at::Tensor sigma_multi_cuda(at::TensorList vs) {
  check_sigma_multi(vs, /*need_cuda=*/true);
  return sigmas_cuda(vs);
}

}  // namespace
}  // namespace sigma_cuda
}  // namespace pni_fast

TORCH_LIBRARY_IMPL(pni_fast, CUDA, m) {
  m.impl("sigma", &pni_fast::sigma_cuda::sigma_cuda);
  m.impl("sigma_multi", &pni_fast::sigma_cuda::sigma_multi_cuda);
}
