"""convert() on every conv/linear layer kind: Conv1d/3d, ConvTranspose*, subclasses with their own forward
(timm-style "same" padding and weight standardization, emulated here: timm is not a dependency),
parametrized and pruned layers; the report of what was converted or skipped and why; strip()."""

import copy
import io
import pickle
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils import parametrizations, parametrize, prune

import pni_fast
import pni_fast.functional as fn
from pni_fast.nn.control import no_noise
from pni_fast.nn.convert import ConvertReport, convert, strip
from pni_fast.nn.layers import NoisyLinear, alpha_parameters

warnings.filterwarnings("ignore", message="pni_fast: no fused kernel")


class Conv2dSame(nn.Conv2d):
    """Like timm's Conv2dSame: TensorFlow "same" padding computed from the input size in forward."""

    def forward(self, x):
        ih, iw = x.shape[-2:]
        pads = []
        for size, k, s, d in zip((iw, ih), self.kernel_size[::-1], self.stride[::-1], self.dilation[::-1]):
            total = max((-(-size // s) - 1) * s + (k - 1) * d + 1 - size, 0)
            pads += [total // 2, total - total // 2]
        return F.conv2d(F.pad(x, pads), self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


class StdConv2d(nn.Conv2d):
    """Like timm's StdConv2d: the weight is standardized per output channel in forward."""

    def forward(self, x):
        w = F.batch_norm(
            self.weight.reshape(1, self.out_channels, -1), None, None, training=True, momentum=0.0, eps=1e-6
        ).reshape_as(self.weight)
        return F.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)


class MyLinear(nn.Linear):
    def forward(self, x):
        return super().forward(x) * 2.0


CASES = {
    "conv1d": (lambda: nn.Conv1d(3, 4, 3, padding=1), (2, 3, 7)),
    "conv3d": (lambda: nn.Conv3d(2, 3, 2), (1, 2, 4, 4, 4)),
    "convT1d": (lambda: nn.ConvTranspose1d(3, 2, 3, stride=2), (2, 3, 5)),
    "convT2d": (lambda: nn.ConvTranspose2d(3, 2, 3, stride=2, output_padding=1), (2, 3, 4, 4)),
    "convT3d": (lambda: nn.ConvTranspose3d(2, 4, 2, groups=2), (1, 2, 3, 3, 3)),
    "same": (lambda: Conv2dSame(3, 4, 3, stride=2), (1, 3, 9, 9)),
    "std": (lambda: StdConv2d(3, 4, 3, padding=1), (2, 3, 5, 5)),
    "mylinear": (lambda: MyLinear(5, 3), (4, 5)),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("pni", ["layerwise", "channelwise", "elementwise"])
@pytest.mark.parametrize("noise", ["weight", "both"])
def test_wrapped_layer_equals_its_class_forward_on_the_noisy_weight(case, pni, noise):
    """The converted layer = the original class's forward with weight noisy_weight(seed) and input
    inject_noise(seed'), seeds drawn weight first; noise off = the original output bit for bit."""
    factory, shape = CASES[case]
    torch.manual_seed(0)
    layer = factory().double()
    x = torch.randn(shape, dtype=torch.float64)
    plain = copy.deepcopy(layer)
    before = layer(x)
    weight = layer.weight
    if noise == "both" and pni == "elementwise" and case != "mylinear":
        with pytest.raises(ValueError, match="elementwise' input noise on"):
            convert(layer, pni=pni, noise=noise)
        assert type(layer) is type(plain) and not hasattr(layer, "alpha_w"), "a refused conversion changes nothing"
        return
    rep = convert(layer, pni=pni, noise=noise, report=True)
    assert isinstance(rep, ConvertReport) and rep.model is layer, "converted in place"
    assert isinstance(layer, type(plain)) and type(layer).__name__ == "Noisy" + type(plain).__name__
    assert [(n, c) for n, c, _ in rep.converted] == [("", type(plain).__name__)] and rep.skipped == []
    assert layer.weight is weight
    assert set(layer.state_dict()) == set(plain.state_dict()) | {
        a for a in ("alpha_w", "alpha_i") if getattr(layer, a) is not None
    }
    with no_noise(layer):
        assert torch.equal(layer(x), before)
    with torch.no_grad():
        for a in alpha_parameters(layer):
            a.copy_(torch.rand_like(a) * 0.5 + 0.1)
    torch.manual_seed(7)
    out = layer(x)
    assert out.shape == before.shape, "the class's own forward decides the shape ('same' padding: 5x5)"
    torch.manual_seed(7)
    seed_w = pni_fast.draw_seed()
    xin = x
    if noise == "both":
        xin = fn.inject_noise(x, layer.alpha_i, seed=pni_fast.draw_seed())
    w = fn.noisy_weight(weight, layer.alpha_w, seed=seed_w)
    expected = torch.func.functional_call(plain, {"weight": w, "bias": layer.bias}, (xin,))
    torch.testing.assert_close(out, expected)
    alphas = alpha_parameters(layer)
    for g, e in zip(
        torch.autograd.grad(out.square().sum(), alphas), torch.autograd.grad(expected.square().sum(), alphas)
    ):
        torch.testing.assert_close(g, e)
    assert not torch.allclose(layer(x), out), "fresh noise per call"
    assert strip(layer) is layer and type(layer) is type(plain) and layer.weight is weight
    assert set(layer.state_dict()) == set(plain.state_dict()) and not hasattr(layer, "noise_enabled")
    assert torch.equal(layer(x), before)


def test_conv_transpose_output_size_argument_and_unbatched_input():
    torch.manual_seed(0)
    layer = nn.ConvTranspose2d(3, 2, 3, stride=2)
    x = torch.randn(1, 3, 4, 4)
    plain_out = layer(x, output_size=[10, 10])
    convert(layer, noise="both", pni="channelwise")
    assert layer(x, output_size=[10, 10]).shape == plain_out.shape == (1, 2, 10, 10)
    conv = convert(nn.Conv1d(3, 2, 3), noise="both", pni="channelwise")
    torch.manual_seed(1)
    out = conv(torch.ones(3, 5))  # unbatched [C, L]: channel dim 0 for the per-channel input alpha
    torch.manual_seed(1)
    assert torch.equal(out, conv(torch.ones(1, 3, 5))[0])


def test_report_lazy_mha_and_unsupported_layers(capsys):
    model = nn.Sequential(
        nn.Conv1d(2, 3, 3),
        nn.MultiheadAttention(4, 2),
        nn.LazyLinear(3),
        nn.Linear(3, 3),
        nn.Embedding(5, 4),
        NoisyLinear(2, 2),
    )
    sd = {k: v.clone() for k, v in model.state_dict().items() if "2." not in k}
    with pytest.raises(ValueError, match=r"uninitialised lazy layer\(s\) 2 \(LazyLinear\).*run one forward pass"):
        convert(model)
    assert type(model[0]) is nn.Conv1d and type(model[3]) is nn.Linear, "a refused convert changes nothing"
    model[2](torch.randn(2, 5))
    with pytest.warns(UserWarning, match="left without noise") as rec:
        rep = convert(model, skip="3", report=True, verbose=True)
    assert "1 (MultiheadAttention)" in str(rec[0].message) and "1.out_proj" in str(rec[0].message)
    converted = {n: how for n, _, how in rep.converted}
    assert set(converted) == {"0", "2"} and "replaced by NoisyLinear" in converted["2"]
    skipped = {n: why for n, _, why in rep.skipped}
    assert set(skipped) == {"1", "1.out_proj", "3", "4", "5"}
    assert "in_proj_weight" in skipped["1"] and "never runs" in skipped["1.out_proj"]
    assert "skip=" in skipped["3"] and "unsupported layer type" in skipped["4"] and "already" in skipped["5"]
    printed = capsys.readouterr().out
    assert "2 layer(s) converted, 5 left as they are" in printed and "skipped   4 (Embedding)" in printed
    assert all(torch.equal(model.state_dict()[k], v) for k, v in sd.items()), "weights untouched"
    assert (
        isinstance(model[2], NoisyLinear)
        and type(model[1].out_proj) is nn.modules.linear.NonDynamicallyQuantizableLinear
    )


def test_foreign_pni_layers_are_not_noised_twice():
    from pni_fast.reference import ReferenceNoisyConv2d

    model = nn.Sequential(ReferenceNoisyConv2d(2, 2, 3))
    with pytest.warns(UserWarning, match="no layer"):
        rep = convert(model, report=True)
    assert type(model[0]) is ReferenceNoisyConv2d and "PNI layer from elsewhere" in rep.skipped[0][2]


def test_wrapped_layers_pickle_deepcopy_and_load_plain_checkpoints():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv1d(2, 3, 3), nn.ConvTranspose1d(3, 2, 3))
    plain_sd = copy.deepcopy(model.state_dict())
    convert(model, pni="channelwise")
    for clone in (pickle.loads(pickle.dumps(model)), copy.deepcopy(model)):
        assert [type(m).__name__ for m in clone] == ["NoisyConv1d", "NoisyConvTranspose1d"]
        assert clone[0].weight is not model[0].weight and torch.equal(clone[0].weight, model[0].weight)
        x = torch.randn(1, 2, 6)
        torch.manual_seed(3)
        a = model(x)
        torch.manual_seed(3)
        torch.testing.assert_close(clone(x), a)
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    assert type(torch.load(buf, weights_only=False)[1]).__name__ == "NoisyConvTranspose1d"
    fresh = convert(nn.Sequential(nn.Conv1d(2, 3, 3), nn.ConvTranspose1d(3, 2, 3)), pni="channelwise")
    result = fresh.load_state_dict(plain_sd, strict=False)
    assert sorted(result.missing_keys) == ["0.alpha_w", "1.alpha_w"] and not result.unexpected_keys
    assert torch.equal(fresh[1].weight, plain_sd["1.weight"])


def test_parametrized_before_convert():
    """weight_norm (a parametrization) then convert: noise on the effective weight; strip, then removing
    the parametrization gives a plain layer again."""
    torch.manual_seed(0)
    layer = nn.Linear(4, 3)
    parametrizations.weight_norm(layer)
    x = torch.randn(2, 4)
    before = layer(x)
    plain = copy.deepcopy(layer)
    convert(layer)
    assert parametrize.is_parametrized(layer, "weight")
    with no_noise(layer):
        torch.testing.assert_close(layer(x), before)
    torch.manual_seed(5)
    out = layer(x)
    torch.manual_seed(5)
    w = fn.noisy_weight(plain.weight, layer.alpha_w, seed=pni_fast.draw_seed())
    torch.testing.assert_close(out, F.linear(x, w, plain.bias))
    out.sum().backward()
    assert layer.alpha_w.grad is not None and layer.parametrizations.weight.original0.grad is not None
    strip(layer)
    assert type(layer).__name__ == "ParametrizedLinear" and not hasattr(layer, "alpha_w")
    torch.testing.assert_close(layer(x), before)
    parametrize.remove_parametrizations(layer, "weight")
    assert type(layer) is nn.Linear
    torch.testing.assert_close(layer(x), before)


def test_parametrized_after_convert_and_strip():
    """A parametrization added to a converted layer: NoisyLinear keeps working; a layer converted in place
    refuses clearly (its forward would not see the noise); strip keeps the parametrization either way."""
    model = convert(nn.Sequential(nn.Linear(3, 3), nn.Conv1d(3, 3, 1)))
    for m in model:
        parametrizations.weight_norm(m)
    x = torch.randn(2, 3)
    assert not torch.equal(model[0](x), model[0](x))
    with pytest.raises(RuntimeError, match="parametrization registered after pni_fast.convert.*strip"):
        model[1](torch.randn(1, 3, 4))
    strip(model)
    assert [type(m).__bases__[0] for m in model] == [nn.Linear, nn.Conv1d]
    assert all(parametrize.is_parametrized(m) and not hasattr(m, "alpha_w") for m in model)
    assert torch.equal(model[0](x), model[0](x))
    for m in model:
        parametrize.remove_parametrizations(m, "weight")
    assert [type(m) for m in model] == [nn.Linear, nn.Conv1d]


def test_pruned_layer_gets_noise_on_the_pruned_weight():
    torch.manual_seed(0)
    conv = nn.Conv2d(2, 3, 3)
    prune.l1_unstructured(conv, "weight", amount=0.5)
    x = torch.randn(1, 2, 5, 5)
    before = conv(x)
    rep = convert(conv, report=True)
    assert rep.model is conv and "wrapped in place" in rep.converted[0][2]
    with no_noise(conv):
        assert torch.equal(conv(x), before)
    torch.manual_seed(2)
    out = conv(x)
    torch.manual_seed(2)
    w = fn.noisy_weight(conv.weight_orig * conv.weight_mask, conv.alpha_w, seed=pni_fast.draw_seed())
    torch.testing.assert_close(out, F.conv2d(x, w, conv.bias))
    strip(conv)
    assert type(conv) is nn.Conv2d and torch.equal(conv(x), before)
    convert(conv)
    prune.remove(conv, "weight")  # makes the pruned weight permanent: a Parameter again, still noisy
    assert isinstance(conv._parameters["weight"], nn.Parameter) and type(conv).__name__ == "NoisyConv2d"
    with no_noise(conv):
        assert torch.equal(conv(x), before)
    assert not torch.equal(conv(x), before)


def test_strip_refuses_a_layer_it_cannot_restore_before_changing_anything():
    class Custom(NoisyLinear):
        pass

    model = convert(nn.Sequential(nn.Conv1d(2, 2, 1), nn.Linear(2, 2)))
    model.append(Custom(2, 2))
    with pytest.raises(TypeError, match="cannot restore Custom"):
        strip(model)
    assert type(model[0]).__name__ == "NoisyConv1d" and isinstance(model[1], NoisyLinear), "nothing stripped"


def test_transformer_encoder_fast_path_is_warned_about():
    """nn.TransformerEncoderLayer's inference fast path reads linear1/linear2 weights directly (noise skipped):
    convert says so; with the fast path off the converted linears draw noise."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, dropout=0.0, batch_first=True)
    with pytest.warns(UserWarning, match=r"linear1 is converted, but .*set_fastpath_enabled\(False\)"):
        convert(layer, batch_noise=False)  # (a forward hook on the layer itself would disable the fast path)
    assert isinstance(layer.linear1, NoisyLinear) and isinstance(layer.linear2, NoisyLinear)
    layer.eval()
    x = torch.randn(2, 3, 8)
    with torch.no_grad():
        assert torch.equal(layer(x), layer(x)), "the fast path really skips the noise (what the warning says)"
        enabled = torch.backends.mha.get_fastpath_enabled()
        torch.backends.mha.set_fastpath_enabled(False)
        try:
            assert not torch.equal(layer(x), layer(x))
        finally:
            torch.backends.mha.set_fastpath_enabled(enabled)
