// CPU kernels of perturb, perturb_alpha_grad and their list versions: the
// forward and the op entry points (argument checks, rng_state); the alpha
// gradient's reduction is in perturb_alpha_grad_cpu.cpp, schemas in csrc/ops.cpp,
// the RNG ops in rng_cpu.cpp, sigma in sigma_cpu.cpp.
// alpha is converted to the math dtype first (float32, float64 for float64
// tensors), so a float32 alpha with float16/bfloat16 tensors needs no other code.
//
// Forward: blocks of 256 elements; each block draws its 256 normals with
// normal_block() (vectorized Philox + Box-Muller) into an L1 buffer and
// applies out = v + (alpha * sigma) * z in the same pass, so the noise never
// reaches memory. Threads split the tensor on block boundaries.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <optional>
#include <string>
#include <vector>

#include "../checks.h"
#include "normal_block.h"
#include "perturb_cpu.h"
#include "rng_state.h"

namespace pni_fast {
namespace cpu {
namespace {

using at::Tensor;

// Blocks per parallel chunk in the elementwise ops: 64 blocks = 16K elements,
// so small tensors run inline with no thread hand-off.
constexpr int64_t kGrainBlocks = 64;

// ---------------------------------------------------------------------------
// forward
// ---------------------------------------------------------------------------


// out[t] = v[t] + (alpha[b(e0 + t)] * s) * z[t] for t < len (alpha already in opmath_t).
template <typename scalar_t, typename opmath_t>
void apply_block(const scalar_t* PNI_RESTRICT v, const opmath_t* PNI_RESTRICT alpha, opmath_t s,
                 const float* PNI_RESTRICT z, scalar_t* PNI_RESTRICT out, int64_t e0, int64_t len, int64_t na,
                 int64_t inner) {
  if (na == 1) {
    const opmath_t c = static_cast<opmath_t>(alpha[0]) * s;
    for (int64_t t = 0; t < len; ++t) {
      out[t] = static_cast<scalar_t>(static_cast<opmath_t>(v[t]) + c * static_cast<opmath_t>(z[t]));
    }
    return;
  }
  int64_t t = 0;
  while (t < len) {
    const int64_t e = e0 + t;
    const int64_t run_index = e / inner;
    const int64_t k = run_index % na;
    if (inner == 1) {
      // consecutive elements use consecutive alpha entries up to the wrap
      const int64_t run = std::min(len - t, na - k);
      const opmath_t* PNI_RESTRICT a = alpha + k;
      for (int64_t u = 0; u < run; ++u) {
        const opmath_t c = static_cast<opmath_t>(a[u]) * s;
        out[t + u] = static_cast<scalar_t>(static_cast<opmath_t>(v[t + u]) + c * static_cast<opmath_t>(z[t + u]));
      }
      t += run;
    } else {
      const int64_t run = std::min(len - t, (run_index + 1) * inner - e);
      const opmath_t c = static_cast<opmath_t>(alpha[k]) * s;
      for (int64_t u = 0; u < run; ++u) {
        out[t + u] = static_cast<scalar_t>(static_cast<opmath_t>(v[t + u]) + c * static_cast<opmath_t>(z[t + u]));
      }
      t += run;
    }
  }
}

// float16: blocks converted with F16C (when present) to fp32 and back; same
// values as the generic path (fp32 math, round-to-nearest-even result).
void perturb_half(const Tensor& v, const Tensor& alpha_f, float s, uint64_t seed, uint64_t offset, int64_t inner_eff,
                  Tensor& out, float* zout) {
  const int64_t n = v.numel();
  const int64_t na = alpha_f.numel();
  const int64_t nblocks = (n + kBlockElems - 1) / kBlockElems;
  const uint16_t* vp = reinterpret_cast<const uint16_t*>(v.const_data_ptr<at::Half>());
  uint16_t* op = reinterpret_cast<uint16_t*>(out.mutable_data_ptr<at::Half>());
  const float* ap = alpha_f.const_data_ptr<float>();
  at::parallel_for(0, nblocks, kGrainBlocks, [&](int64_t b0, int64_t b1) {
    alignas(64) float z[kBlockElems];
    alignas(64) float vb[kBlockElems];
    alignas(64) float ob[kBlockElems];
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t e0 = b * kBlockElems;
      const int64_t len = std::min<int64_t>(kBlockElems, n - e0);
      half_to_float(vp + e0, vb, len);
      normal_block(seed, offset + static_cast<uint64_t>(b) * kBlockQuads, z);
      if (zout != nullptr) {
        std::memcpy(zout + e0, z, static_cast<size_t>(len) * sizeof(float));
      }
      apply_block<float, float>(vb, ap, s, z, ob, e0, len, na, inner_eff);
      float_to_half(ob, op + e0, len);
    }
  });
}

}  // namespace

double sigma_value(const Tensor& sigma) {
  switch (sigma.scalar_type()) {
    case at::kFloat: return *sigma.const_data_ptr<float>();
    case at::kDouble: return *sigma.const_data_ptr<double>();
    default: return sigma.item().to<double>();  // float16 / bfloat16: exact in a double too
  }
}

// Forward of checked arguments (see perturb_cpu.h).
Tensor perturb_impl(const Tensor& v_in, const Tensor& alpha_in, double sigma, uint64_t useed, uint64_t uoffset,
                    int64_t inner, float* zout) {
  const Tensor v = v_in.contiguous();
  Tensor out = at::empty(v.sizes(), v.options().memory_format(at::MemoryFormat::Contiguous));
  const int64_t n = v.numel();
  if (n == 0) {
    return out;
  }
  // alpha in the math dtype (float32, float64 for float64): exact for every accepted alpha dtype
  const Tensor alpha = alpha_in.to(opmath_dtype(v.scalar_type())).contiguous();
  const int64_t na = alpha.numel();
  const int64_t inner_eff = na == 1 ? n : inner;
  const int64_t nblocks = (n + kBlockElems - 1) / kBlockElems;
  if (v.scalar_type() == at::kHalf) {
    perturb_half(v, alpha, static_cast<float>(sigma), useed, uoffset, inner_eff, out, zout);
    return out;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, v.scalar_type(), "pni_fast_perturb_cpu", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    const opmath_t s = static_cast<opmath_t>(sigma);  // exact: sigma is float32 or this dtype
    const scalar_t* vp = v.const_data_ptr<scalar_t>();
    const opmath_t* ap = alpha.const_data_ptr<opmath_t>();
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, nblocks, kGrainBlocks, [&](int64_t b0, int64_t b1) {
      alignas(64) float z[kBlockElems];
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t e0 = b * kBlockElems;
        const int64_t len = std::min<int64_t>(kBlockElems, n - e0);
        normal_block(useed, uoffset + static_cast<uint64_t>(b) * kBlockQuads, z);
        if (zout != nullptr) {
          std::memcpy(zout + e0, z, static_cast<size_t>(len) * sizeof(float));
        }
        apply_block<scalar_t, opmath_t>(vp + e0, ap, s, z, op + e0, e0, len, na, inner_eff);
      }
    });
  });
  return out;
}

// ---------------------------------------------------------------------------
// op entry points
// ---------------------------------------------------------------------------

MultiPlan check_multi(const char* op, const char* list, const char* vname, at::TensorList vs, at::TensorList alphas,
                      std::optional<at::TensorList> sigmas, at::IntArrayRef seeds, at::IntArrayRef offsets,
                      at::IntArrayRef inners, const std::optional<Tensor>& rng_state) {
  check_multi_lengths(op, list, vs.size(), alphas.size(), sigmas ? sigmas->size() : vs.size(), offsets.size(),
                      inners.size());
  check_multi_seeds(op, vs.size(), seeds.size(), rng_state.has_value());
  const RngBase r = rng_base(rng_state, seeds.empty() ? 0 : seeds[0], op);  // seeds[0]: unused with a state
  MultiPlan plan{std::vector<uint64_t>(vs.size()), std::vector<uint64_t>(vs.size())};
  for (size_t i = 0; i < vs.size(); ++i) {
    const std::string prefix = list_prefix(list, i);
    const int64_t seed = seed_of(seeds, i);
    check_perturb_args(vs[i], alphas[i], sigmas ? &(*sigmas)[i] : nullptr, seed, offsets[i], inners[i], vname,
                       prefix);
    plan.seeds[i] = rng_state.has_value() ? r.seed : static_cast<uint64_t>(seed);
    plan.counters[i] = first_counter(r, offsets[i], vs[i].numel(), prefix);
  }
  return plan;
}

namespace {

// The values of a 1-d sigma_multi result (float32, or float64 for float64 tensors), one per tensor.
std::vector<double> sigma_list_values(const Tensor& sigmas, size_t count, const char* fn) {
  TORCH_CHECK(sigmas.dim() == 1 && sigmas.size(0) == static_cast<int64_t>(count) && sigmas.is_contiguous() &&
                  (sigmas.scalar_type() == at::kFloat || sigmas.scalar_type() == at::kDouble),
              fn, ": sigmas must be a 1-d float32/float64 tensor with one value per tensor");
  std::vector<double> out(count);
  for (size_t i = 0; i < count; ++i) {
    out[i] = sigmas.scalar_type() == at::kFloat ? sigmas.const_data_ptr<float>()[i]
                                                : sigmas.const_data_ptr<double>()[i];
  }
  return out;
}

}  // namespace

std::vector<Tensor> perturb_multi_sigma_values(at::TensorList vs, at::TensorList alphas, const Tensor& sigmas,
                                               at::IntArrayRef seeds, at::IntArrayRef offsets, at::IntArrayRef inners,
                                               Tensor* noise) {
  const MultiPlan plan = check_multi("perturb_multi", "vs", "v", vs, alphas, std::nullopt, seeds, offsets, inners,
                                     std::nullopt);
  const std::vector<double> sigma = sigma_list_values(sigmas, vs.size(), "perturb_multi_sigma_values");
  int64_t total = 0;
  for (const Tensor& v : vs) {
    total += v.numel();
  }
  float* z = nullptr;
  if (noise != nullptr) {
    *noise = at::empty({total}, vs[0].options().dtype(at::kFloat));
    z = noise->mutable_data_ptr<float>();
  }
  std::vector<Tensor> outs;
  outs.reserve(vs.size());
  for (size_t i = 0; i < vs.size(); ++i) {
    outs.push_back(perturb_impl(vs[i], alphas[i], sigma[i], plan.seeds[i], plan.counters[i], inners[i], z));
    if (z != nullptr) {
      z += vs[i].numel();
    }
  }
  return outs;
}

std::vector<Tensor> alpha_grad_multi_from_noise(at::TensorList grads, at::TensorList alphas, const Tensor& sigmas,
                                                at::IntArrayRef inners, const Tensor& noise) {
  int64_t total = 0;
  for (const Tensor& g : grads) {
    total += g.numel();
  }
  TORCH_CHECK(alphas.size() == grads.size() && inners.size() == grads.size() && noise.is_contiguous() &&
                  noise.scalar_type() == at::kFloat && noise.numel() == total,
              "alpha_grad_multi_from_noise: the grads do not match the stored noise");
  const std::vector<double> sigma = sigma_list_values(sigmas, grads.size(), "alpha_grad_multi_from_noise");
  const float* z = noise.const_data_ptr<float>();
  std::vector<Tensor> out;
  out.reserve(grads.size());
  for (size_t i = 0; i < grads.size(); ++i) {
    out.push_back(alpha_grad_impl(grads[i], alphas[i], sigma[i], 0, 0, inners[i], z));
    z += grads[i].numel();
  }
  return out;
}

namespace {

using Impl = Tensor (*)(const Tensor&, const Tensor&, const Tensor&, uint64_t, uint64_t, int64_t);

Tensor perturb_regen(const Tensor& v, const Tensor& alpha, const Tensor& sigma, uint64_t seed, uint64_t offset,
                     int64_t inner) {
  return perturb_impl(v, alpha, sigma_value(sigma), seed, offset, inner, nullptr);
}

Tensor alpha_grad_regen(const Tensor& grad, const Tensor& alpha, const Tensor& sigma, uint64_t seed, uint64_t offset,
                        int64_t inner) {
  return alpha_grad_impl(grad, alpha, sigma_value(sigma), seed, offset, inner, nullptr);
}

// perturb / perturb_alpha_grad: checks, rng_state, then `impl`.
Tensor single_op(Impl impl, const char* op, const char* vname, const Tensor& v, const Tensor& alpha,
                 const Tensor& sigma, int64_t seed, int64_t offset, int64_t inner,
                 const std::optional<Tensor>& rng_state) {
  check_perturb_args(v, alpha, sigma, seed, offset, inner, vname);
  const RngBase r = rng_base(rng_state, seed, op);
  return impl(v, alpha, sigma, r.seed, first_counter(r, offset, v.numel()), inner);
}

// perturb_multi / perturb_alpha_grad_multi: every tensor checked before any work.
std::vector<Tensor> multi_op(Impl impl, const char* op, const char* list, const char* vname, at::TensorList vs,
                             at::TensorList alphas, at::TensorList sigmas, at::IntArrayRef seeds,
                             at::IntArrayRef offsets, at::IntArrayRef inners, const std::optional<Tensor>& rng_state) {
  const MultiPlan plan = check_multi(op, list, vname, vs, alphas, sigmas, seeds, offsets, inners, rng_state);
  std::vector<Tensor> outs;
  outs.reserve(vs.size());
  for (size_t i = 0; i < vs.size(); ++i) {
    outs.push_back(impl(vs[i], alphas[i], sigmas[i], plan.seeds[i], plan.counters[i], inners[i]));
  }
  return outs;
}

Tensor perturb_cpu(const Tensor& v, const Tensor& alpha, const Tensor& sigma, int64_t seed, int64_t offset,
                   int64_t inner, const std::optional<Tensor>& rng_state) {
  return single_op(&perturb_regen, "perturb", "v", v, alpha, sigma, seed, offset, inner, rng_state);
}

Tensor perturb_alpha_grad_cpu(const Tensor& grad, const Tensor& alpha, const Tensor& sigma, int64_t seed,
                              int64_t offset, int64_t inner, const std::optional<Tensor>& rng_state) {
  return single_op(&alpha_grad_regen, "perturb_alpha_grad", "grad", grad, alpha, sigma, seed, offset, inner,
                   rng_state);
}

std::vector<Tensor> perturb_multi_cpu(at::TensorList vs, at::TensorList alphas, at::TensorList sigmas,
                                      at::IntArrayRef seeds, at::IntArrayRef offsets, at::IntArrayRef inners,
                                      const std::optional<Tensor>& rng_state) {
  return multi_op(&perturb_regen, "perturb_multi", "vs", "v", vs, alphas, sigmas, seeds, offsets, inners, rng_state);
}

std::vector<Tensor> perturb_alpha_grad_multi_cpu(at::TensorList grads, at::TensorList alphas, at::TensorList sigmas,
                                                 at::IntArrayRef seeds, at::IntArrayRef offsets, at::IntArrayRef inners,
                                                 const std::optional<Tensor>& rng_state) {
  return multi_op(&alpha_grad_regen, "perturb_alpha_grad_multi", "grads", "grad", grads, alphas, sigmas, seeds, offsets,
                  inners, rng_state);
}

}  // namespace

TORCH_LIBRARY_IMPL(pni_fast, CPU, m) {
  m.impl("perturb", &perturb_cpu);
  m.impl("perturb_alpha_grad", &perturb_alpha_grad_cpu);
  m.impl("perturb_multi", &perturb_multi_cpu);
  m.impl("perturb_alpha_grad_multi", &perturb_alpha_grad_multi_cpu);
}

}  // namespace cpu
}  // namespace pni_fast
