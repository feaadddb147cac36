"""CIFAR ResNets: layout, parameter counts, option-A shortcut, and loading original-PNI checkpoints."""

import contextlib
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from pni_fast.models import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    CifarResNet,
    DownsampleA,
    load_pni_checkpoint,
    resnet20,
    resnet32,
    resnet44,
    resnet56,
)
from pni_fast.nn.control import no_noise
from pni_fast.nn.layers import NoisyConv2d, NoisyLinear

warnings.filterwarnings("ignore", message="pni_fast: no fused kernel")


def _count(model):
    return sum(p.numel() for p in model.parameters())


def test_parameter_counts():
    """ResNet-20, 10 classes: stem conv 3*16*9 = 432 + BN 32; stage 1: 6 convs 16*16*9 = 13,824 + 6 BN 192;
    stage 2: 16*32*9 + 5*32*32*9 = 50,688 + 384; stage 3: 32*64*9 + 5*64*64*9 = 202,752 + 768;
    classifier 64*10 + 10 = 650: 269,722 in all. The option-A shortcut has no parameters and the
    normalisation constants are buffers, so nothing else counts."""
    assert _count(resnet20()) == 269_722
    assert _count(resnet32()) == 464_154
    assert _count(resnet44()) == 658_586
    assert _count(resnet56()) == 853_018
    assert _count(resnet20(num_classes=100)) == 269_722 + 90 * 65
    # PNI adds one alpha per layer (layerwise: 19 convs + classifier) or one per output channel
    assert _count(resnet20(pni="layerwise")) == 269_722 + 20
    out_channels = 16 + 6 * 16 + 6 * 32 + 6 * 64 + 10
    assert _count(resnet20(pni="channelwise")) == 269_722 + out_channels
    assert _count(resnet20(pni="elementwise")) == 269_722 + (269_722 - 650 - 2 * (16 + 6 * 16 + 6 * 32 + 6 * 64) + 640)


def test_layout_names_and_noisy_layers():
    keys = set(resnet20().state_dict())
    for k in (
        "normalize.mean",
        "normalize.std",
        "conv_1_3x3.weight",
        "bn_1.running_mean",
        "stage_1.0.conv_a.weight",
        "stage_3.2.bn_b.bias",
        "classifier.weight",
        "classifier.bias",
    ):
        assert k in keys
    assert not any(k.startswith("stage_4") or k.startswith("stage_1.3") for k in keys)
    m = resnet20(pni="channelwise", noise="both")
    noisy = [n for n, x in m.named_modules() if isinstance(x, (NoisyConv2d, NoisyLinear))]
    assert len(noisy) == 20 and noisy[0] == "conv_1_3x3" and noisy[-1] == "classifier"
    assert m.stage_2[0].conv_a.alpha_w.shape == (32, 1, 1, 1) and m.stage_2[0].conv_a.alpha_i.shape == (16,)
    assert m.normalize.mean.shape == (3, 1, 1) and not any("normalize" in n for n, _ in m.named_parameters())


def test_option_a_shortcut_appends_zero_channels_after_input():
    x = torch.randn(2, 16, 8, 8)
    out = DownsampleA(16, 32)(x)
    assert out.shape == (2, 32, 4, 4)
    torch.testing.assert_close(out[:, :16], x[:, :, ::2, ::2])
    assert torch.all(out[:, 16:] == 0)


def test_forward_backward_with_noise_and_inputs_in_unit_range():
    torch.manual_seed(0)
    model = resnet20(pni="layerwise")
    x = torch.rand(2, 3, 16, 16)  # global average pooling: any size works; 32x32 is CIFAR's
    out = model(x)
    assert out.shape == (2, 10)
    out.logsumexp(1).sum().backward()
    assert model.classifier.alpha_w.grad is not None and model.conv_1_3x3.weight.grad is not None
    model.eval()
    assert not torch.equal(model(x), model(x)), "noise stays on in eval"
    with no_noise(model):
        torch.testing.assert_close(model(x), model(x))
    # normalisation happens inside: a plain network on pre-normalised input gives the same logits
    mean = torch.tensor(CIFAR10_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR10_STD).view(1, 3, 1, 1)
    with no_noise(model):
        y = F.relu(model.bn_1(model.conv_1_3x3((x - mean) / std)))
        y = model.stage_3(model.stage_2(model.stage_1(y)))
        y = model.classifier(y.mean((2, 3)))
        torch.testing.assert_close(model(x), y)


def test_bad_model_arguments():
    with pytest.raises(ValueError, match="depth must be 6n\\+2"):
        CifarResNet(21)
    with pytest.raises(ValueError, match="num_classes must be a positive int"):
        resnet20(num_classes=0)
    with pytest.raises(ValueError, match="pni must be"):
        resnet20(pni="layer")
    with pytest.raises(ValueError, match="noise must be"):
        resnet20(pni="layerwise", noise="act")


# ----------------------------------------------------------------------------- original-layout checkpoints
# The original PNI code's layout, written independently of pni_fast.models: Sequential(normalize, net),
# noisy layers hold `alpha_w`, shortcut = AvgPool2d(1, 2) then zeros concatenated after the channels.
class _OrigNormalize(nn.Module):
    def __init__(self, mean, std):
        super().__init__()
        self.mean = nn.Parameter(torch.tensor(mean).view(3, 1, 1), requires_grad=False)
        self.std = nn.Parameter(torch.tensor(std).view(3, 1, 1), requires_grad=False)

    def forward(self, x):
        return x.sub(self.mean).div(self.std)


def _alpha_shape(w, pni):
    return {"layerwise": (1,), "channelwise": (w.shape[0],) + (1,) * (w.dim() - 1), "elementwise": w.shape}[pni]


class _OrigConv(nn.Conv2d):
    def __init__(self, *args, pni=None, **kwargs):
        super().__init__(*args, **kwargs)
        if pni:
            self.alpha_w = nn.Parameter(torch.rand(_alpha_shape(self.weight, pni)))


class _OrigLinear(nn.Linear):
    def __init__(self, *args, pni=None, **kwargs):
        super().__init__(*args, **kwargs)
        if pni:
            self.alpha_w = nn.Parameter(torch.rand(_alpha_shape(self.weight, pni)))


class _OrigDownsampleA(nn.Module):
    def __init__(self):
        super().__init__()
        self.avg = nn.AvgPool2d(kernel_size=1, stride=2)

    def forward(self, x):
        x = self.avg(x)
        return torch.cat((x, x.mul(0)), 1)


class _OrigBlock(nn.Module):
    def __init__(self, cin, cout, stride, pni):
        super().__init__()
        self.conv_a = _OrigConv(cin, cout, 3, stride, 1, bias=False, pni=pni)
        self.bn_a = nn.BatchNorm2d(cout)
        self.conv_b = _OrigConv(cout, cout, 3, 1, 1, bias=False, pni=pni)
        self.bn_b = nn.BatchNorm2d(cout)
        self.downsample = _OrigDownsampleA() if stride != 1 or cin != cout else None

    def forward(self, x):
        b = F.relu(self.bn_a(self.conv_a(x)))
        b = self.bn_b(self.conv_b(b))
        r = x if self.downsample is None else self.downsample(x)
        return F.relu(r + b)


class _OrigNet(nn.Module):
    def __init__(self, depth, num_classes, pni):
        super().__init__()
        n = (depth - 2) // 6
        self.conv_1_3x3 = _OrigConv(3, 16, 3, 1, 1, bias=False, pni=pni)
        self.bn_1 = nn.BatchNorm2d(16)
        self.stage_1 = nn.Sequential(*[_OrigBlock(16, 16, 1, pni) for _ in range(n)])
        self.stage_2 = nn.Sequential(_OrigBlock(16, 32, 2, pni), *[_OrigBlock(32, 32, 1, pni) for _ in range(n - 1)])
        self.stage_3 = nn.Sequential(_OrigBlock(32, 64, 2, pni), *[_OrigBlock(64, 64, 1, pni) for _ in range(n - 1)])
        self.avgpool = nn.AvgPool2d(8)
        self.classifier = _OrigLinear(64, num_classes, pni=pni)

    def forward(self, x):
        x = F.relu(self.bn_1(self.conv_1_3x3(x)))
        x = self.avgpool(self.stage_3(self.stage_2(self.stage_1(x))))
        return self.classifier(x.view(x.size(0), -1))


def _original(depth=20, num_classes=10, pni="layerwise", seed=0):
    torch.manual_seed(seed)
    mean = [0.5, 0.45, 0.4]
    std = [0.25, 0.24, 0.26]
    model = nn.Sequential(_OrigNormalize(mean, std), _OrigNet(depth, num_classes, pni)).eval()
    with torch.no_grad():  # BN that is not the identity, so a mis-mapped BN shows up
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 2.0)
    return model


@pytest.mark.parametrize("pni", [None, "layerwise", "channelwise", "elementwise"])
def test_load_original_checkpoint_reproduces_outputs(pni):
    orig = _original(pni=pni)
    sd = orig.state_dict()
    assert "0.mean" in sd and "1.stage_2.0.conv_a.weight" in sd and "1.classifier.bias" in sd
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        want = orig(x)
    model = load_pni_checkpoint("resnet20", sd)
    model.eval()
    quiet = no_noise if pni else (lambda m: contextlib.nullcontext())
    with quiet(model):
        torch.testing.assert_close(model(x), want, rtol=1e-5, atol=1e-5)
    if pni is None:
        assert not any(isinstance(m, (NoisyConv2d, NoisyLinear)) for m in model.modules())
    else:
        assert model.stage_3[2].conv_b.pni == pni
        torch.testing.assert_close(model.stage_3[2].conv_b.alpha_w, orig[1].stage_3[2].conv_b.alpha_w)
    torch.testing.assert_close(model.normalize.std, orig[0].std)
    # into a model built by the user with the same mode, with DataParallel/"state_dict" wrappers, depth inferred
    target = resnet20(pni=pni) if pni else resnet20()
    wrapped = {"epoch": 3, "state_dict": {"module." + k: v for k, v in sd.items()}}
    assert load_pni_checkpoint(target, wrapped) is target
    target.eval()
    with quiet(target):
        torch.testing.assert_close(target(x), want, rtol=1e-5, atol=1e-5)
    assert isinstance(load_pni_checkpoint(None, sd), CifarResNet)


def test_load_original_checkpoint_other_depth_classes_and_path(tmp_path):
    orig = _original(depth=32, num_classes=100, pni="channelwise", seed=1)
    path = tmp_path / "ckpt.pth"
    torch.save({"state_dict": orig.state_dict()}, path)
    model = load_pni_checkpoint(None, path).eval()
    assert model.depth == 32 and model.num_classes == 100
    x = torch.rand(2, 3, 32, 32)
    with no_noise(model), torch.no_grad():
        torch.testing.assert_close(model(x), orig(x), rtol=1e-5, atol=1e-5)
    bad = tmp_path / "bad.pth"
    torch.save({"state_dict": orig.state_dict(), "recorder": _OrigDownsampleA()}, bad)
    with pytest.raises(ValueError, match="weights_only=False"):
        load_pni_checkpoint(None, bad)


def test_load_checkpoint_errors():
    sd = _original(pni="channelwise").state_dict()
    with pytest.raises(
        ValueError,
        match=r"alpha_w of 'conv_1_3x3' has shape \[16, 1, 1, 1\] \(pni='channelwise'\).*"
        r"pni='layerwise'",
    ):
        load_pni_checkpoint(resnet20(pni="layerwise"), sd)
    with pytest.raises(ValueError, match="has weight noise on 'conv_1_3x3'.*has none"):
        load_pni_checkpoint(resnet20(), sd)
    with pytest.raises(ValueError, match="not a resnet32"):
        load_pni_checkpoint("resnet32", sd)
    with pytest.raises(ValueError, match="model_or_arch must be one of"):
        load_pni_checkpoint("resnet18", sd)
    missing = {k: v for k, v in sd.items() if k != "1.stage_2.0.bn_a.running_var"}
    with pytest.raises(ValueError, match=r"missing from the checkpoint: 1\.stage_2\.0\.bn_a\.running_var"):
        load_pni_checkpoint("resnet20", missing)
    partial = load_pni_checkpoint("resnet20", missing, strict=False)
    torch.testing.assert_close(partial.stage_2[0].bn_a.running_mean, sd["1.stage_2.0.bn_a.running_mean"])
    extra = dict(sd, **{"1.stage_1.0.extra.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="not in the model: stage_1.0.extra.weight"):
        load_pni_checkpoint("resnet20", extra)
    odd = dict(sd, **{"1.conv_1_3x3.alpha_w": torch.zeros(4, 3)})
    with pytest.raises(ValueError, match="fits no PNI mode"):
        load_pni_checkpoint("resnet20", odd)
    with pytest.raises(ValueError, match="unexpected key 'fc.weight'"):
        load_pni_checkpoint("resnet20", {"fc.weight": torch.zeros(1)})
    with pytest.raises(TypeError, match="state_dict must be a mapping or a path"):
        load_pni_checkpoint("resnet20", 3)
    nb = {k: v for k, v in sd.items() if not k.endswith("num_batches_tracked")}
    load_pni_checkpoint("resnet20", nb)  # very old checkpoints lack num_batches_tracked: fine


# --------------------------------------------------------------------------- #
# the demo's digits CNN and build_model (a model from a checkpoint's model_spec)
# --------------------------------------------------------------------------- #
def test_digits_cnn_shapes_and_width_check():
    from pni_fast.models import DigitsCNN

    model = DigitsCNN(1, 10, 4)
    assert model(torch.rand(3, 1, 8, 8)).shape == (3, 10)
    assert DigitsCNN(3, 7, 2)(torch.rand(2, 3, 32, 32)).shape == (2, 7)
    with pytest.raises(ValueError, match="width must be >= 1"):
        DigitsCNN(width=0)


def test_build_model_rebuilds_every_arch_and_refuses_others():
    from pni_fast.models import DigitsCNN, build_model, resnet20

    plain = build_model({"arch": "digits_cnn", "width": 4})
    assert isinstance(plain, DigitsCNN) and not any(isinstance(m, (NoisyConv2d, NoisyLinear)) for m in plain.modules())
    torch.manual_seed(0)
    noisy = build_model({"arch": "digits_cnn", "width": 4, "pni": "channelwise", "in_channels": 3, "num_classes": 5})
    assert sum(isinstance(m, (NoisyConv2d, NoisyLinear)) for m in noisy.modules()) == 4  # 3 convs + classifier
    assert noisy(torch.rand(2, 3, 8, 8)).shape == (2, 5)
    rn = build_model({"arch": "resnet20", "pni": "layerwise", "num_classes": 10})
    assert sorted(rn.state_dict()) == sorted(resnet20(pni="layerwise").state_dict())
    with pytest.raises(ValueError, match="model_spec arch must be one of"):
        build_model({"arch": "vgg16"})
