"""The C++ backends' (cpu, cuda) Python side: fake kernels of the compiled ops.

The ops themselves are schemas and kernels of the compiled library (csrc/ops.cpp; CPU, CUDA and
Meta kernels). ``torch.compile`` and ``opcheck`` also need a fake kernel per op; these run the
contract's argument checks (:mod:`pni_fast.contract`, the same rules and messages the C++ kernels
raise through the generated ``csrc/check_messages.h``) and return empty tensors of the result's
shape. Importing this module registers them; :mod:`pni_fast.ops.dispatch` imports it the first
time a C++ backend is chosen (the compiled library is loaded by then).
"""

from __future__ import annotations

import torch

from .. import contract

__all__: list[str] = []  # registers on import


def words_like(like, seed, offset, rng_state=None, dtype=torch.int32, op="rng_words"):
    contract.check_noise(op, like, seed, offset, rng_state)
    return like.new_empty((4 * contract.quads(like.numel()),), dtype=dtype)


def noise(like, seed, offset, rng_state=None):
    contract.check_noise("noise", like, seed, offset, rng_state)
    return like.new_empty(like.shape, dtype=torch.float32)


def perturb(v, alpha, sigma, seed, offset, inner, rng_state=None):
    contract.check_perturb("perturb", "v", v, alpha, sigma, seed, offset, inner, rng_state)
    return v.new_empty(v.shape)


def alpha_grad(grad, alpha, sigma, seed, offset, inner, rng_state=None):
    contract.check_perturb("perturb_alpha_grad", "grad", grad, alpha, sigma, seed, offset, inner, rng_state)
    return alpha.new_empty(alpha.shape)


def perturb_multi(vs, alphas, sigmas, seeds, offsets, inners, rng_state=None):
    contract.check_perturb_multi("perturb_multi", "v", vs, alphas, sigmas, seeds, offsets, inners, rng_state)
    return [v.new_empty(v.shape) for v in vs]


def alpha_grad_multi(grads, alphas, sigmas, seeds, offsets, inners, rng_state=None):
    contract.check_perturb_multi(
        "perturb_alpha_grad_multi", "grad", grads, alphas, sigmas, seeds, offsets, inners, rng_state
    )
    return [a.new_empty(a.shape) for a in alphas]


torch.library.register_fake("pni_fast::noise")(noise)
torch.library.register_fake("pni_fast::rng_words")(words_like)
torch.library.register_fake("pni_fast::rng_uniform")(
    lambda like, seed, offset, rng_state=None: words_like(like, seed, offset, rng_state, torch.float32, "rng_uniform")
)
torch.library.register_fake("pni_fast::perturb")(perturb)
torch.library.register_fake("pni_fast::perturb_alpha_grad")(alpha_grad)
torch.library.register_fake("pni_fast::perturb_multi")(perturb_multi)
torch.library.register_fake("pni_fast::perturb_alpha_grad_multi")(alpha_grad_multi)
