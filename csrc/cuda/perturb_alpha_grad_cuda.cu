// CUDA kernels of pni_fast::perturb_alpha_grad and pni_fast::perturb_alpha_grad_multi (schemas in
// csrc/ops.cpp), registered for the CUDA dispatch key. Shared host helpers: cuda_op_helpers.cuh;
// per-thread bodies and work units: alpha_grad_impl.cuh / perturb_impl.cuh.
//
// * perturb_alpha_grad: deterministic two-stage reduction, no float atomics.
//   Stage 1 writes one partial per (segment, chunk) - a segment is a run of
//   `inner` elements sharing one alpha index - in a fixed order (lane-sequential
//   sums, then a fixed warp butterfly); stage 2 sums the partials of each alpha
//   index in a fixed order (a block per index when it has many partials, else a
//   warp) and scales by sigma.
//   The gradient is computed in the math dtype (float32, float64 for float64) and returned
//   in alpha's dtype.
//
// Only accurate logf/sincosf (never --use_fast_math): z must agree with the
// CPU and Triton backends within 2e-6. This file includes c10/cuda headers only
// (no ATen/cuda/CUDAContext.h) so it compile-checks on machines without a GPU
// (design.md section 9).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "../checks.h"
#include "../philox.h"
#include "alpha_grad_impl.cuh"
#include "cuda_op_helpers.cuh"
#include "launch_plan.cuh"
#include "perturb_desc.cuh"

namespace pni_fast {
namespace {

using namespace cuda_impl;
using namespace cuda_ops;

template <typename A>
__device__ __forceinline__ A warp_sum(A v) {
#pragma unroll
  for (int o = kWarpSize / 2; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// ---------------------------------------------------------------------------
// Alpha gradient (bodies in alpha_grad_impl.cuh)
// ---------------------------------------------------------------------------

// Stage 1: one unit = one warp (see perturb_impl.cuh for the three modes).
template <typename T, typename I>
__global__ void __launch_bounds__(kThreads)
    alpha_grad_partials_kernel(const __grid_constant__ Pack pack, const int64_t* __restrict__ state,
                               acc_t<T>* __restrict__ part) {
  const int lane = threadIdx.x % kWarpSize;
  const int64_t total = pack.start[pack.count];
  const int64_t step = static_cast<int64_t>(gridDim.x) * kWarps;
  for (int64_t unit = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / kWarpSize; unit < total;
       unit += step) {
    const int t = find_desc(pack, unit);
    const Desc& d = pack.d[t];
    const RngKey rk = make_rng_key(d, state);
    const int64_t u = unit - pack.start[t];
    if (d.mode == kWarpMode) {  // warp-uniform branch: every lane reaches the shuffles
      const acc_t<T> sum = warp_sum(stage1_lane_value<T, I>(d, u, lane, rk));
      if (lane == 0) part[d.part_base + u] = sum;
    } else {
      stage1_lane_alone<T, I>(d, u, lane, rk, part);
    }
  }
}

// Stage 2: one unit = one block, fixed-order sums of the stage-1 partials: a whole block per
// alpha index with many partials, else one warp per alpha index (stage2_index).
template <typename T>
__global__ void __launch_bounds__(kThreads)
    alpha_grad_reduce_kernel(const __grid_constant__ Pack pack, const acc_t<T>* __restrict__ part) {
  using A = acc_t<T>;
  __shared__ A warp_sums[kWarps];
  const int lane = threadIdx.x % kWarpSize;
  const int warp = threadIdx.x / kWarpSize;
  const int64_t total = pack.start[pack.count];
  for (int64_t unit = blockIdx.x; unit < total; unit += gridDim.x) {  // block-uniform loop
    const int t = find_desc(pack, unit);
    const Desc& d = pack.d[t];
    const int64_t u = unit - pack.start[t];
    if (d.flags & kStage2Block) {  // block-uniform branch: every thread reaches the barriers
      const A v = warp_sum(stage2_thread_value<T>(d, u, threadIdx.x, kThreads, part));
      if (lane == 0) warp_sums[warp] = v;
      __syncthreads();
      if (threadIdx.x == 0) stage2_store<T>(d, u, block_combine(warp_sums));
      __syncthreads();
    } else {
      const int64_t k = stage2_index(d, u, warp);
      if (k >= 0) {  // warp-uniform
        const A v = warp_sum(stage2_thread_value<T>(d, k, lane, kWarpSize, part));
        if (lane == 0) stage2_store<T>(d, k, v);
      }
    }
  }
}

// ---------------------------------------------------------------------------
// Host side
// ---------------------------------------------------------------------------

// Alpha gradient of already checked, contiguous grads into outs[i] (alphas[i]'s shape, math dtype).
void alpha_grad_launch(const std::vector<at::Tensor>& grads, const std::vector<at::Tensor>& alphas,
                       const std::vector<at::Tensor>& sigmas, at::IntArrayRef seeds, const int64_t* state,
                       const std::vector<int64_t>& offsets, const std::vector<int64_t>& inners,
                       const std::vector<at::Tensor>& outs) {
  for (const auto& idx : make_groups(grads)) {
    const at::Tensor& first = grads[idx[0]];
    Pack stage1{};
    stage1.count = static_cast<int32_t>(idx.size());
    for (size_t j = 0; j < idx.size(); ++j) {
      const size_t i = idx[j];
      Desc& d = stage1.d[j];
      // the op's inner; plan_alpha_grad_pack replaces it by the effective one
      d = make_tensor_desc(grads[i], outs[i], alphas[i], sigmas[i], inners[i], offsets[i], seed_of(seeds, i));
    }
    Pack stage2{};
    const GradPlan total = plan_alpha_grad_pack(stage1, stage2);
    const int64_t units1 = total.units1, total2 = total.units2, parts = total.parts;

    const at::Tensor part =
        at::empty({std::max<int64_t>(parts, 1)}, first.options().dtype(opmath_dtype(first.scalar_type())));
    const auto device = first.device().index();
    const auto stream = c10::cuda::getCurrentCUDAStream(device);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, first.scalar_type(), "perturb_alpha_grad_cuda", [&] {
      using A = acc_t<scalar_t>;
      A* part_ptr = part.data_ptr<A>();
      auto stage1_kernel = fits_int32(stage1) ? alpha_grad_partials_kernel<scalar_t, int32_t>
                                              : alpha_grad_partials_kernel<scalar_t, int64_t>;
      stage1_kernel<<<grid_size(cdiv64(units1, kWarps), device), kThreads, 0, stream>>>(
          stage1, state, part_ptr);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      if (total2 > 0) {
        alpha_grad_reduce_kernel<scalar_t><<<grid_size(total2, device), kThreads, 0, stream>>>(stage2, part_ptr);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
    });
  }
}

// ---------------------------------------------------------------------------
// Op implementations (CUDA dispatch key)
// ---------------------------------------------------------------------------

std::vector<at::Tensor> alpha_grad_list(const char* op, const char* list, at::TensorList grads, at::TensorList alphas,
                                        at::TensorList sigmas, at::IntArrayRef seeds, at::IntArrayRef offsets,
                                        at::IntArrayRef inners, const std::optional<at::Tensor>& rng_state) {
  check_args(op, list, "grad", grads, alphas, sigmas, seeds, offsets, inners, rng_state);
  std::vector<at::Tensor> gc, ac, sc, acc;
  for (size_t i = 0; i < grads.size(); ++i) {
    gc.push_back(grads[i].contiguous());
    ac.push_back(alphas[i]);
    sc.push_back(sigmas[i]);
    const auto options = alphas[i].options().dtype(opmath_dtype(grads[i].scalar_type()));
    acc.push_back(grads[i].numel() == 0 ? at::zeros(alphas[i].sizes(), options) : at::empty(alphas[i].sizes(), options));
  }
  if (!grads.empty()) {
    c10::cuda::CUDAGuard guard(grads[0].device());
    alpha_grad_launch(gc, ac, sc, seeds, state_ptr(rng_state), offsets.vec(), inners.vec(), acc);
  }
  std::vector<at::Tensor> outs;
  for (size_t i = 0; i < grads.size(); ++i) {
    outs.push_back(acc[i].to(alphas[i].scalar_type()));  // the one rounding to alpha's dtype
  }
  return outs;
}

at::Tensor perturb_alpha_grad_cuda(const at::Tensor& grad, const at::Tensor& alpha, const at::Tensor& sigma,
                                   int64_t seed, int64_t offset, int64_t inner,
                                   const std::optional<at::Tensor>& rng_state) {
  return alpha_grad_list("perturb_alpha_grad", "", {grad}, {alpha}, {sigma}, {seed}, {offset}, {inner}, rng_state)[0];
}

std::vector<at::Tensor> perturb_alpha_grad_multi_cuda(at::TensorList grads, at::TensorList alphas,
                                                      at::TensorList sigmas, at::IntArrayRef seeds,
                                                      at::IntArrayRef offsets, at::IntArrayRef inners,
                                                      const std::optional<at::Tensor>& rng_state) {
  return alpha_grad_list("perturb_alpha_grad_multi", "grads", grads, alphas, sigmas, seeds, offsets, inners,
                         rng_state);
}

}  // namespace
}  // namespace pni_fast

TORCH_LIBRARY_IMPL(pni_fast, CUDA, m) {
  m.impl("perturb_alpha_grad", &pni_fast::perturb_alpha_grad_cuda);
  m.impl("perturb_alpha_grad_multi", &pni_fast::perturb_alpha_grad_multi_cuda);
}
