// CUDA kernels of pni_fast::perturb and pni_fast::perturb_multi (schemas in csrc/ops.cpp),
// registered for the CUDA dispatch key. The alpha gradient is in perturb_alpha_grad_cuda.cu,
// the raw RNG ops in rng_cuda.cu, the host helpers the three share (and what else they have in
// common: rng_state, packs of tensors, the math dtype) in cuda_op_helpers.cuh, the per-thread
// bodies in perturb_impl.cuh.
//
// * perturb: out = v + alpha[(i/inner) % n_alpha] * sigma * z_i in one pass,
//   vector loads/stores of 4 elements (float4 / 2x double2 / 4x16 bit) when
//   aligned; one tensor: a grid-stride loop over quads, with a kernel per alpha rule
//   (one value, or channelwise with magic-number division instead of a 64-bit divide)
//   and 32-bit indices below 2^31 elements; a list: grid-stride over tiles of kThreads quads.
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
#include "cuda_op_helpers.cuh"
#include "launch_plan.cuh"
#include "perturb_desc.cuh"
#include "perturb_forward_impl.cuh"

namespace pni_fast {
namespace {

using namespace cuda_impl;
using namespace cuda_ops;

// Forward. One tensor (kFwdLayerwise / kFwdChannelwise): a grid-stride loop over its quads with
// everything per tensor hoisted (fwd_prepare). A list (kFwdList): one unit = one tile of
// kThreads quads of one tensor; grid-stride over all tiles of the pack. I: int32_t when every
// tensor has fewer than kMaxInt32Elems elements (chosen at launch), else int64_t.
template <typename T, typename I, int kKind>
__global__ void __launch_bounds__(kThreads)
    perturb_kernel(const __grid_constant__ Pack pack, const int64_t* __restrict__ state) {
  if constexpr (kKind == kFwdList) {
    const int64_t total = pack.start[pack.count];
    for (int64_t unit = blockIdx.x; unit < total; unit += gridDim.x) {
      const int t = find_desc(pack, unit);
      perturb_unit_thread<T, I>(pack.d[t], unit - pack.start[t], threadIdx.x, make_rng_key(pack.d[t], state));
    }
  } else {
    const RngKey rk = make_rng_key(pack.d[0], state);
    const Fwd<T, I> f = fwd_prepare<T, I>(pack.d[0], rk);
    const I nq = static_cast<I>((static_cast<int64_t>(f.n) + 3) >> 2);
    const I stride = static_cast<I>(gridDim.x) * kThreads;
    for (I q = static_cast<I>(blockIdx.x) * kThreads + static_cast<I>(threadIdx.x); q < nq; q += stride) {
      fwd_quad<kKind, T, I>(f, q, rk.seed);
    }
  }
}

// ---------------------------------------------------------------------------
// Host side
// ---------------------------------------------------------------------------

// Forward of already checked, contiguous tensors; alphas in the math dtype; seeds: one for every
// tensor or one per tensor (checked).
void perturb_launch(const std::vector<at::Tensor>& vs, const std::vector<at::Tensor>& alphas,
                    const std::vector<at::Tensor>& sigmas, at::IntArrayRef seeds, const int64_t* state,
                    const std::vector<int64_t>& offsets, const std::vector<int64_t>& inners,
                    const std::vector<at::Tensor>& outs) {
  for (const auto& idx : make_groups(vs)) {
    Pack pack{};
    pack.count = static_cast<int32_t>(idx.size());
    int64_t units = 0;
    for (size_t j = 0; j < idx.size(); ++j) {
      const size_t i = idx[j];
      Desc& d = pack.d[j];
      d = make_tensor_desc(vs[i], outs[i], alphas[i], sigmas[i], inners[i], offsets[i], seed_of(seeds, i));
      pack.start[j] = units;
      units += forward_units(d);
    }
    pack.start[idx.size()] = units;
    for (size_t j = 0; j < idx.size(); ++j) plan_forward(pack.d[j]);
    const at::Tensor& first = vs[idx[0]];
    const auto stream = c10::cuda::getCurrentCUDAStream(first.device().index());
    const unsigned int grid = grid_size(units, first.device().index());
    const int kind = forward_kind(pack);
    const bool i32 = fits_int32(pack);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, first.scalar_type(), "perturb_cuda", [&] {
      auto launch = [&](auto kernel) {
        kernel<<<grid, kThreads, 0, stream>>>(pack, state);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      };
      if (i32) {
        if (kind == kFwdLayerwise) launch(perturb_kernel<scalar_t, int32_t, kFwdLayerwise>);
        else if (kind == kFwdChannelwise) launch(perturb_kernel<scalar_t, int32_t, kFwdChannelwise>);
        else launch(perturb_kernel<scalar_t, int32_t, kFwdList>);
      } else {
        if (kind == kFwdLayerwise) launch(perturb_kernel<scalar_t, int64_t, kFwdLayerwise>);
        else if (kind == kFwdChannelwise) launch(perturb_kernel<scalar_t, int64_t, kFwdChannelwise>);
        else launch(perturb_kernel<scalar_t, int64_t, kFwdList>);
      }
    });
  }
}

// ---------------------------------------------------------------------------
// Op implementations (CUDA dispatch key)
// ---------------------------------------------------------------------------

std::vector<at::Tensor> perturb_list(const char* op, const char* list, at::TensorList vs, at::TensorList alphas,
                                     at::TensorList sigmas, at::IntArrayRef seeds, at::IntArrayRef offsets,
                                     at::IntArrayRef inners, const std::optional<at::Tensor>& rng_state) {
  check_args(op, list, "v", vs, alphas, sigmas, seeds, offsets, inners, rng_state);
  std::vector<at::Tensor> vc, ac, sc, outs;
  for (size_t i = 0; i < vs.size(); ++i) {
    vc.push_back(vs[i].contiguous());
    ac.push_back(alphas[i].to(opmath_dtype(vs[i].scalar_type())).contiguous());
    sc.push_back(sigmas[i]);
    outs.push_back(at::empty_like(vc.back(), at::MemoryFormat::Contiguous));
  }
  if (vs.empty()) return outs;
  c10::cuda::CUDAGuard guard(vs[0].device());
  perturb_launch(vc, ac, sc, seeds, state_ptr(rng_state), offsets.vec(), inners.vec(), outs);
  return outs;
}

at::Tensor perturb_cuda(const at::Tensor& v, const at::Tensor& alpha, const at::Tensor& sigma, int64_t seed,
                        int64_t offset, int64_t inner, const std::optional<at::Tensor>& rng_state) {
  return perturb_list("perturb", "", {v}, {alpha}, {sigma}, {seed}, {offset}, {inner}, rng_state)[0];
}

std::vector<at::Tensor> perturb_multi_cuda(at::TensorList vs, at::TensorList alphas, at::TensorList sigmas,
                                           at::IntArrayRef seeds, at::IntArrayRef offsets, at::IntArrayRef inners,
                                           const std::optional<at::Tensor>& rng_state) {
  return perturb_list("perturb_multi", "vs", vs, alphas, sigmas, seeds, offsets, inners, rng_state);
}

}  // namespace
}  // namespace pni_fast

TORCH_LIBRARY_IMPL(pni_fast, CUDA, m) {
  m.impl("perturb", &pni_fast::perturb_cuda);
  m.impl("perturb_multi", &pni_fast::perturb_multi_cuda);
}
