"""CIFAR ResNets in the original PNI layout, plain or with PNI, and a loader for original PNI checkpoints."""
from .pni_checkpoint import infer_depth, load_pni_checkpoint, map_pni_state_dict
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

__all__ = [
    "CIFAR10_MEAN", "CIFAR10_STD", "BasicBlock", "CifarResNet", "DownsampleA", "Normalize", "cifar_resnet",
    "resnet20", "resnet32", "resnet44", "resnet56", "load_pni_checkpoint", "map_pni_state_dict", "infer_depth",
]
