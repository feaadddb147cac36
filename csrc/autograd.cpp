// Autograd of the fused ops, in C++ so a training step pays no Python on the
// hot path (the Python register_autograd route costs ~20 us per forward +
// backward, more than the whole kernel for a 1K-element layer). Registered for
// the Autograd key, so it serves the CPU and CUDA kernels alike.
//
//   out = v + alpha[b(i)] * sigma * z_i
//   dL/dv = g (identity), dL/dalpha = perturb_alpha_grad(g, ...) (regenerates z),
//   sigma and the integers get no gradient (sigma is detached by design).
// Only alpha, sigma and the integers are saved: never the noise.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <vector>

namespace pni_fast {
namespace {

using at::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

Tensor call_perturb(const Tensor& v, const Tensor& alpha, const Tensor& sigma, c10::SymInt seed, int64_t offset,
                    int64_t inner) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("pni_fast::perturb", "")
                       .typed<Tensor(const Tensor&, const Tensor&, const Tensor&, c10::SymInt, int64_t, int64_t)>();
  return op.call(v, alpha, sigma, seed, offset, inner);
}

Tensor call_alpha_grad(const Tensor& g, const Tensor& alpha, const Tensor& sigma, c10::SymInt seed, int64_t offset,
                       int64_t inner) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("pni_fast::perturb_alpha_grad", "")
                       .typed<Tensor(const Tensor&, const Tensor&, const Tensor&, c10::SymInt, int64_t, int64_t)>();
  return op.call(g, alpha, sigma, seed, offset, inner);
}

using MultiSig = std::vector<Tensor>(at::TensorList, at::TensorList, at::TensorList, c10::SymInt, at::IntArrayRef,
                                     at::IntArrayRef);

std::vector<Tensor> call_perturb_multi(at::TensorList vs, at::TensorList alphas, at::TensorList sigmas, c10::SymInt seed,
                                       at::IntArrayRef offsets, at::IntArrayRef inners) {
  static auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("pni_fast::perturb_multi", "").typed<MultiSig>();
  return op.call(vs, alphas, sigmas, seed, offsets, inners);
}

std::vector<Tensor> call_alpha_grad_multi(at::TensorList gs, at::TensorList alphas, at::TensorList sigmas,
                                          c10::SymInt seed, at::IntArrayRef offsets, at::IntArrayRef inners) {
  static auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("pni_fast::perturb_alpha_grad_multi", "").typed<MultiSig>();
  return op.call(gs, alphas, sigmas, seed, offsets, inners);
}

class PerturbFunction : public torch::autograd::Function<PerturbFunction> {
 public:
  static Tensor forward(AutogradContext* ctx, const Tensor& v, const Tensor& alpha, const Tensor& sigma, c10::SymInt seed,
                        int64_t offset, int64_t inner) {
    at::AutoDispatchBelowADInplaceOrView guard;
    Tensor out = call_perturb(v, alpha, sigma, seed, offset, inner);
    ctx->save_for_backward({alpha, sigma});
    ctx->saved_data["seed"] = seed;
    ctx->saved_data["offset"] = offset;
    ctx->saved_data["inner"] = inner;
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const auto saved = ctx->get_saved_variables();
    const Tensor& alpha = saved[0];
    const Tensor& sigma = saved[1];
    const Tensor& g = grad_outputs[0];
    Tensor grad_alpha;
    if (ctx->needs_input_grad(1) && g.defined()) {
      grad_alpha = call_alpha_grad(g.contiguous(), alpha, sigma, ctx->saved_data["seed"].toSymInt(),
                                   ctx->saved_data["offset"].toInt(), ctx->saved_data["inner"].toInt());
    }
    return {g, grad_alpha, Tensor(), Tensor(), Tensor(), Tensor()};
  }
};

class PerturbMultiFunction : public torch::autograd::Function<PerturbMultiFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, at::TensorList vs, at::TensorList alphas,
                               at::TensorList sigmas, c10::SymInt seed, at::IntArrayRef offsets,
                               at::IntArrayRef inners) {
    at::AutoDispatchBelowADInplaceOrView guard;
    std::vector<Tensor> outs = call_perturb_multi(vs, alphas, sigmas, seed, offsets, inners);
    std::vector<Tensor> to_save(alphas.begin(), alphas.end());
    to_save.insert(to_save.end(), sigmas.begin(), sigmas.end());
    ctx->save_for_backward(to_save);
    ctx->saved_data["seed"] = seed;
    ctx->saved_data["offsets"] = offsets.vec();
    ctx->saved_data["inners"] = inners.vec();
    return outs;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const auto saved = ctx->get_saved_variables();
    const size_t n = saved.size() / 2;
    std::vector<Tensor> alphas(saved.begin(), saved.begin() + static_cast<std::ptrdiff_t>(n));
    std::vector<Tensor> sigmas(saved.begin() + static_cast<std::ptrdiff_t>(n), saved.end());
    // gradient slots: vs (n), alphas (n), sigmas (n), seed, offsets, inners
    variable_list grads(3 * n + 3);
    bool any_alpha = false;
    for (size_t i = 0; i < n; ++i) {
      grads[i] = grad_outputs[i];  // identity for v (undefined = zero)
      any_alpha = any_alpha || ctx->needs_input_grad(n + i);
    }
    if (any_alpha) {
      // outputs without a gradient contribute zero; the rest go through one list call
      std::vector<size_t> idx;
      std::vector<Tensor> gs, as, ss;
      std::vector<int64_t> offs, inns;
      const auto offsets = ctx->saved_data["offsets"].toIntVector();
      const auto inners = ctx->saved_data["inners"].toIntVector();
      for (size_t i = 0; i < n; ++i) {
        if (!ctx->needs_input_grad(n + i)) {
          continue;
        }
        if (!grad_outputs[i].defined()) {
          grads[n + i] = at::zeros_like(alphas[i]);
          continue;
        }
        idx.push_back(i);
        gs.push_back(grad_outputs[i].contiguous());
        as.push_back(alphas[i]);
        ss.push_back(sigmas[i]);
        offs.push_back(offsets[i]);
        inns.push_back(inners[i]);
      }
      if (!idx.empty()) {
        std::vector<Tensor> ga = call_alpha_grad_multi(gs, as, ss, ctx->saved_data["seed"].toSymInt(), offs, inns);
        for (size_t j = 0; j < idx.size(); ++j) {
          grads[n + idx[j]] = ga[j];
        }
      }
    }
    return grads;
  }
};

Tensor perturb_autograd(const Tensor& v, const Tensor& alpha, const Tensor& sigma, c10::SymInt seed, int64_t offset,
                        int64_t inner) {
  return PerturbFunction::apply(v, alpha, sigma, seed, offset, inner);
}

std::vector<Tensor> perturb_multi_autograd(at::TensorList vs, at::TensorList alphas, at::TensorList sigmas,
                                           c10::SymInt seed, at::IntArrayRef offsets, at::IntArrayRef inners) {
  return PerturbMultiFunction::apply(vs, alphas, sigmas, seed, offsets, inners);
}

}  // namespace

TORCH_LIBRARY_IMPL(pni_fast, Autograd, m) {
  m.impl("perturb", &perturb_autograd);
  m.impl("perturb_multi", &perturb_multi_autograd);
}

}  // namespace pni_fast
