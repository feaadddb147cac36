"""Adding a backend is one ``register_backend`` call (docs/adding_a_backend.md): a toy backend whose ops
delegate to the pure-PyTorch ones is registered here and must then be listed, chosen on request, given
autograd, and give the torch backend's results and gradients, with no other code touched."""

from __future__ import annotations

from typing import Optional

import pytest
import torch
from torch import Tensor

import pni_fast
from pni_fast.ops import registry as backends
from pni_fast.ops.registry import Backend, register_backend


@torch.library.custom_op("pni_fast::noise_toyreg", mutates_args=())
def noise_toyreg(like: Tensor, seed: int, offset: int, rng_state: Optional[Tensor] = None) -> Tensor:
    return torch.ops.pni_fast.noise_torch(like, seed, offset, rng_state)


@torch.library.custom_op("pni_fast::perturb_toyreg", mutates_args=())
def perturb_toyreg(
    v: Tensor, alpha: Tensor, sigma: Tensor, seed: int, offset: int, inner: int, rng_state: Optional[Tensor] = None
) -> Tensor:
    return torch.ops.pni_fast.perturb_torch(v, alpha, sigma, seed, offset, inner, rng_state)


@torch.library.custom_op("pni_fast::perturb_alpha_grad_toyreg", mutates_args=())
def perturb_alpha_grad_toyreg(
    grad: Tensor, alpha: Tensor, sigma: Tensor, seed: int, offset: int, inner: int, rng_state: Optional[Tensor] = None
) -> Tensor:
    return torch.ops.pni_fast.perturb_alpha_grad_torch(grad, alpha, sigma, seed, offset, inner, rng_state)


@noise_toyreg.register_fake
def _(like, seed, offset, rng_state=None):
    return torch.empty(like.shape, dtype=torch.float32, device=like.device)


@perturb_toyreg.register_fake
def _(v, alpha, sigma, seed, offset, inner, rng_state=None):
    return torch.empty_like(v, memory_format=torch.contiguous_format)


@perturb_alpha_grad_toyreg.register_fake
def _(grad, alpha, sigma, seed, offset, inner, rng_state=None):
    return torch.empty_like(alpha, memory_format=torch.contiguous_format)


@pytest.fixture
def toy():
    register_backend(
        Backend(
            "toyreg",
            ("cpu",),
            0,  # only on request
            lambda device_type: None,
            noise="noise_toyreg",
            perturb="perturb_toyreg",
            alpha_grad="perturb_alpha_grad_toyreg",
        )
    )
    yield "toyreg"
    del backends.REGISTRY["toyreg"]
    backends._resolved.clear()


def test_one_registration_adds_a_backend(toy):
    assert toy in pni_fast.available_backends("cpu")
    assert toy not in pni_fast.available_backends("meta")  # its device types, from the entry alone
    with pytest.raises(RuntimeError, match="toyreg"):
        pni_fast.noisy_weight(torch.randn(4, device="meta"), torch.ones(1, device="meta"), seed=1, backend=toy)

    torch.manual_seed(0)
    w = torch.randn(8, 3, 3, 3, requires_grad=True)
    a = torch.full((8, 1, 1, 1), 0.25, requires_grad=True)
    g = torch.randn(8, 3, 3, 3)
    results = {}
    for name in (toy, "torch"):
        out = pni_fast.noisy_weight(w, a, seed=7, backend=name)
        gw, ga = torch.autograd.grad(out, (w, a), g)  # autograd attached from the entry
        results[name] = (out.detach(), gw, ga)
    for mine, ref in zip(results[toy], results["torch"]):
        torch.testing.assert_close(mine, ref, rtol=0, atol=0)
    many = pni_fast.noisy_weights([w, w], [a, a], seed=3, backend=toy)  # no list ops: the per-tensor loop
    ref = pni_fast.noisy_weights([w, w], [a, a], seed=3, backend="torch")
    for mine, theirs in zip(many, ref):
        torch.testing.assert_close(mine, theirs, rtol=0, atol=0)
    z = pni_fast.randn(10, seed=5, backend=toy)
    torch.testing.assert_close(z, pni_fast.randn(10, seed=5, backend="torch"), rtol=0, atol=0)


def test_unknown_backend_names_the_registered_ones(toy):
    with pytest.raises(ValueError, match="toyreg"):
        pni_fast.noisy_weight(torch.randn(4), torch.ones(1), seed=1, backend="nope")
