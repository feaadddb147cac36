// Internal interface between the CPU kernels of perturb (perturb_cpu.cpp: the
// forward and the op entry points) and of its alpha gradient (perturb_grad_cpu.cpp).
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

namespace pni_fast {
namespace cpu {

// Alpha gradient of checked arguments; (seed, offset) already include rng_state.
at::Tensor alpha_grad_impl(const at::Tensor& grad, const at::Tensor& alpha, const at::Tensor& sigma, uint64_t useed,
                           uint64_t uoffset, int64_t inner);

}  // namespace cpu
}  // namespace pni_fast
