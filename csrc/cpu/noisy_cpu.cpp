// The eager fast path of noisy_weight / inject_noise / noisy_weights on CPU: the whole forward of
// the Python layer in one op call, with a C++ autograd node. For a 432-element conv weight the
// kernel takes ~3 us, while the separate Python steps it replaces (sigma op, finite checks through
// .item(), a seed from torch.randint(...).item(), the perturb op, a Python autograd.Function) took
// more than the original code's std().item() + normal_().
//
//   noisy(v, alpha, offset, inner, seed?, generator?, name) -> out
//   noisy_multi(vs, alphas, offsets, inners, seeds?, generator?, name) -> outs
//
// = sigma (the sigma op's definition), then the Python layer's finite checks (same messages as
// pni_fast.functional._check_finite), then a seed (the given one, or the draw torch.randint(0,
// 2**63 - 1, ()) makes from the generator: the same value, so seed=None still follows
// torch.manual_seed; noisy_multi: the given seeds, one shared or one per tensor as perturb_multi
// takes them, or one drawn seed shared by every tensor), then perturb / perturb_multi. The backward
// regenerates the noise from the saved sigma and seed(s) with perturb_alpha_grad(_multi). Not a
// pure function (it advances a generator), so no fake kernel and no pt2_compliant tag:
// torch.compile and torch.func use the separate ops (pni_fast/ops/fast_path.py decides).
#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/util/Exception.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include "../check_messages.h"
#include "perturb_cpu.h"

#include <cmath>
#include <cstdint>
#include <mutex>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

namespace pni_fast {
namespace {

using at::Tensor;

// The value torch.randint(0, 2**63 - 1, (), generator=g) returns: ATen draws random64() % range for
// ranges of 2^32 and more (pni_fast.rng.draw_seed; tests/ops/test_fast_path.py checks the two agree).
int64_t draw_seed(const std::optional<at::Generator>& generator) {
  auto* gen = at::get_generator_or_default<at::CPUGeneratorImpl>(generator, at::detail::getDefaultCPUGenerator());
  std::lock_guard<std::mutex> lock(gen->mutex_);
  return static_cast<int64_t>(gen->random64() % static_cast<uint64_t>(INT64_MAX));
}

bool all_finite(const Tensor& t) {
  const Tensor c = t.contiguous();
  bool ok = true;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, c.scalar_type(), "pni_fast_all_finite", [&] {
    const scalar_t* p = c.const_data_ptr<scalar_t>();
    for (int64_t i = 0, n = c.numel(); i < n && ok; ++i) {
      ok = std::isfinite(static_cast<double>(p[i]));
    }
  });
  return ok;
}

// pni_fast.functional._check_finite: the same rules (contract.RULES, generated check_messages.h).
void check_finite(const Tensor& sigmas, at::TensorList alphas, c10::string_view name) {
  PNI_CHECK_TENSOR_FINITE(all_finite(sigmas), "", name);
  for (const Tensor& a : alphas) {
    PNI_CHECK_ALPHA_FINITE(all_finite(a), "");
  }
}

// Where the fast path must not run: its finite checks read the values on the host.
void check_cpu(const Tensor& v, const char* op) {
  TORCH_CHECK_VALUE(v.device().is_cpu(), "pni_fast::", op, " runs on CPU tensors only, got a tensor on ", v.device(),
                    "; use pni_fast.noisy_weight, which picks the op for the device");
}

struct Fwd {
  Tensor out;
  Tensor sigma;
  int64_t seed;
};

Fwd noisy_impl(const Tensor& v, const Tensor& alpha, int64_t offset, int64_t inner, std::optional<int64_t> seed,
               const std::optional<at::Generator>& generator, c10::string_view name) {
  static const auto sigma_op =
      c10::Dispatcher::singleton().findSchemaOrThrow("pni_fast::sigma", "").typed<Tensor(const Tensor&)>();
  static const auto perturb_op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("pni_fast::perturb", "")
          .typed<Tensor(const Tensor&, const Tensor&, const Tensor&, c10::SymInt, int64_t, int64_t,
                        const std::optional<Tensor>&)>();
  check_cpu(v, "noisy");
  at::AutoDispatchBelowADInplaceOrView below_autograd;  // the sub-ops' Python autograd kernels: not here
  const Tensor sigma = sigma_op.call(v);
  check_finite(sigma, {alpha}, name);
  const int64_t s = seed.has_value() ? *seed : draw_seed(generator);
  Tensor out = perturb_op.call(v, alpha, sigma, c10::SymInt(s), offset, inner, std::nullopt);
  return {std::move(out), sigma, s};
}

struct FwdMulti {
  std::vector<Tensor> outs;
  Tensor sigmas;               // 1-d, one value per tensor (sigma_multi's result)
  std::vector<int64_t> seeds;  // as perturb_multi takes them: one shared seed, or one per tensor
};

// `noise`: when not nullptr, also return the noise drawn (one float32 tensor for all, for a backward
// that reads it back).
FwdMulti noisy_multi_impl(at::TensorList vs, at::TensorList alphas, at::IntArrayRef offsets, at::IntArrayRef inners,
                          at::OptionalIntArrayRef seeds, const std::optional<at::Generator>& generator,
                          c10::string_view name, Tensor* noise = nullptr) {
  static const auto sigma_multi_op =
      c10::Dispatcher::singleton().findSchemaOrThrow("pni_fast::sigma_multi", "").typed<Tensor(at::TensorList)>();
  TORCH_CHECK_VALUE(!vs.empty() && alphas.size() == vs.size(), "pni_fast::noisy_multi: vs and alphas must hold the "
                    "same number (>= 1) of tensors, got ", vs.size(), " and ", alphas.size());
  check_cpu(vs[0], "noisy_multi");
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const Tensor sigmas = sigma_multi_op.call(vs);
  check_finite(sigmas, alphas, name);
  std::vector<int64_t> s = seeds.has_value() ? seeds->vec() : std::vector<int64_t>{draw_seed(generator)};
  // perturb_multi's checks (the seeds' length too) and kernel, with the sigma values read from the
  // one tensor (no op call and no 0-d tensor per layer)
  std::vector<Tensor> outs = cpu::perturb_multi_sigma_values(vs, alphas, sigmas, s, offsets, inners, noise);
  return {std::move(outs), sigmas, std::move(s)};
}

// The alpha gradient in a backward: below the Autograd key normally; under create_graph through it,
// so the op's registered (Python) autograd records the graph and double backward works.
Tensor alpha_grad(const Tensor& grad, const Tensor& alpha, const Tensor& sigma, int64_t seed, int64_t offset,
                  int64_t inner) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("pni_fast::perturb_alpha_grad", "")
          .typed<Tensor(const Tensor&, const Tensor&, const Tensor&, c10::SymInt, int64_t, int64_t,
                        const std::optional<Tensor>&)>();
  if (at::GradMode::is_enabled()) {
    return op.call(grad, alpha, sigma, c10::SymInt(seed), offset, inner, std::nullopt);
  }
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  return op.call(grad, alpha, sigma, c10::SymInt(seed), offset, inner, std::nullopt);
}

std::vector<Tensor> alpha_grad_multi(at::TensorList grads, at::TensorList alphas, at::TensorList sigmas,
                                     at::IntArrayRef seeds, at::IntArrayRef offsets, at::IntArrayRef inners) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("pni_fast::perturb_alpha_grad_multi", "")
          .typed<std::vector<Tensor>(at::TensorList, at::TensorList, at::TensorList, c10::SymIntArrayRef,
                                     at::IntArrayRef, at::IntArrayRef, const std::optional<Tensor>&)>();
  const c10::SymIntArrayRef sym_seeds = c10::fromIntArrayRefSlow(seeds);
  if (at::GradMode::is_enabled()) {
    return op.call(grads, alphas, sigmas, sym_seeds, offsets, inners, std::nullopt);
  }
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  return op.call(grads, alphas, sigmas, sym_seeds, offsets, inners, std::nullopt);
}

// Autograd in C++: this op is eager-only (torch.func and torch.compile use the separate ops, whose
// autograd is Python), so a C++ node costs nothing they need and saves a Python autograd.Function
// (~4 us, more than a small layer's kernel). Saved: alpha, sigma and the integers, never the noise.
struct NoisyFunction : public torch::autograd::Function<NoisyFunction> {
  static Tensor forward(torch::autograd::AutogradContext* ctx, const Tensor& v, const Tensor& alpha, int64_t offset,
                        int64_t inner, std::optional<int64_t> seed, const std::optional<at::Generator>& generator,
                        c10::string_view name) {
    Fwd r = noisy_impl(v, alpha, offset, inner, seed, generator, name);
    ctx->save_for_backward({alpha, r.sigma});
    ctx->saved_data["rng"] = std::vector<int64_t>{r.seed, offset, inner};
    return r.out;
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const std::vector<int64_t> rng = ctx->saved_data["rng"].toIntVector();
    const Tensor g = grads[0].contiguous();
    Tensor grad_alpha;
    if (ctx->needs_input_grad(1)) {
      grad_alpha = alpha_grad(g, saved[0], saved[1], rng[0], rng[1], rng[2]);
    }
    return {ctx->needs_input_grad(0) ? g : Tensor(), grad_alpha, Tensor(), Tensor(), Tensor(), Tensor(), Tensor()};
  }
};

// Small models keep the forward's noise for the backward (one float32 per weight, all layers in one
// tensor: ~1 MB for a CIFAR ResNet-20) instead of regenerating it, which costs as much as the
// forward's noise; the same bits either way. Large ones (more than save_noise_max elements) store
// nothing. Saved: the alphas, the sigmas (one tensor) and the noise when kept.
struct NoisyMultiFunction : public torch::autograd::Function<NoisyMultiFunction> {
  static torch::autograd::variable_list forward(torch::autograd::AutogradContext* ctx, at::TensorList vs,
                                                at::TensorList alphas, at::IntArrayRef offsets, at::IntArrayRef inners,
                                                at::OptionalIntArrayRef seeds,
                                                const std::optional<at::Generator>& generator,
                                                c10::string_view name, bool keep_noise) {
    Tensor noise;
    FwdMulti r = noisy_multi_impl(vs, alphas, offsets, inners, seeds, generator, name, keep_noise ? &noise : nullptr);
    std::vector<Tensor> to_save(alphas.begin(), alphas.end());
    to_save.push_back(r.sigmas);
    if (keep_noise) {
      to_save.push_back(noise);
    }
    ctx->save_for_backward(std::move(to_save));
    ctx->saved_data["seeds"] = r.seeds;
    ctx->saved_data["offsets"] = offsets.vec();
    ctx->saved_data["inners"] = inners.vec();
    return r.outs;
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const size_t n = grads.size();
    std::vector<Tensor> gs;
    gs.reserve(n);
    for (const Tensor& g : grads) {
      gs.push_back(g.contiguous());  // undefined grads were materialized as zeros
    }
    torch::autograd::variable_list out(2 * n + 6);
    bool any_alpha = false;
    for (size_t k = 0; k < n; ++k) {
      if (ctx->needs_input_grad(k)) {
        out[k] = gs[k];
      }
      any_alpha = any_alpha || ctx->needs_input_grad(n + k);
    }
    if (!any_alpha) {
      return out;
    }
    const auto saved = ctx->get_saved_variables();
    const std::vector<Tensor> alphas(saved.begin(), saved.begin() + n);
    const Tensor& sigmas = saved[n];
    const std::vector<int64_t> inners = ctx->saved_data["inners"].toIntVector();
    std::vector<Tensor> ga;
    if (saved.size() == n + 2 && !at::GradMode::is_enabled()) {  // the stored noise (create_graph: the op)
      ga = cpu::alpha_grad_multi_from_noise(gs, alphas, sigmas, inners, saved[n + 1]);
    } else {
      ga = alpha_grad_multi(gs, alphas, sigmas.unbind(0), ctx->saved_data["seeds"].toIntVector(),
                            ctx->saved_data["offsets"].toIntVector(), inners);
    }
    for (size_t k = 0; k < n; ++k) {
      if (ctx->needs_input_grad(n + k)) {
        out[n + k] = ga[k];
      }
    }
    return out;
  }
};

// CPU kernels (below autograd: no gradient wanted) and the autograd kernels.
Tensor noisy_cpu(const Tensor& v, const Tensor& alpha, int64_t offset, int64_t inner, std::optional<int64_t> seed,
                 const std::optional<at::Generator>& generator, c10::string_view name) {
  return noisy_impl(v, alpha, offset, inner, seed, generator, name).out;
}

std::vector<Tensor> noisy_multi_cpu(at::TensorList vs, at::TensorList alphas, at::IntArrayRef offsets,
                                    at::IntArrayRef inners, at::OptionalIntArrayRef seeds,
                                    const std::optional<at::Generator>& generator, c10::string_view name,
                                    int64_t /*save_noise_max*/) {
  return noisy_multi_impl(vs, alphas, offsets, inners, seeds, generator, name).outs;
}

Tensor noisy_autograd(const Tensor& v, const Tensor& alpha, int64_t offset, int64_t inner,
                      std::optional<int64_t> seed, const std::optional<at::Generator>& generator,
                      c10::string_view name) {
  return NoisyFunction::apply(v, alpha, offset, inner, seed, generator, name);
}

std::vector<Tensor> noisy_multi_autograd(at::TensorList vs, at::TensorList alphas, at::IntArrayRef offsets,
                                         at::IntArrayRef inners, at::OptionalIntArrayRef seeds,
                                         const std::optional<at::Generator>& generator, c10::string_view name,
                                         int64_t save_noise_max) {
  bool alpha_grad_wanted = false;
  int64_t total = 0;
  for (size_t k = 0; k < vs.size(); ++k) {
    total += vs[k].numel();
    alpha_grad_wanted = alpha_grad_wanted || (k < alphas.size() && alphas[k].requires_grad());
  }
  const bool keep = at::GradMode::is_enabled() && alpha_grad_wanted && total <= save_noise_max;
  return NoisyMultiFunction::apply(vs, alphas, offsets, inners, seeds, generator, name, keep);
}

}  // namespace

TORCH_LIBRARY_IMPL(pni_fast, CPU, m) {
  m.impl("noisy", &noisy_cpu);
  m.impl("noisy_multi", &noisy_multi_cpu);
}

TORCH_LIBRARY_IMPL(pni_fast, Autograd, m) {
  m.impl("noisy", &noisy_autograd);
  m.impl("noisy_multi", &noisy_multi_autograd);
}

// No tensor argument: one kernel for every dispatch key (like cpu_isa).
TORCH_LIBRARY_IMPL(pni_fast, CompositeImplicitAutograd, m) { m.impl("draw_seed", &draw_seed); }

}  // namespace pni_fast
