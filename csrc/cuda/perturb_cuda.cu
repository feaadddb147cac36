// CUDA kernels of the pni_fast ops (schemas in csrc/ops.cpp), registered for
// the CUDA dispatch key.
//
// * Noise comes from csrc/philox.h: each thread turns one Philox call into the
//   4 normals of 4 consecutive elements (element i uses counter offset + i/4,
//   output i%4), so no noise tensor is ever stored.
// * perturb: out = v + alpha[(i/inner) % n_alpha] * sigma * z_i in one pass,
//   vector loads/stores of 4 elements (float4 / 2x double2 / 4x16 bit) when
//   aligned; one tensor: a grid-stride loop over quads, with a kernel per alpha rule
//   (one value, or channelwise with magic-number division instead of a 64-bit divide)
//   and 32-bit indices below 2^31 elements; a list: grid-stride over tiles of kThreads quads.
// * perturb_alpha_grad: deterministic two-stage reduction, no float atomics.
//   Stage 1 writes one partial per (segment, chunk) - a segment is a run of
//   `inner` elements sharing one alpha index - in a fixed order (lane-sequential
//   sums, then a fixed warp butterfly); stage 2 sums the partials of each alpha
//   index in a fixed order (a block per index when it has many partials, else a
//   warp) and scales by sigma.
// * sigma and alpha stay on the device (no host sync); the current stream is used.
//   alpha is converted to the math dtype (float32, float64 for float64) before the
//   launch and the alpha gradient is computed in it, then returned in alpha's dtype
//   (a float32 alpha with float16/bfloat16 tensors never rounds to 16 bits).
// * rng_state (optional int64 [2] on the device): every kernel reads (seed, counter
//   base) from it at run time (RngKey), never the host: CUDA graph replays then draw
//   the counters the Python layer advanced in-stream.
// * The list ops pass up to kMaxPack tensor descriptors by value as one
//   __grid_constant__ kernel parameter (no host-to-device copy, safe under CUDA
//   graph capture) and process every tensor of a dtype in one launch (chunks of
//   kMaxPack). Single-tensor ops are packs of one, so a list op gives the same
//   bits as the single op on every tensor.
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
#include "perturb_impl.cuh"

namespace pni_fast {
namespace {

using namespace cuda_impl;

// Blocks per SM of a grid-stride launch.
constexpr int64_t kBlocksPerSm = 16;

template <typename A>
__device__ __forceinline__ A warp_sum(A v) {
#pragma unroll
  for (int o = kWarpSize / 2; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// Forward. One tensor (kFwdLayerwise / kFwdChannelwise): a grid-stride loop over its quads with
// everything per tensor hoisted (fwd_prepare). A list (kFwdList): one unit = one tile of
// kThreads quads of one tensor; grid-stride over all tiles of the pack. I: int32_t when every
// tensor has fewer than kMaxInt32Elems elements (chosen at launch), else int64_t.
template <typename T, typename I, int kKind>
__global__ void __launch_bounds__(kThreads)
    perturb_kernel(const __grid_constant__ Pack pack, uint64_t seed, const int64_t* __restrict__ state) {
  const RngKey rk = make_rng_key(seed, state);
  if constexpr (kKind == kFwdList) {
    const int64_t total = pack.start[pack.count];
    for (int64_t unit = blockIdx.x; unit < total; unit += gridDim.x) {
      const int t = find_desc(pack, unit);
      perturb_unit_thread<T, I>(pack.d[t], unit - pack.start[t], threadIdx.x, rk);
    }
  } else {
    const Fwd<T, I> f = fwd_prepare<T, I>(pack.d[0], rk);
    const I nq = static_cast<I>((static_cast<int64_t>(f.n) + 3) >> 2);
    const I stride = static_cast<I>(gridDim.x) * kThreads;
    for (I q = static_cast<I>(blockIdx.x) * kThreads + static_cast<I>(threadIdx.x); q < nq; q += stride) {
      fwd_quad<kKind, T, I>(f, q, rk.seed);
    }
  }
}

// ---------------------------------------------------------------------------
// Alpha gradient (bodies in perturb_impl.cuh)
// ---------------------------------------------------------------------------

// Stage 1: one unit = one warp (see perturb_impl.cuh for the three modes).
template <typename T, typename I>
__global__ void __launch_bounds__(kThreads)
    alpha_grad_partials_kernel(const __grid_constant__ Pack pack, uint64_t seed, const int64_t* __restrict__ state,
                               acc_t<T>* __restrict__ part) {
  const RngKey rk = make_rng_key(seed, state);
  const int lane = threadIdx.x % kWarpSize;
  const int64_t total = pack.start[pack.count];
  const int64_t step = static_cast<int64_t>(gridDim.x) * kWarps;
  for (int64_t unit = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / kWarpSize; unit < total;
       unit += step) {
    const int t = find_desc(pack, unit);
    const Desc& d = pack.d[t];
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
// Raw RNG kernels (noise, words, uniforms): one thread per quad, grid-stride.
// Quad q uses counter base + offset + q, (seed, base) from make_rng_key.
// ---------------------------------------------------------------------------

__global__ void __launch_bounds__(kThreads) noise_kernel(float* __restrict__ out, int64_t n, uint64_t seed,
                                                         uint64_t offset, const int64_t* __restrict__ state) {
  const RngKey rk = make_rng_key(seed, state);
  const int64_t nq = (n + 3) / 4;
  for (int64_t q = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; q < nq;
       q += static_cast<int64_t>(gridDim.x) * kThreads) {
    const NormalQuad z = normal4(rk.base + offset + static_cast<uint64_t>(q), rk.seed);
    const int64_t base = 4 * q;
    if (base + 4 <= n) {
      *reinterpret_cast<float4*>(out + base) = make_float4(z.z[0], z.z[1], z.z[2], z.z[3]);
    } else {
      for (int j = 0; base + j < n; ++j) out[base + j] = z.z[j];
    }
  }
}

__global__ void __launch_bounds__(kThreads) rng_words_kernel(int32_t* __restrict__ out, int64_t nq, uint64_t seed,
                                                             uint64_t offset, const int64_t* __restrict__ state) {
  const RngKey rk = make_rng_key(seed, state);
  for (int64_t q = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; q < nq;
       q += static_cast<int64_t>(gridDim.x) * kThreads) {
    const PhiloxQuad w = philox4x32_10(rk.base + offset + static_cast<uint64_t>(q), rk.seed);
    reinterpret_cast<int4*>(out)[q] = make_int4(static_cast<int32_t>(w.w[0]), static_cast<int32_t>(w.w[1]),
                                                static_cast<int32_t>(w.w[2]), static_cast<int32_t>(w.w[3]));
  }
}

__global__ void __launch_bounds__(kThreads) rng_uniform_kernel(float* __restrict__ out, int64_t nq, uint64_t seed,
                                                               uint64_t offset, const int64_t* __restrict__ state) {
  const RngKey rk = make_rng_key(seed, state);
  for (int64_t q = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; q < nq;
       q += static_cast<int64_t>(gridDim.x) * kThreads) {
    const PhiloxQuad w = philox4x32_10(rk.base + offset + static_cast<uint64_t>(q), rk.seed);
    reinterpret_cast<float4*>(out)[q] = make_float4(uniform_from_word(w.w[0]), uniform_from_word(w.w[1]),
                                                    uniform_from_word(w.w[2]), uniform_from_word(w.w[3]));
  }
}

// ---------------------------------------------------------------------------
// Host side
// ---------------------------------------------------------------------------

// Grid of a grid-stride launch: enough blocks to fill the device, no more than the work.
unsigned int grid_size(int64_t blocks_needed, c10::DeviceIndex device) {
  static int sm_cache[256] = {0};
  int& sms = sm_cache[static_cast<unsigned char>(device)];
  if (sms == 0) {
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  }
  const int64_t cap = static_cast<int64_t>(sms) * kBlocksPerSm;
  return static_cast<unsigned int>(std::max<int64_t>(1, std::min(blocks_needed, cap)));
}

void check_cuda(const at::Tensor& t, const std::string& what) {
  TORCH_CHECK(t.is_cuda(), what, " must be a CUDA tensor, got device ", t.device());
}

// Device pointer of the (checked) rng_state, or nullptr: the kernels read it, the host never does.
const int64_t* state_ptr(const std::optional<at::Tensor>& rng_state) {
  return rng_state.has_value() ? rng_state->const_data_ptr<int64_t>() : nullptr;
}

// Indices of the non-empty tensors grouped by dtype, each group split into packs of kMaxPack.
std::vector<std::vector<size_t>> make_groups(const std::vector<at::Tensor>& ts) {
  std::vector<std::vector<size_t>> groups;
  std::vector<at::ScalarType> types;
  for (size_t i = 0; i < ts.size(); ++i) {
    if (ts[i].numel() == 0) continue;
    size_t g = 0;
    while (g < types.size() && types[g] != ts[i].scalar_type()) ++g;
    if (g == types.size()) {
      types.push_back(ts[i].scalar_type());
      groups.emplace_back();
    }
    groups[g].push_back(i);
  }
  std::vector<std::vector<size_t>> packs;
  for (const auto& g : groups) {
    for (size_t b = 0; b < g.size(); b += kMaxPack) {
      packs.emplace_back(g.begin() + b, g.begin() + std::min(g.size(), b + kMaxPack));
    }
  }
  return packs;
}

// One tensor's entry of a launch table (input, output, alpha in the math dtype, sigma, contract
// inner and offset).
Desc make_tensor_desc(const at::Tensor& in, const at::Tensor& out, const at::Tensor& alpha, const at::Tensor& sigma,
                      int64_t inner, int64_t offset) {
  Desc d{};
  d.in = in.data_ptr();
  d.out = out.data_ptr();
  d.alpha = alpha.data_ptr();
  d.sigma = sigma.data_ptr();
  d.n = in.numel();
  d.n_alpha = alpha.numel();
  d.inner = inner;
  d.offset = offset;
  d.flags = make_flags(sigma.scalar_type() == at::kFloat, d.in, in.element_size(), d.out, out.element_size());
  return d;
}

// Forward of already checked, contiguous tensors; alphas in the math dtype.
void perturb_launch(const std::vector<at::Tensor>& vs, const std::vector<at::Tensor>& alphas,
                    const std::vector<at::Tensor>& sigmas, int64_t seed, const int64_t* state,
                    const std::vector<int64_t>& offsets, const std::vector<int64_t>& inners,
                    const std::vector<at::Tensor>& outs) {
  for (const auto& idx : make_groups(vs)) {
    Pack pack{};
    pack.count = static_cast<int32_t>(idx.size());
    int64_t units = 0;
    for (size_t j = 0; j < idx.size(); ++j) {
      const size_t i = idx[j];
      Desc& d = pack.d[j];
      d = make_tensor_desc(vs[i], outs[i], alphas[i], sigmas[i], inners[i], offsets[i]);
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
        kernel<<<grid, kThreads, 0, stream>>>(pack, static_cast<uint64_t>(seed), state);
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

// Alpha gradient of already checked, contiguous grads into outs[i] (alphas[i]'s shape, math dtype).
void alpha_grad_launch(const std::vector<at::Tensor>& grads, const std::vector<at::Tensor>& alphas,
                       const std::vector<at::Tensor>& sigmas, int64_t seed, const int64_t* state,
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
      d = make_tensor_desc(grads[i], outs[i], alphas[i], sigmas[i], inners[i], offsets[i]);
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
          stage1, static_cast<uint64_t>(seed), state, part_ptr);
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

// Shared body of the raw RNG ops: kernel(out, count, seed, offset, state), one thread per quad of
// `like`. like_shaped: out has like's shape and count = like.numel() (noise); else out holds the
// 4 values of every quad and count = quads (words, uniforms).
template <typename T>
at::Tensor rng_op(void (*kernel)(T*, int64_t, uint64_t, uint64_t, const int64_t*), const char* op,
                  const at::Tensor& like, int64_t seed, int64_t offset, const std::optional<at::Tensor>& rng_state,
                  bool like_shaped) {
  check_rng_state(rng_state, like.device(), op);
  check_cuda(like, "like");
  check_seed_offset(seed, offset);
  check_offset_fits(offset, like.numel());
  c10::cuda::CUDAGuard guard(like.device());
  const int64_t nq = num_quads(like.numel());
  const auto options = like.options().dtype(c10::CppTypeToScalarType<T>::value);
  at::Tensor out = like_shaped ? at::empty(like.sizes(), options) : at::empty({4 * nq}, options);
  if (nq == 0) return out;
  const auto device = like.device().index();
  const auto stream = c10::cuda::getCurrentCUDAStream(device);
  kernel<<<grid_size(cdiv64(nq, kThreads), device), kThreads, 0, stream>>>(
      out.data_ptr<T>(), like_shaped ? like.numel() : nq, static_cast<uint64_t>(seed), static_cast<uint64_t>(offset),
      state_ptr(rng_state));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

at::Tensor noise_cuda(const at::Tensor& like, int64_t seed, int64_t offset,
                      const std::optional<at::Tensor>& rng_state) {
  return rng_op(noise_kernel, "noise", like, seed, offset, rng_state, /*like_shaped=*/true);
}

at::Tensor rng_words_cuda(const at::Tensor& like, int64_t seed, int64_t offset,
                          const std::optional<at::Tensor>& rng_state) {
  return rng_op(rng_words_kernel, "rng_words", like, seed, offset, rng_state, /*like_shaped=*/false);
}

at::Tensor rng_uniform_cuda(const at::Tensor& like, int64_t seed, int64_t offset,
                            const std::optional<at::Tensor>& rng_state) {
  return rng_op(rng_uniform_kernel, "rng_uniform", like, seed, offset, rng_state, /*like_shaped=*/false);
}

// Checks all arguments of a single or list op (a single op is a list of one with list == "").
// `elem` names one tensor ("v", "grad").
void check_args(const char* op, const char* list, const char* elem, at::TensorList vs, at::TensorList alphas,
                at::TensorList sigmas, int64_t seed, at::IntArrayRef offsets, at::IntArrayRef inners,
                const std::optional<at::Tensor>& rng_state) {
  check_multi_lengths(op, list, vs.size(), alphas.size(), sigmas.size(), offsets.size(), inners.size());
  if (vs.empty()) return;
  check_rng_state(rng_state, vs[0].device(), op);
  for (size_t i = 0; i < vs.size(); ++i) {
    const std::string prefix = *list ? list_prefix(list, i) : std::string();
    check_cuda(vs[i], prefix + elem);
    check_perturb_args(vs[i], alphas[i], sigmas[i], seed, offsets[i], inners[i], elem, prefix);
    TORCH_CHECK(vs[i].device() == vs[0].device(), op, ": all ", list, " must be on one device, got ",
                vs[0].device(), " and ", vs[i].device(), " (", prefix, ")");
  }
}

std::vector<at::Tensor> perturb_list(const char* op, const char* list, at::TensorList vs, at::TensorList alphas,
                                     at::TensorList sigmas, int64_t seed, at::IntArrayRef offsets,
                                     at::IntArrayRef inners, const std::optional<at::Tensor>& rng_state) {
  check_args(op, list, "v", vs, alphas, sigmas, seed, offsets, inners, rng_state);
  std::vector<at::Tensor> vc, ac, sc, outs;
  for (size_t i = 0; i < vs.size(); ++i) {
    vc.push_back(vs[i].contiguous());
    ac.push_back(alphas[i].to(opmath_dtype(vs[i].scalar_type())).contiguous());
    sc.push_back(sigmas[i]);
    outs.push_back(at::empty_like(vc.back(), at::MemoryFormat::Contiguous));
  }
  if (vs.empty()) return outs;
  c10::cuda::CUDAGuard guard(vs[0].device());
  perturb_launch(vc, ac, sc, seed, state_ptr(rng_state), offsets.vec(), inners.vec(), outs);
  return outs;
}

std::vector<at::Tensor> alpha_grad_list(const char* op, const char* list, at::TensorList grads, at::TensorList alphas,
                                        at::TensorList sigmas, int64_t seed, at::IntArrayRef offsets,
                                        at::IntArrayRef inners, const std::optional<at::Tensor>& rng_state) {
  check_args(op, list, "grad", grads, alphas, sigmas, seed, offsets, inners, rng_state);
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
    alpha_grad_launch(gc, ac, sc, seed, state_ptr(rng_state), offsets.vec(), inners.vec(), acc);
  }
  std::vector<at::Tensor> outs;
  for (size_t i = 0; i < grads.size(); ++i) {
    outs.push_back(acc[i].to(alphas[i].scalar_type()));  // the one rounding to alpha's dtype
  }
  return outs;
}

at::Tensor perturb_cuda(const at::Tensor& v, const at::Tensor& alpha, const at::Tensor& sigma, int64_t seed,
                        int64_t offset, int64_t inner, const std::optional<at::Tensor>& rng_state) {
  return perturb_list("perturb", "", {v}, {alpha}, {sigma}, seed, {offset}, {inner}, rng_state)[0];
}

at::Tensor perturb_alpha_grad_cuda(const at::Tensor& grad, const at::Tensor& alpha, const at::Tensor& sigma,
                                   int64_t seed, int64_t offset, int64_t inner,
                                   const std::optional<at::Tensor>& rng_state) {
  return alpha_grad_list("perturb_alpha_grad", "", {grad}, {alpha}, {sigma}, seed, {offset}, {inner}, rng_state)[0];
}

std::vector<at::Tensor> perturb_multi_cuda(at::TensorList vs, at::TensorList alphas, at::TensorList sigmas,
                                           int64_t seed, at::IntArrayRef offsets, at::IntArrayRef inners,
                                           const std::optional<at::Tensor>& rng_state) {
  return perturb_list("perturb_multi", "vs", vs, alphas, sigmas, seed, offsets, inners, rng_state);
}

std::vector<at::Tensor> perturb_alpha_grad_multi_cuda(at::TensorList grads, at::TensorList alphas,
                                                      at::TensorList sigmas, int64_t seed, at::IntArrayRef offsets,
                                                      at::IntArrayRef inners,
                                                      const std::optional<at::Tensor>& rng_state) {
  return alpha_grad_list("perturb_alpha_grad_multi", "grads", grads, alphas, sigmas, seed, offsets, inners,
                         rng_state);
}

}  // namespace
}  // namespace pni_fast

TORCH_LIBRARY_IMPL(pni_fast, CUDA, m) {
  m.impl("noise", &pni_fast::noise_cuda);
  m.impl("rng_words", &pni_fast::rng_words_cuda);
  m.impl("rng_uniform", &pni_fast::rng_uniform_cuda);
  m.impl("perturb", &pni_fast::perturb_cuda);
  m.impl("perturb_alpha_grad", &pni_fast::perturb_alpha_grad_cuda);
  m.impl("perturb_multi", &pni_fast::perturb_multi_cuda);
  m.impl("perturb_alpha_grad_multi", &pni_fast::perturb_alpha_grad_multi_cuda);
}
