// Host helpers shared by the perturb-family CUDA ops (perturb_cuda.cu, perturb_alpha_grad_cuda.cu,
// rng_cuda.cu): grid size, device and argument checks, the rng_state pointer, dtype packs and the
// launch-table entry of a tensor. What the three files have in common:
//
// * Noise comes from csrc/philox.h: each thread turns one Philox call into the
//   4 normals of 4 consecutive elements (element i uses counter offset + i/4,
//   output i%4), so no noise tensor is ever stored.
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
// This file includes c10/cuda headers only (no ATen/cuda/CUDAContext.h), see design.md section 9.
#pragma once

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "../checks.h"
#include "launch_plan.cuh"
#include "perturb_desc.cuh"

namespace pni_fast {
namespace cuda_ops {

using namespace cuda_impl;

// Blocks per SM of a grid-stride launch.
constexpr int64_t kBlocksPerSm = 16;

// Grid of a grid-stride launch: enough blocks to fill the device, no more than the work.
inline unsigned int grid_size(int64_t blocks_needed, c10::DeviceIndex device) {
  static int sm_cache[256] = {0};
  int& sms = sm_cache[static_cast<unsigned char>(device)];
  if (sms == 0) {
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  }
  const int64_t cap = static_cast<int64_t>(sms) * kBlocksPerSm;
  return static_cast<unsigned int>(std::max<int64_t>(1, std::min(blocks_needed, cap)));
}

inline void check_cuda(const at::Tensor& t, const std::string& what) {
  TORCH_CHECK(t.is_cuda(), what, " must be a CUDA tensor, got device ", t.device());
}

// Device pointer of the (checked) rng_state, or nullptr: the kernels read it, the host never does.
inline const int64_t* state_ptr(const std::optional<at::Tensor>& rng_state) {
  return rng_state.has_value() ? rng_state->const_data_ptr<int64_t>() : nullptr;
}

// Indices of the non-empty tensors grouped by dtype, each group split into packs of kMaxPack.
inline std::vector<std::vector<size_t>> make_groups(const std::vector<at::Tensor>& ts) {
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
// inner, offset and seed).
inline Desc make_tensor_desc(const at::Tensor& in, const at::Tensor& out, const at::Tensor& alpha,
                             const at::Tensor& sigma, int64_t inner, int64_t offset, int64_t seed) {
  Desc d{};
  d.in = in.data_ptr();
  d.out = out.data_ptr();
  d.alpha = alpha.data_ptr();
  d.sigma = sigma.data_ptr();
  d.n = in.numel();
  d.n_alpha = alpha.numel();
  d.inner = inner;
  d.offset = offset;
  d.seed = static_cast<uint64_t>(seed);
  d.flags = make_flags(sigma.scalar_type() == at::kFloat, d.in, in.element_size(), d.out, out.element_size());
  return d;
}

// Checks all arguments of a single or list op (a single op is a list of one with list == "").
// `elem` names one tensor ("v", "grad"). `seeds`: one seed for every tensor, or one per tensor.
inline void check_args(const char* op, const char* list, const char* elem, at::TensorList vs,
                       at::TensorList alphas, at::TensorList sigmas, at::IntArrayRef seeds, at::IntArrayRef offsets,
                       at::IntArrayRef inners, const std::optional<at::Tensor>& rng_state) {
  check_multi_lengths(op, list, vs.size(), alphas.size(), sigmas.size(), offsets.size(), inners.size());
  check_multi_seeds(op, vs.size(), seeds.size(), rng_state.has_value());
  if (vs.empty()) return;
  check_rng_state(rng_state, vs[0].device(), op);
  for (size_t i = 0; i < vs.size(); ++i) {
    const std::string prefix = *list ? list_prefix(list, i) : std::string();
    check_cuda(vs[i], prefix + elem);
    check_perturb_args(vs[i], alphas[i], sigmas[i], seed_of(seeds, i), offsets[i], inners[i], elem, prefix);
    TORCH_CHECK(vs[i].device() == vs[0].device(), op, ": all ", list, " must be on one device, got ",
                vs[0].device(), " and ", vs[i].device(), " (", prefix, ")");
  }
}

}  // namespace cuda_ops
}  // namespace pni_fast
