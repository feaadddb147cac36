// Internal interface between the CPU kernels of perturb (perturb_cpu.cpp: the
// forward and the op entry points) and of its alpha gradient (perturb_grad_cpu.cpp).
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <vector>

namespace pni_fast {
namespace cpu {

// Where a backward takes its normals from: regenerated from (seed, offset), or `stored` (the
// forward's noise, element e at stored[e]) when not nullptr.
struct NoiseSource {
  uint64_t seed;
  uint64_t offset;
  const float* stored;
};

// Forward of checked arguments; (seed, offset) already include rng_state. `zout` (optional,
// float32, v.numel() elements): also write the noise there, for a backward that reads it back.
at::Tensor perturb_impl(const at::Tensor& v, const at::Tensor& alpha, const at::Tensor& sigma, uint64_t useed,
                        uint64_t uoffset, int64_t inner, float* zout = nullptr);

// Alpha gradient of checked arguments; (seed, offset) already include rng_state. `stored`: the
// forward's noise for these counters (perturb_impl's zout), or nullptr to regenerate it.
at::Tensor alpha_grad_impl(const at::Tensor& grad, const at::Tensor& alpha, const at::Tensor& sigma, uint64_t useed,
                           uint64_t uoffset, int64_t inner, const float* stored = nullptr);

// perturb_multi (same checks, no rng_state) that also returns the noise it drew, float32, one
// tensor per input: the eager fast path keeps it for the backward of small models.
std::vector<at::Tensor> perturb_multi_keeping_noise(at::TensorList vs, at::TensorList alphas, at::TensorList sigmas,
                                                    int64_t seed, at::IntArrayRef offsets, at::IntArrayRef inners,
                                                    std::vector<at::Tensor>& noise);

// perturb_alpha_grad_multi from the noise perturb_multi_keeping_noise returned (same bits as
// regenerating it).
std::vector<at::Tensor> alpha_grad_multi_from_noise(at::TensorList grads, at::TensorList alphas,
                                                    at::TensorList sigmas, at::IntArrayRef inners,
                                                    at::TensorList noise);

}  // namespace cpu
}  // namespace pni_fast
