// Argument checks shared by the CPU and CUDA implementations of the
// pni_fast ops, so both reject bad input with the same message before any
// kernel runs. Every message names the argument and what was expected.
//
// What is accepted (docs/ops.md, op contract v2):
//   * v / grad / like: float32, float64, float16, bfloat16;
//   * alpha: v's dtype, or float32 when v is float16 / bfloat16 (AMP keeps parameters in
//     float32); at least one element unless v is zero-size; on v's device;
//   * sigma: 0-d, float32 or v's dtype, on v's device;
//   * seed in [0, 2^63), offset >= 0, offset + ceil(numel / 4) < 2^63;
//   * inner >= 1, or inner == 0 for a zero-size v (the Python layer passes max(inner, 1));
//     with alpha.numel() > 1 and numel > 0: numel % (inner * alpha.numel()) == 0.
//     A zero-size v is valid with any alpha (result: empty output, zero alpha gradient);
//   * rng_state (optional): int64, shape [2], contiguous, on the op's device.
#pragma once

#include <cstdint>
#include <optional>
#include <string>

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

namespace pni_fast {

inline bool is_supported_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

inline bool is_half_type(at::ScalarType t) { return t == at::kHalf || t == at::kBFloat16; }

// The dtype the kernels compute in for tensors of dtype t: float64 for float64, else float32.
inline at::ScalarType opmath_dtype(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

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

// rng_state, when given: an int64 tensor of shape [2] (seed, counter base), contiguous, on
// `device` (the op's device). `op` names the op in the message.
inline void check_rng_state(const std::optional<at::Tensor>& rng_state, const at::Device& device, const char* op) {
  if (!rng_state.has_value()) {
    return;
  }
  const at::Tensor& s = *rng_state;
  TORCH_CHECK(s.scalar_type() == at::kLong, op, ": rng_state must be an int64 tensor (seed, counter base), got ",
              s.scalar_type());
  TORCH_CHECK(s.dim() == 1 && s.size(0) == 2, op, ": rng_state must have shape [2] (seed, counter base), got ",
              s.sizes());
  TORCH_CHECK(s.is_contiguous(), op, ": rng_state must be contiguous");
  TORCH_CHECK(s.device() == device, op, ": rng_state must be on the op's device (", device, "), got ",
              s.device());
}

// Checks for perturb / perturb_alpha_grad. `vname` is "v" or "grad".
inline void check_perturb_args(const at::Tensor& v, const at::Tensor& alpha, const at::Tensor& sigma,
                               int64_t seed, int64_t offset, int64_t inner, const char* vname,
                               const std::string& prefix = "") {
  const at::ScalarType vt = v.scalar_type();
  TORCH_CHECK(is_supported_float(vt), prefix, vname, " must be float32, float64, float16 or bfloat16, got ", vt);
  TORCH_CHECK(alpha.scalar_type() == vt || (is_half_type(vt) && alpha.scalar_type() == at::kFloat), prefix,
              "alpha must have the dtype of ", vname, " (", vt, ")", is_half_type(vt) ? " or float32" : "",
              ", got ", alpha.scalar_type());
  TORCH_CHECK(alpha.device() == v.device(), prefix, "alpha must be on ", vname, "'s device (",
              v.device(), "), got ", alpha.device());
  TORCH_CHECK(alpha.numel() >= 1 || v.numel() == 0, prefix, "alpha must have at least one element (unless ",
              vname, " is zero-size), got shape ", alpha.sizes());
  TORCH_CHECK(sigma.dim() == 0, prefix, "sigma must be a 0-d tensor, got shape ", sigma.sizes());
  TORCH_CHECK(sigma.scalar_type() == at::kFloat || sigma.scalar_type() == vt, prefix,
              "sigma must be float32 or ", vname, "'s dtype (", vt, "), got ", sigma.scalar_type());
  TORCH_CHECK(sigma.device() == v.device(), prefix, "sigma must be on ", vname, "'s device (",
              v.device(), "), got ", sigma.device());
  check_seed_offset(seed, offset, prefix);
  check_offset_fits(offset, v.numel(), prefix);
  const int64_t n = v.numel();
  TORCH_CHECK(inner >= 1 || (inner == 0 && n == 0), prefix,
              "inner must be >= 1 (0 only for a zero-size ", vname, "), got ", inner);
  const int64_t na = alpha.numel();
  if (na > 1 && n > 0) {
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

// sigma_multi's argument checks, shared by its CPU, Meta and CUDA kernels (one set of messages):
// at least one tensor, one supported float dtype, one device (a CUDA one when `need_cuda`).
inline void check_sigma_multi(at::TensorList vs, bool need_cuda) {
  TORCH_CHECK(!vs.empty(), "sigma_multi: vs must hold at least one tensor");
  for (size_t i = 0; i < vs.size(); ++i) {
    TORCH_CHECK(is_supported_float(vs[i].scalar_type()), "sigma_multi: vs[", i,
                "] must be float32, float64, float16 or bfloat16, got ", vs[i].scalar_type());
    TORCH_CHECK(vs[i].scalar_type() == vs[0].scalar_type(), "sigma_multi: all of vs must share one dtype, got vs[0] ",
                vs[0].scalar_type(), " and vs[", i, "] ", vs[i].scalar_type());
    TORCH_CHECK(!need_cuda || vs[i].is_cuda(), "sigma_multi: vs[", i, "] must be a CUDA tensor, got ",
                vs[i].device());
    TORCH_CHECK(vs[i].device() == vs[0].device(), "sigma_multi: all of vs must be on one device, got vs[0] on ",
                vs[0].device(), " and vs[", i, "] on ", vs[i].device());
  }
}

}  // namespace pni_fast
