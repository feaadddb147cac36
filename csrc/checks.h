// Argument checks shared by the CPU, CUDA and Meta implementations of the pni_fast ops, so every
// kernel rejects bad input with the same error before any work. The rules, their exceptions and
// messages are defined once, in pni_fast/contract.py (RULES), which the Python backends call;
// the messages reach C++ through check_messages.h, generated from RULES. The functions here
// mirror contract.py's check_* functions one for one (same conditions, same order), and
// tests/test_contract.py runs every bad input against every backend it can run here (the C++
// CPU kernels, the pure-PyTorch and Triton-interpreter ops, the fake kernels): the CUDA kernels
// call these same functions, so they raise the same errors.
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
//   * rng_state (optional): int64, shape [2], contiguous, on the op's device; on CPU its values
//     are read on the host: seed in [0, 2^63), base >= 0, base + offset + ceil(numel / 4) < 2^63.
#pragma once

#include <cctype>
#include <cstdint>
#include <optional>
#include <string>

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include "check_messages.h"

namespace pni_fast {

inline bool is_supported_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

inline bool is_half_type(at::ScalarType t) { return t == at::kHalf || t == at::kBFloat16; }

// The dtype the kernels compute in for tensors of dtype t: float64 for float64, else float32.
inline at::ScalarType opmath_dtype(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

// Python's name of a dtype ("torch.float32"), so C++ messages read like the Python backends'.
inline std::string dtype_name(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return "torch.float32";
    case at::kDouble: return "torch.float64";
    case at::kHalf: return "torch.float16";
    case at::kBFloat16: return "torch.bfloat16";
    case at::kByte: return "torch.uint8";
    case at::kChar: return "torch.int8";
    case at::kShort: return "torch.int16";
    case at::kInt: return "torch.int32";
    case at::kLong: return "torch.int64";
    case at::kBool: return "torch.bool";
    case at::kComplexHalf: return "torch.complex32";
    case at::kComplexFloat: return "torch.complex64";
    case at::kComplexDouble: return "torch.complex128";
    default: {  // UInt16 -> torch.uint16, Float8_e4m3fn -> torch.float8_e4m3fn, QInt8 -> torch.qint8
      std::string name = c10::toString(t);
      for (char& c : name) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
      return "torch." + name;
    }
  }
}

// `prefix` is "" for the single ops and e.g. "vs[2]: " for the list ops; "<op>: " for the
// checks that concern the whole call (lists, rng_state). Each function mirrors the one of the
// same name in pni_fast/contract.py.
inline void check_seed_offset(int64_t seed, int64_t offset, const std::string& prefix = "") {
  PNI_CHECK_SEED(seed >= 0, prefix, seed);  // < 2^63: an int64 already
  PNI_CHECK_OFFSET(offset >= 0, prefix, offset);
}

// Number of Philox counters (quads) a tensor of n elements consumes.
inline int64_t num_quads(int64_t n) { return (n + 3) / 4; }

// The last counter a tensor of n elements uses, offset + ceil(n/4) - 1, must
// stay below 2^63 (counters are int64 in the Python and Triton backends).
inline void check_offset_fits(int64_t offset, int64_t n, const std::string& prefix = "") {
  PNI_CHECK_COUNTER_LIMIT(offset <= INT64_MAX - num_quads(n), prefix, offset, n);
}

// rng_state, when given: an int64 tensor of shape [2] (seed, counter base), contiguous, on
// `device` (the op's device). `op` names the op in the message. A CPU state is read on the host
// and its values range-checked here (the CPU kernels then add base + offset, see
// check_state_counter); a CUDA state stays on the device (no host sync).
inline void check_rng_state(const std::optional<at::Tensor>& rng_state, const at::Device& device, const char* op) {
  if (!rng_state.has_value()) {
    return;
  }
  const at::Tensor& s = *rng_state;
  const std::string p = std::string(op) + ": ";
  PNI_CHECK_RNG_STATE_DTYPE(s.scalar_type() == at::kLong, p, dtype_name(s.scalar_type()));
  PNI_CHECK_RNG_STATE_SHAPE(s.dim() == 1 && s.size(0) == 2, p, s.sizes());
  PNI_CHECK_RNG_STATE_CONTIGUOUS(s.is_contiguous(), p);
  PNI_CHECK_RNG_STATE_DEVICE(s.device() == device, p, device, s.device());
  if (s.device().is_cpu()) {
    const int64_t* st = s.const_data_ptr<int64_t>();
    PNI_CHECK_RNG_STATE_SEED(st[0] >= 0, p, st[0]);
    PNI_CHECK_RNG_STATE_BASE(st[1] >= 0, p, st[1]);
  }
}

// With a host-read rng_state (base >= 0): base + offset + ceil(n / 4) < 2^63.
inline void check_state_counter(int64_t base, int64_t offset, int64_t n, const std::string& prefix = "") {
  PNI_CHECK_STATE_OFFSET(offset <= INT64_MAX - base, prefix, base, offset);
  PNI_CHECK_STATE_COUNTER_LIMIT(base + offset <= INT64_MAX - num_quads(n), prefix, base, offset, n);
}

// Checks for perturb / perturb_alpha_grad. `vname` is "v" or "grad". `sigma` nullptr: a sigma the
// caller computed itself (the eager fast path, csrc/cpu/noisy_cpu.cpp), nothing to check.
inline void check_perturb_args(const at::Tensor& v, const at::Tensor& alpha, const at::Tensor* sigma,
                               int64_t seed, int64_t offset, int64_t inner, const char* vname,
                               const std::string& prefix = "") {
  const at::ScalarType vt = v.scalar_type();
  const at::ScalarType at_ = alpha.scalar_type();
  PNI_CHECK_DTYPE(is_supported_float(vt), prefix, vname, dtype_name(vt));
  PNI_CHECK_ALPHA_DTYPE(at_ == vt || (is_half_type(vt) && at_ == at::kFloat), prefix, dtype_name(vt), vname,
                        is_half_type(vt) ? " or torch.float32" : "", dtype_name(at_));
  PNI_CHECK_ALPHA_DEVICE(alpha.device() == v.device(), prefix, vname, v.device(), alpha.device());
  const int64_t n = v.numel();
  const int64_t na = alpha.numel();
  PNI_CHECK_ALPHA_EMPTY(na >= 1 || n == 0, prefix, vname, alpha.sizes());
  if (sigma != nullptr) {
    PNI_CHECK_SIGMA_SHAPE(sigma->dim() == 0, prefix, sigma->sizes());
    PNI_CHECK_SIGMA_DTYPE(sigma->scalar_type() == at::kFloat || sigma->scalar_type() == vt, prefix, vname,
                          dtype_name(vt), dtype_name(sigma->scalar_type()));
    PNI_CHECK_SIGMA_DEVICE(sigma->device() == v.device(), prefix, vname, v.device(), sigma->device());
  }
  check_seed_offset(seed, offset, prefix);
  check_offset_fits(offset, n, prefix);
  PNI_CHECK_INNER(inner >= 1 || (inner == 0 && n == 0), prefix, vname, inner);
  if (na > 1 && n > 0) {
    // Element i uses alpha_flat[(i / inner) % na]: the tensor must be whole
    // repetitions of na runs of `inner` elements.
    PNI_CHECK_ALPHA_TILING(n % inner == 0 && (n / inner) % na == 0, prefix, na, alpha.sizes(), vname, v.sizes(),
                           inner, n, inner * na);
  }
}

// Lengths of the list arguments of perturb_multi / perturb_alpha_grad_multi (`list`: "vs", "grads").
inline void check_multi_lengths(const char* op, const char* list, size_t nv, size_t na, size_t ns, size_t no,
                                size_t ni) {
  PNI_CHECK_LIST_LENGTHS(na == nv && ns == nv && no == nv && ni == nv, std::string(op) + ": ", list, nv, na, ns,
                         no, ni);
}

// The seeds of a list op: one shared by every tensor, or one per tensor (nv); exactly one with
// rng_state (whose seed is then every tensor's key).
inline void check_multi_seeds(const char* op, size_t nv, size_t n_seeds, bool has_state) {
  PNI_CHECK_SEEDS_LENGTH(n_seeds == 1 || n_seeds == nv, std::string(op) + ": ", nv, n_seeds);
  PNI_CHECK_SEEDS_RNG_STATE(!has_state || n_seeds == 1, std::string(op) + ": ", n_seeds);
}

// Tensor i's seed of a list op (seeds checked by check_multi_seeds).
inline int64_t seed_of(at::IntArrayRef seeds, size_t i) { return seeds.size() == 1 ? seeds[0] : seeds[i]; }

inline void check_perturb_args(const at::Tensor& v, const at::Tensor& alpha, const at::Tensor& sigma,
                               int64_t seed, int64_t offset, int64_t inner, const char* vname,
                               const std::string& prefix = "") {
  check_perturb_args(v, alpha, &sigma, seed, offset, inner, vname, prefix);
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
