"""Models: CIFAR ResNets in the original PNI layout (plain or with PNI), a loader for original PNI checkpoints,
the demo's small digits CNN, and `build_model` (a model from a checkpoint's ``model_spec``)."""

from .digits_cnn import DigitsCNN
from .original_pni import infer_depth, load_pni_checkpoint, map_pni_state_dict
from .resnet_cifar import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    BasicBlock,
    CifarResNet,
    DownsampleA,
    Normalize,
    cifar_resnet,
    resnet20,
    resnet32,
    resnet44,
    resnet56,
)
from .spec import build_model

__all__ = [
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "BasicBlock",
    "CifarResNet",
    "DownsampleA",
    "Normalize",
    "cifar_resnet",
    "resnet20",
    "resnet32",
    "resnet44",
    "resnet56",
    "load_pni_checkpoint",
    "map_pni_state_dict",
    "infer_depth",
    "DigitsCNN",
    "build_model",
]
