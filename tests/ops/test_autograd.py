"""Higher-order gradients, torch.func transforms and forward-mode AD: correct numbers or a clear error."""

import pytest
import torch

import pni_fast

import kernels

BACKENDS = kernels.backend_params("cpu", exclude=kernels.TRITON_ELSEWHERE)


@pytest.mark.parametrize("backend", BACKENDS)
def test_second_derivative_through_alpha_matches_finite_difference(backend):
    torch.manual_seed(0)
    w = torch.randn(6, 3, dtype=torch.float64)
    a = torch.tensor([0.5], dtype=torch.float64, requires_grad=True)
    (ga,) = torch.autograd.grad((pni_fast.noisy_weight(w, a, seed=3, backend=backend) ** 2).sum(), a, create_graph=True)
    (gga,) = torch.autograd.grad(ga.sum(), a)
    # f(a) = sum (w + a s z)^2  ->  f''(a) = 2 sum (s z)^2, from the noise itself
    sz = pni_fast.weight_sigma(w) * pni_fast.randn(w.shape, seed=3, backend=backend).double()
    exact = 2 * (sz**2).sum()
    eps = 1e-4

    def f_prime(av):
        t = torch.tensor([av], dtype=torch.float64, requires_grad=True)
        (g,) = torch.autograd.grad((pni_fast.noisy_weight(w, t, seed=3, backend=backend) ** 2).sum(), t)
        return g.item()

    fd = (f_prime(0.5 + eps) - f_prime(0.5 - eps)) / (2 * eps)
    assert gga.item() != 0.0
    torch.testing.assert_close(gga, exact.reshape(1), rtol=1e-6, atol=1e-9)
    assert abs(gga.item() - fd) < 1e-5 * max(1.0, abs(fd))


@pytest.mark.parametrize("backend", BACKENDS)
def test_grad_alpha_depends_on_input(backend):
    """d(grad_alpha)/dx through a conv with input noise is not None (it was)."""
    torch.manual_seed(1)
    conv = pni_fast.NoisyConv2d(2, 3, 3, noise="weight", pni="channelwise").double()
    x = torch.randn(1, 2, 5, 5, dtype=torch.float64, requires_grad=True)
    with torch.random.fork_rng():
        torch.manual_seed(5)
        out = conv(x)
    (ga,) = torch.autograd.grad(out.sum(), conv.alpha_w, create_graph=True)
    (gx,) = torch.autograd.grad(ga.sum(), x)
    assert gx is not None and gx.abs().sum() > 0

    # finite difference of sum(grad_alpha) in x[0, 0, 2, 2] with the same noise
    def g_sum(xv):
        with torch.random.fork_rng():
            torch.manual_seed(5)
            o = conv(xv)
        (g,) = torch.autograd.grad(o.sum(), conv.alpha_w)
        return g.sum().item()

    e = torch.zeros_like(x)
    e[0, 0, 2, 2] = 1e-6
    fd = (g_sum(x.detach() + e) - g_sum(x.detach() - e)) / 2e-6
    assert abs(gx[0, 0, 2, 2].item() - fd) < 1e-5 * max(1.0, abs(fd))


@pytest.mark.parametrize("backend", BACKENDS)
def test_multi_tensor_double_backward(backend):
    torch.manual_seed(2)
    ws = [torch.randn(4, 3, dtype=torch.float64), torch.randn(5, dtype=torch.float64)]
    alphas = [
        torch.tensor([0.3], dtype=torch.float64, requires_grad=True),
        torch.full((5,), 0.2, dtype=torch.float64, requires_grad=True),
    ]
    outs = pni_fast.noisy_weights(ws, alphas, seed=7, backend=backend)
    loss = sum((o**2).sum() for o in outs)
    g = torch.autograd.grad(loss, alphas, create_graph=True)
    gg = torch.autograd.grad(g[0].sum() + g[1].sum(), alphas)
    offset = 0
    for w, a, h in zip(ws, alphas, gg):
        single = pni_fast.noisy_weight(w, a, seed=7, offset=offset, backend=backend)
        (g1,) = torch.autograd.grad((single**2).sum(), a, create_graph=True)
        (h1,) = torch.autograd.grad(g1.sum(), a)
        torch.testing.assert_close(h, h1)
        offset += -(-w.numel() // 4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_func_grad_vjp_jacrev(backend):
    torch.manual_seed(3)
    w = torch.randn(4, 5, dtype=torch.float64)
    a = torch.tensor([0.4], dtype=torch.float64)

    def f(a):
        return (pni_fast.noisy_weight(w, a, seed=9, backend=backend) ** 2).sum()

    a_req = a.clone().requires_grad_()
    (ref,) = torch.autograd.grad(f(a_req), a_req)
    torch.testing.assert_close(torch.func.grad(f)(a), ref)
    out, vjp_fn = torch.func.vjp(lambda a: pni_fast.noisy_weight(w, a, seed=9, backend=backend), a)
    (va,) = vjp_fn(torch.ones_like(out))
    sz = pni_fast.weight_sigma(w) * pni_fast.randn(w.shape, seed=9, backend=backend).double()
    torch.testing.assert_close(va, sz.sum().reshape(1))
    jac = torch.func.jacrev(lambda a: pni_fast.noisy_weight(w, a, seed=9, backend=backend))(a)
    torch.testing.assert_close(jac.reshape(-1), sz.reshape(-1))


@pytest.mark.parametrize("backend", BACKENDS)
def test_per_sample_gradients_with_vmap(backend):
    """vmap(grad) over a batch: one shared noise draw (randomness='same'), per-sample gradients equal a loop."""
    torch.manual_seed(4)
    layer = pni_fast.NoisyLinear(5, 3, noise="both", pni="channelwise").double()
    params = {k: v.detach() for k, v in layer.named_parameters()}
    x = torch.randn(6, 5, dtype=torch.float64)
    y = torch.randn(6, 3, dtype=torch.float64)

    def loss(p, xi, yi):
        torch.manual_seed(123)  # the same drawn seeds for every sample and for the loop below
        out = torch.func.functional_call(layer, p, (xi.unsqueeze(0),))
        return ((out - yi) ** 2).sum()

    per_sample = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0, 0), randomness="same")(params, x, y)
    for i in range(x.shape[0]):
        g = torch.func.grad(loss)(params, x[i], y[i])
        for k in params:
            torch.testing.assert_close(per_sample[k][i], g[k], msg=k)


def test_vmap_randomness_different_is_refused():
    w = torch.randn(3, 4, 4)
    a = torch.tensor([0.3])
    with pytest.raises(RuntimeError, match="randomness='same'"):
        torch.func.vmap(lambda x: pni_fast.noisy_weight(x, a, seed=1), randomness="different")(w)


@pytest.mark.parametrize("backend", BACKENDS)
def test_forward_mode_ad_raises(backend):
    w = torch.randn(4, 3)
    a = torch.tensor([0.5])
    with pytest.raises((RuntimeError, NotImplementedError), match="jvp"):
        torch.func.jvp(lambda a: pni_fast.noisy_weight(w, a, seed=1, backend=backend), (a,), (torch.ones_like(a),))
    x = torch.randn(2, 4)
    layer = pni_fast.NoisyLinear(4, 3, noise="input")
    with pytest.raises((RuntimeError, NotImplementedError), match="jvp"):
        torch.func.jvp(layer, (x,), (torch.ones_like(x),))
