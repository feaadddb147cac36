// Argument checks shared by the CPU and CUDA implementations of the
// pni_fast ops, so both reject bad input with the same message before any
// kernel runs. Every message names the argument and what was expected.
#pragma once

#include <cstdint>
#include <string>

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

namespace pni_fast {

inline bool is_supported_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

// `prefix` is "" for the single ops and e.g. "vs[2]: " for the list ops.
inline void check_seed_offset(int64_t seed, int64_t offset, const std::string& prefix = "") {
  TORCH_CHECK(seed >= 0, prefix, "seed must be in [0, 2^63), got ", seed);
  TORCH_CHECK(offset >= 0, prefix, "offset must be >= 0 (a Philox counter offset), got ", offset);
}

// Number of Philox counters (quads) a tensor of n elements consumes.
inline int64_t num_quads(int64_t n) { return (n + 3) / 4; }

// The last counter a tensor of n elements uses, offset + ceil(n/4) - 1, must
// stay below 2^63 (counters are int64 in the Python and Triton backends).
inline void check_offset_fits(int64_t offset, int64_t n, const std::string& prefix = "") {
  TORCH_CHECK(offset <= INT64_MAX - num_quads(n), prefix,
              "offset + ceil(numel / 4) must be < 2^63, got offset=", offset, ", numel=", n);
}

// Checks for perturb / perturb_alpha_grad. `vname` is "v" or "grad".
inline void check_perturb_args(const at::Tensor& v, const at::Tensor& alpha, const at::Tensor& sigma,
                               int64_t seed, int64_t offset, int64_t inner, const char* vname,
                               const std::string& prefix = "") {
  TORCH_CHECK(is_supported_float(v.scalar_type()), prefix, vname,
              " must be float32, float64, float16 or bfloat16, got ", v.scalar_type());
  TORCH_CHECK(alpha.scalar_type() == v.scalar_type(), prefix, "alpha must have the dtype of ", vname,
              " (", v.scalar_type(), "), got ", alpha.scalar_type());
  TORCH_CHECK(alpha.device() == v.device(), prefix, "alpha must be on ", vname, "'s device (",
              v.device(), "), got ", alpha.device());
  TORCH_CHECK(alpha.numel() >= 1, prefix, "alpha must have at least one element, got shape ",
              alpha.sizes());
  TORCH_CHECK(sigma.dim() == 0, prefix, "sigma must be a 0-d tensor, got shape ", sigma.sizes());
  TORCH_CHECK(sigma.scalar_type() == at::kFloat || sigma.scalar_type() == v.scalar_type(), prefix,
              "sigma must be float32 or ", vname, "'s dtype (", v.scalar_type(), "), got ",
              sigma.scalar_type());
  TORCH_CHECK(sigma.device() == v.device(), prefix, "sigma must be on ", vname, "'s device (",
              v.device(), "), got ", sigma.device());
  check_seed_offset(seed, offset, prefix);
  check_offset_fits(offset, v.numel(), prefix);
  TORCH_CHECK(inner >= 1, prefix, "inner must be >= 1, got ", inner);
  const int64_t n = v.numel();
  const int64_t na = alpha.numel();
  if (na > 1) {
    // Element i uses alpha_flat[(i / inner) % na]: the tensor must be whole
    // repetitions of na runs of `inner` elements.
    TORCH_CHECK(n % inner == 0 && (n / inner) % na == 0, prefix, "alpha with ", na,
                " elements (shape ", alpha.sizes(), ") does not fit ", vname, " of shape ", v.sizes(),
                " with inner=", inner, ": expected numel (", n, ") to be a multiple of inner * alpha.numel() (",
                inner * na, ")");
  }
}

// Lengths of the list arguments of perturb_multi / perturb_alpha_grad_multi.
inline void check_multi_lengths(const char* op, const char* vname, size_t nv, size_t na, size_t ns, size_t no,
                                size_t ni) {
  TORCH_CHECK(na == nv && ns == nv && no == nv && ni == nv, op, ": ", vname,
              ", alphas, sigmas, offsets and inners must have the same length, got ", nv, ", ", na, ", ", ns,
              ", ", no, ", ", ni);
}

inline std::string list_prefix(const char* vname, size_t i) {
  return std::string(vname) + "[" + std::to_string(i) + "]: ";
}

}  // namespace pni_fast
