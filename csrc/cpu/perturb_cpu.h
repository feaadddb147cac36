// Internal interface between the CPU kernels of perturb (perturb_cpu.cpp: the forward and the op
// entry points), of its alpha gradient (perturb_alpha_grad_cpu.cpp) and the eager fast path
// (noisy_cpu.cpp).
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <optional>
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

// A 0-d sigma tensor's value (float32 or the tensor's dtype: exact in a double).
double sigma_value(const at::Tensor& sigma);

// Forward of checked arguments; (seed, offset) already include rng_state. `zout` (optional,
// float32, v.numel() elements): also write the noise there, for a backward that reads it back.
at::Tensor perturb_impl(const at::Tensor& v, const at::Tensor& alpha, double sigma, uint64_t useed,
                        uint64_t uoffset, int64_t inner, float* zout = nullptr);

// Alpha gradient of checked arguments; (seed, offset) already include rng_state. `stored`: the
// forward's noise for these counters (perturb_impl's zout), or nullptr to regenerate it.
at::Tensor alpha_grad_impl(const at::Tensor& grad, const at::Tensor& alpha, double sigma, uint64_t useed,
                           uint64_t uoffset, int64_t inner, const float* stored = nullptr);

// The checks of a list op (perturb_multi, perturb_alpha_grad_multi, the fast path's noisy_multi)
// before any work, and each tensor's Philox key and first counter. `sigmas` nullopt: sigmas the
// caller computed itself (nothing to check). `list` / `vname` name the arguments in messages
// ("vs"/"v"). `seeds`: one seed for every tensor or one per tensor (rng_state: its seed for all).
struct MultiPlan {
  std::vector<uint64_t> seeds;     // Philox key of each tensor
  std::vector<uint64_t> counters;  // first Philox counter of each tensor
};
MultiPlan check_multi(const char* op, const char* list, const char* vname, at::TensorList vs, at::TensorList alphas,
                      std::optional<at::TensorList> sigmas, at::IntArrayRef seeds, at::IntArrayRef offsets,
                      at::IntArrayRef inners, const std::optional<at::Tensor>& rng_state);

// perturb_multi with sigmas[i] (a 1-d tensor, one value per tensor, from sigma_multi), checked here.
// `noise` not nullptr: also return the noise drawn, all tensors' in one float32 tensor (tensor i's
// elements after those of tensors 0..i-1), for a backward that reads it back.
std::vector<at::Tensor> perturb_multi_sigma_values(at::TensorList vs, at::TensorList alphas,
                                                   const at::Tensor& sigmas, at::IntArrayRef seeds,
                                                   at::IntArrayRef offsets,
                                                   at::IntArrayRef inners, at::Tensor* noise);

// perturb_alpha_grad_multi from the noise perturb_multi_sigma_values returned (the same bits as
// regenerating it).
std::vector<at::Tensor> alpha_grad_multi_from_noise(at::TensorList grads, at::TensorList alphas,
                                                    const at::Tensor& sigmas, at::IntArrayRef inners,
                                                    const at::Tensor& noise);

}  // namespace cpu
}  // namespace pni_fast
