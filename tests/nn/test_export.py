"""Graph capture of PNI models: torch.export and torch.fx keep fresh noise per call; torch.jit.trace /
torch.jit.script and ONNX export refuse with an error that names pni_fast.no_noise / pni_fast.strip."""

import copy
import importlib.util
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import pni_fast.functional as fn
from pni_fast.nn.control import no_noise, set_noise
from pni_fast.nn.convert import convert, strip
from pni_fast.nn.layers import NoiseInjection, NoisyConv2d, NoisyLinear, alpha_parameters
from pni_fast.rng import SEED_LIMIT

warnings.filterwarnings("ignore", message="pni_fast: no fused kernel")


def _model(batch_noise: bool = False):
    """A small converted model; per-layer draws (``batch_noise=False``) so an FX GraphModule, which does not
    carry the model's batching hooks, draws exactly what eager does."""
    torch.manual_seed(0)
    model = nn.Sequential(
        NoisyConv2d(3, 4, 3, pni="channelwise", noise="both"),
        nn.ReLU(),
        NoiseInjection(4, pni="channelwise"),
        nn.Flatten(),
        nn.Unflatten(1, (4, 36)),
        nn.Conv1d(4, 2, 3),
        nn.Flatten(),
        nn.Linear(68, 5),
    )
    convert(model, noise="both", batch_noise=batch_noise)  # Conv1d converted in place, Linear -> NoisyLinear
    return model.eval()


X = torch.randn(2, 3, 8, 8)


def _exported_seed() -> int:
    """The seed an exported PNI call draws: torch.randint on the CPU generator (RNG state (seed, 0))."""
    return int(torch.randint(0, SEED_LIMIT - 1, (1,), dtype=torch.int64).item())


@pytest.mark.parametrize("strict", [False, True])
def test_export_draws_fresh_noise_per_call(strict):
    model = _model()
    ep = torch.export.export(model, (X,), strict=strict)
    targets = {
        str(n.target)
        for g in ep.graph_module.modules()
        if isinstance(g, torch.fx.GraphModule)
        for n in g.graph.nodes
        if n.op == "call_function"
    }
    assert any(t.startswith("pni_fast.perturb") for t in targets) and "aten.randint.low" in targets
    run = ep.module()
    a, b = run(X), run(X)
    assert a.shape == b.shape == (2, 5) and torch.isfinite(a).all()
    assert not torch.equal(a, b), "each run of the exported program draws new noise"
    with no_noise(model):
        clean = model(X)
        plain = torch.export.export(model, (X,), strict=strict).module()
        torch.testing.assert_close(plain(X), clean)
        torch.testing.assert_close(plain(X), clean)
    assert not torch.allclose(a, clean), "the exported program with noise on is noisy"


def test_exported_noise_is_the_contract_noise_for_the_drawn_seed():
    """One NoisyLinear exported: the program's output equals F.linear with noisy_weight(seed) where seed is
    the program's torch.randint draw (RNG state (seed, 0) = seed with offset 0)."""
    torch.manual_seed(0)
    layer = NoisyLinear(6, 4, pni="channelwise")
    x = torch.randn(3, 6)
    run = torch.export.export(layer, (x,)).module()
    torch.manual_seed(11)
    out = run(x)
    torch.manual_seed(11)
    w = fn.noisy_weight(layer.weight, layer.alpha_w, seed=_exported_seed())
    torch.testing.assert_close(out, F.linear(x, w, layer.bias))


def test_fx_symbolic_trace_calls_the_noise_at_run_time():
    model = _model()
    gm = torch.fx.symbolic_trace(model)
    calls = [n.target.__name__ for n in gm.graph.nodes if n.op == "call_function" and callable(n.target)]
    assert calls.count("noisy_weight_call") == 2 and calls.count("noisy_input_call") == 3
    assert [n.target for n in gm.graph.nodes if n.op == "call_module"] == ["1", "3", "4", "5", "6"]
    torch.manual_seed(5)
    out = gm(X)
    torch.manual_seed(5)
    torch.testing.assert_close(out, model(X))  # the same draws in the same order as eager
    assert not torch.equal(gm(X), out), "fresh noise per call"
    out.sum().backward()
    assert all(a.grad is not None for a in alpha_parameters(model)), "the GraphModule shares the alphas"
    with no_noise(model):
        quiet = torch.fx.symbolic_trace(model)
        assert not any(n.op == "call_function" and "noisy" in str(n.target) for n in quiet.graph.nodes)
        torch.testing.assert_close(quiet(X), model(X))


class TwiceConv1d(nn.Conv1d):
    def forward(self, x):
        return super().forward(x) * 2.0


def test_fx_layers_converted_in_place_stay_leaves_or_are_traced_like_the_plain_layer():
    """A converted torch.nn layer (ConvTranspose1d, whose forward FX cannot trace) stays a leaf module called at
    run time, like the plain layer; a user's subclass is traced through, its noise a leaf call."""
    torch.manual_seed(0)
    model = convert(nn.Sequential(nn.ConvTranspose1d(2, 3, 3), TwiceConv1d(3, 2, 3)), noise="both")
    gm = torch.fx.symbolic_trace(model)
    assert [n.target for n in gm.graph.nodes if n.op == "call_module"] == ["0"]
    calls = [n.target.__name__ for n in gm.graph.nodes if n.op == "call_function" and callable(n.target)]
    assert calls.count("noisy_weight_call") == 1 and calls.count("noisy_input_call") == 1
    x = torch.randn(2, 2, 6)
    torch.manual_seed(4)
    out = gm(x)
    torch.manual_seed(4)
    torch.testing.assert_close(out, model(x))
    assert not torch.equal(gm(x), out)


def test_fx_custom_tracer_like_feature_extractors():
    """torchvision's create_feature_extractor uses its own fx.Tracer subclass; the leaves hold there too."""

    class LeafTracer(torch.fx.Tracer):
        def is_leaf_module(self, m, qualname):
            return isinstance(m, nn.ReLU) or super().is_leaf_module(m, qualname)

    model = _model()
    gm = torch.fx.GraphModule(model, LeafTracer().trace(model))
    torch.manual_seed(2)
    out = gm(X)
    torch.manual_seed(2)
    torch.testing.assert_close(out, model(X))


@pytest.mark.skipif(importlib.util.find_spec("torchvision") is None, reason="torchvision is not installed")
def test_torchvision_create_feature_extractor():
    from torchvision.models.feature_extraction import create_feature_extractor

    model = _model()
    fx = create_feature_extractor(model, return_nodes={"1": "relu", "7": "logits"})
    a, b = fx(X), fx(X)
    assert a["logits"].shape == (2, 5) and not torch.equal(a["logits"], b["logits"])


def test_jit_trace_refuses_noise_and_works_without():
    model = _model()
    with pytest.raises(RuntimeError, match=r"jit.trace would freeze.*no_noise\(model\).*strip\(model\)"):
        torch.jit.trace(model, (X,))
    with pytest.raises(RuntimeError, match="jit.trace would freeze"):
        torch.jit.trace(NoiseInjection(), (X,))
    with no_noise(model):
        traced = torch.jit.trace(model, (X,))
        torch.testing.assert_close(traced(X), model(X))
    set_noise(model, False)
    torch.jit.trace(model, (X,))  # the module flags work too


def test_jit_script_refuses_and_leaves_the_model_alone():
    model = _model()
    types = [type(m) for m in model]
    with pytest.raises(RuntimeError, match=r"jit.script cannot compile NoisyConv2d.*strip\(copy.deepcopy\(model\)\)"):
        torch.jit.script(model)
    assert [type(m) for m in model] == types, "scripting must not swap the user's layers"
    scripted = torch.jit.script(strip(copy.deepcopy(model)))
    with no_noise(model):
        torch.testing.assert_close(scripted(X), model(X))


@pytest.mark.skipif(
    importlib.util.find_spec("onnx") is None or importlib.util.find_spec("onnxscript") is None,
    reason="onnx/onnxscript are not installed (torch.onnx.export needs them)",
)
@pytest.mark.parametrize("dynamo", [True, False])
def test_onnx_export_refuses_noise_clearly(dynamo, tmp_path):
    model = _model()
    with pytest.raises(Exception, match=r"ONNX export with PNI noise on is not supported"):
        torch.onnx.export(model, (X,), str(tmp_path / "m.onnx"), dynamo=dynamo)
    with no_noise(model):
        torch.onnx.export(model, (X,), str(tmp_path / "m.onnx"), dynamo=dynamo)


def test_public_functions_and_batched_models_export_with_fresh_noise():
    """seed=None under torch.export draws inside the program (also for noisy_weights / batch_weight_noise)."""

    class F(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.randn(6, 4))
            self.a = torch.nn.Parameter(torch.tensor([0.3]))

        def forward(self, x):
            return x @ pni_fast.noisy_weights([self.w], [self.a])[0].t()

    x = torch.randn(2, 4)
    import pni_fast

    for model in (F(), pni_fast.models.resnet20(pni="layerwise")):
        if not isinstance(model, F):
            pni_fast.batch_weight_noise(model)
            x = torch.rand(1, 3, 32, 32)
        ep = torch.export.export(model.eval(), (x,))
        a, b = ep.module()(x), ep.module()(x)
        assert a.shape == b.shape and not torch.equal(a, b)
