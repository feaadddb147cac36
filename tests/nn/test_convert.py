"""convert()/strip() on arbitrary models, param_groups, and torch.compile of converted models."""

import copy
import warnings

import pytest
import torch
import torch.nn as nn

from pni_fast.nn.control import no_noise
from pni_fast.nn.convert import convert, noisy_from, strip
from pni_fast.nn.layers import NoiseInjection, NoisyConv2d, NoisyLinear, alpha_parameters
from pni_fast.nn.optim import param_groups

warnings.filterwarnings("ignore", message="pni_fast: no fused kernel")


# A torchvision-style ResNet (names conv1/bn1/layerK/downsample/fc), written here: torchvision
# is not a dependency.
class TVBlock(nn.Module):
    def __init__(self, cin, cout, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        idt = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + idt)


class TVResNet(nn.Module):
    def __init__(self, num_classes=5):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.layer1 = nn.Sequential(TVBlock(8, 8), TVBlock(8, 8))
        self.layer2 = nn.Sequential(TVBlock(8, 16, 2), TVBlock(16, 16))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer2(self.layer1(x))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def _layers(model, types):
    return [n for n, m in model.named_modules() if isinstance(m, types)]


def test_convert_torchvision_style_resnet_keeps_weights_and_outputs():
    torch.manual_seed(0)
    model = TVResNet().double().eval()
    x = torch.rand(2, 3, 32, 32, dtype=torch.float64)
    before = model(x)
    params_before = dict(model.named_parameters())
    plain_names = _layers(model, (nn.Conv2d, nn.Linear))
    assert convert(model, pni="channelwise") is model
    assert _layers(model, (NoisyConv2d, NoisyLinear)) == plain_names
    for name, p in model.named_parameters():
        if "alpha" in name:
            assert p.dtype == torch.float64 and torch.all(p == 0.25)
        else:
            assert p is params_before[name], f"{name} must be the same Parameter object"
    assert all(not m.training for m in model.modules()), "training mode is kept"
    assert model.fc.alpha_w.shape == (5, 1) and model.layer2[0].downsample[0].alpha_w.shape == (16, 1, 1, 1)
    with no_noise(model):
        torch.testing.assert_close(model(x), before)
    assert not torch.allclose(model(x), before)
    out = model(x)  # eval mode: BN running stats stay as they were
    out.sum().backward()
    assert all(a.grad is not None for a in alpha_parameters(model))
    assert strip(model) is model
    assert _layers(model, (NoisyConv2d, NoisyLinear)) == []
    assert dict(model.named_parameters()).keys() == params_before.keys()
    assert all(p is params_before[n] for n, p in model.named_parameters())
    assert type(model.fc) is nn.Linear and type(model.conv1) is nn.Conv2d
    torch.testing.assert_close(model.eval()(x), before)


def test_nested_containers_and_shared_modules():
    shared = nn.Linear(4, 4)
    model = nn.Sequential(
        shared,
        nn.ModuleDict({"a": nn.Linear(4, 4), "b": nn.Sequential(nn.Conv2d(1, 1, 1))}),
        nn.ModuleList([shared, nn.ReLU()]),
    )
    n_params = sum(p.numel() for p in model.parameters())
    convert(model, noise="both")
    assert isinstance(model[0], NoisyLinear) and model[0] is model[2][0], "shared module converted once, still shared"
    assert isinstance(model[1]["a"], NoisyLinear) and isinstance(model[1]["b"][0], NoisyConv2d)
    assert sum(p.numel() for p in model.parameters()) == n_params + 3 * 2  # alpha_w + alpha_i per layer, once
    strip(model)
    assert type(model[0]) is nn.Linear and model[0] is model[2][0]


def test_skip_layers_and_bare_layer():
    model = TVResNet()
    convert(model, skip=["conv1", "fc", "layer2.1"])
    assert type(model.conv1) is nn.Conv2d and type(model.fc) is nn.Linear
    assert type(model.layer2[1].conv1) is nn.Conv2d and isinstance(model.layer2[0].conv1, NoisyConv2d)
    assert isinstance(model.layer1[0].conv1, NoisyConv2d), "'conv1' must not match 'layer1.0.conv1'"
    model = TVResNet()
    convert(model, skip=lambda name, m: isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1))
    assert type(model.layer2[0].downsample[0]) is nn.Conv2d and isinstance(model.layer2[0].conv1, NoisyConv2d)
    model = TVResNet()
    convert(model, layers=(nn.Linear,), pni="elementwise")
    assert isinstance(model.fc, NoisyLinear) and type(model.conv1) is nn.Conv2d
    assert model.fc.alpha_w.shape == model.fc.weight.shape
    shared = nn.Linear(2, 2)
    model = nn.Sequential(shared, nn.Sequential(shared))
    with pytest.warns(UserWarning, match="no layer"):
        convert(model, skip="1")  # a shared module is skipped when any of its names is
    assert type(model[0]) is nn.Linear
    lin = nn.Linear(3, 2)
    new = convert(lin)
    assert isinstance(new, NoisyLinear) and new.weight is lin.weight
    assert type(strip(new)) is nn.Linear


def test_hooks_attributes_and_subclasses_survive():
    calls = []
    model = nn.Sequential(nn.Linear(3, 3), nn.MultiheadAttention(4, 2))
    handle = model[0].register_forward_hook(lambda m, i, o: calls.append(type(m).__name__))
    out_proj = model[1].out_proj
    with pytest.warns(UserWarning, match=r"left without noise: 1 \(MultiheadAttention\).*1.out_proj"):
        convert(model)
    model[0](torch.randn(1, 3))
    assert calls == ["NoisyLinear"]
    handle.remove()  # the user's handle still works on the swapped layer
    model[0](torch.randn(1, 3))
    assert calls == ["NoisyLinear"]
    assert model[1].out_proj is out_proj and type(out_proj) is nn.modules.linear.NonDynamicallyQuantizableLinear

    class MyLinear(nn.Linear):
        pass

    model = nn.Sequential(MyLinear(2, 2))
    convert(model)  # subclasses are converted in place and keep their class
    assert isinstance(model[0], MyLinear) and model[0].alpha_w.shape == (1,)
    with pytest.raises(TypeError, match="exactly nn.Conv2d or nn.Linear, got the subclass MyLinear"):
        noisy_from(MyLinear(2, 2))


def test_convert_keeps_device_dtype_and_is_idempotent():
    model = nn.Sequential(
        nn.Conv2d(2, 3, 3, padding_mode="reflect", padding=1, groups=1, dilation=1), nn.Flatten(), nn.LazyLinear(4)
    )
    model(torch.randn(1, 2, 4, 4))  # initialises the lazy layer (it becomes a plain nn.Linear)
    model.to(torch.float64)
    convert(model, pni="elementwise", alpha_init=0.1)
    assert model[0].padding_mode == "reflect" and model[0].alpha_w.dtype == torch.float64
    assert isinstance(model[2], NoisyLinear) and torch.all(model[2].alpha_w == 0.1)
    alphas = [id(a) for a in alpha_parameters(model)]
    with pytest.warns(UserWarning, match="already noisy"):
        convert(model)
    assert [id(a) for a in alpha_parameters(model)] == alphas
    assert str(model[0].alpha_w.device) == "cpu"


def test_convert_bad_input_and_warnings():
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        convert("resnet")
    with pytest.raises(ValueError, match="pni must be"):
        convert(nn.Linear(2, 2), pni="channel")
    with pytest.raises(ValueError, match="noise must be"):
        convert(nn.Linear(2, 2), noise="act")
    with pytest.raises(ValueError, match="alpha_init must be a finite number >= 0"):
        convert(nn.Linear(2, 2), alpha_init=-1)
    with pytest.raises(TypeError, match="layers may contain only nn.Linear, nn.Conv1d/2d/3d"):
        convert(nn.Linear(2, 2), layers=(nn.BatchNorm2d,))
    with pytest.raises(TypeError, match="skip must be"):
        convert(nn.Linear(2, 2), skip=[3])
    with pytest.warns(UserWarning, match=r"no layer of type Linear, Conv\*d, ConvTranspose\*d was converted"):
        convert(nn.Sequential(nn.ReLU()))
    with pytest.warns(UserWarning, match="nothing to strip"):
        strip(nn.Sequential(nn.ReLU()))
    with pytest.warns(UserWarning, match="no layer of type Linear was converted"):
        convert(nn.Sequential(nn.Conv2d(1, 1, 1)), layers=nn.Linear)


@pytest.mark.parametrize("flag", ["report", "verbose", "batch_noise"])
@pytest.mark.parametrize("value", ["no", "yes", 1, 0, None])
def test_convert_refuses_non_bool_flags(flag, value):
    """``batch_noise="no"`` is truthy: it would install batching. Every flag must be a bool, and the
    check comes before any change to the model."""
    model = nn.Sequential(nn.Linear(2, 2))
    with pytest.raises(TypeError, match=f"convert: {flag} must be True or False, got {value!r}"):
        convert(model, **{flag: value})
    assert type(model[0]) is nn.Linear and not model._forward_pre_hooks
    convert(model, **{flag: False})  # a bool passes


def test_strip_noise_injection_and_deepcopy_of_converted():
    model = nn.Sequential(nn.Conv2d(1, 2, 3), NoiseInjection(2, pni="channelwise"))
    convert(model)
    clone = copy.deepcopy(model)
    assert clone[0] is not model[0] and isinstance(clone[0], NoisyConv2d)
    strip(model)
    assert isinstance(model[1], nn.Identity) and type(model[0]) is nn.Conv2d


def test_param_groups_exclude_only_alphas():
    model = convert(TVResNet(), pni="channelwise", noise="both")
    model.layer1[0].bn1.weight.requires_grad_(False)
    groups = param_groups(model, 5e-4, lr=0.1)
    assert [g["weight_decay"] for g in groups] == [5e-4, 0.0] and all(g["lr"] == 0.1 for g in groups)
    alphas = {id(a) for a in alpha_parameters(model)}
    assert {id(p) for p in groups[1]["params"]} == alphas and len(
        alphas
    ) == 2 * 11  # 10 convs + fc, alpha_w and alpha_i each
    others = {id(p) for p in model.parameters() if p.requires_grad and id(p) not in alphas}
    assert {id(p) for p in groups[0]["params"]} == others
    opt = torch.optim.SGD(groups, lr=0.1, weight_decay=1.0)
    for a in alpha_parameters(model):
        a.grad = torch.zeros_like(a)
    for p in groups[0]["params"]:
        p.grad = torch.zeros_like(p)
    before = [p.detach().clone() for p in groups[0]["params"][:1]]
    opt.step()
    assert all(torch.all(a == 0.25) for a in alpha_parameters(model)), "alphas must not decay"
    assert not torch.equal(groups[0]["params"][0], before[0]), "weights do decay"
    assert len(param_groups(nn.Linear(2, 2), 0.1)) == 1
    with pytest.raises(ValueError, match="weight_decay must be a finite number >= 0"):
        param_groups(model, -1.0)
    with pytest.raises(TypeError, match="weight_decay must be a float"):
        param_groups(model, "0.1")


@pytest.mark.parametrize(
    "backend",
    [
        pytest.param("torch", marks=pytest.mark.slow),  # the same tracing path, ~13 s: CI's slow tier
        None,  # default backend: the C++ ops take a `SymInt seed`, so the drawn seed traces
    ],
)
def test_compile_fullgraph_converted_resnet20(backend, monkeypatch):
    """Dynamo traces a converted ResNet-20 without graph breaks (aot_eager: fake kernels + autograd
    without the slow CPU code generation), draws fresh noise per call with the same seeds as eager,
    and backward reaches every alpha."""
    from pni_fast.models import resnet20

    if backend is None:
        monkeypatch.delenv("PNI_FAST_BACKEND", raising=False)
    else:
        monkeypatch.setenv("PNI_FAST_BACKEND", backend)
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = resnet20(pni="channelwise", noise="both").eval()
    x = torch.rand(2, 3, 32, 32)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    torch.manual_seed(1)
    out = compiled(x)
    assert out.shape == (2, 10) and torch.isfinite(out).all()
    assert not torch.equal(compiled(x), out), "each compiled call must draw fresh noise"
    out.square().sum().backward()
    grads = [a.grad.clone() for a in alpha_parameters(model)]
    model.zero_grad()
    torch.manual_seed(1)
    eager = model(x)
    torch.testing.assert_close(out, eager)
    eager.square().sum().backward()
    for g, a in zip(grads, alpha_parameters(model)):
        torch.testing.assert_close(g, a.grad)


def test_param_groups_recognise_reference_layer_alphas():
    """Alphas of PNI layers defined elsewhere (original naming alpha_w) are kept out of decay too."""
    from pni_fast.reference import ReferenceNoisyConv2d

    model = nn.Sequential(ReferenceNoisyConv2d(3, 4, 3), nn.Flatten())
    groups = param_groups(model, 0.1)
    no_decay = [p for g in groups if g["weight_decay"] == 0 for p in g["params"]]
    assert len(no_decay) == 1 and no_decay[0] is model[0].alpha_w
