// CUDA kernels of the raw RNG ops pni_fast::noise, rng_words and rng_uniform (schemas in
// csrc/ops.cpp), registered for the CUDA dispatch key: the Philox stream of the perturb ops
// (csrc/philox.h) as normals, raw 32-bit words or uniforms. Shared host helpers:
// cuda_op_helpers.cuh.
//
// Only accurate logf/sincosf (never --use_fast_math): z must agree with the
// CPU and Triton backends within 2e-6. This file includes c10/cuda headers only
// (no ATen/cuda/CUDAContext.h) so it compile-checks on machines without a GPU
// (design.md section 9).
#include <ATen/ATen.h>
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
#include "perturb_desc.cuh"

namespace pni_fast {
namespace {

using namespace cuda_impl;
using namespace cuda_ops;

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

}  // namespace
}  // namespace pni_fast

TORCH_LIBRARY_IMPL(pni_fast, CUDA, m) {
  m.impl("noise", &pni_fast::noise_cuda);
  m.impl("rng_words", &pni_fast::rng_words_cuda);
  m.impl("rng_uniform", &pni_fast::rng_uniform_cuda);
}
