"""pni_fast: Parametric Noise Injection (Rakin, He, Fan, CVPR 2019) with fused kernels.

``w' = w + alpha * std(w) * z`` with ``z ~ N(0, 1)`` drawn inside one kernel pass from a
counter-based Philox stream, and an ``alpha`` gradient that regenerates the noise instead of
storing it. Importing never fails: without a compiled extension the pure-PyTorch backend runs
(same noise, slower) and says so once.
"""

from .ops.registry import available_backends, info
from .functional import inject_noise, noisy_weight, noisy_weights, randn
from .ops.sigma import weight_sigma
from .rng import default_rng_state, draw_seed, make_rng_state, manual_seed, own_generator
from .nn.layers import NoiseInjection, NoisyConv2d, NoisyLinear
from .nn.batching import batch_weight_noise
from .nn.control import no_noise, noise_enabled, set_noise
from .nn.convert import ConvertReport, convert, strip
from .nn.optim import param_groups
from . import models

__version__ = "0.1.0"

# The robustness toolkit (pni_fast.robust) loads on first use of one of these names, so that
# `import pni_fast` stays the core: the attacks, training and data code and their optional
# dependencies are not imported until asked for.
_ROBUST = {
    "robust": None,
    "attacks": "attacks",
    "data": "data",
    "evaluate": "evaluate",
    "train": "train",
    "fgsm": "fgsm",
    "pgd": "pgd",
    "eot_pgd": "eot_pgd",
    "carlini_wagner_l2": "carlini_wagner_l2",
    "autoattack_rand": "autoattack_rand",
    "square_attack": "square_attack",
    "AttackSpec": "AttackSpec",
    "TrainConfig": "TrainConfig",
}


def __getattr__(name: str):
    if name not in _ROBUST:
        raise AttributeError(f"module 'pni_fast' has no attribute {name!r}")
    import importlib

    try:
        robust = importlib.import_module(".robust", __name__)
    except ImportError as e:  # a core-only install: say which install brings the toolkit
        raise ImportError(
            f"pni_fast.{name} is part of the robustness toolkit, which needs the 'robust' extra ({e}): "
            "pip install 'pni_fast[robust]'"
        ) from e
    value = robust if _ROBUST[name] is None else getattr(robust, _ROBUST[name])
    globals()[name] = value  # later look-ups skip __getattr__
    return value


def __dir__() -> list:
    return sorted(set(globals()) | set(_ROBUST))


__all__ = [
    "__version__",
    "available_backends",
    "info",
    "noisy_weight",
    "noisy_weights",
    "inject_noise",
    "randn",
    "draw_seed",
    "make_rng_state",
    "manual_seed",
    "own_generator",
    "default_rng_state",
    "weight_sigma",
    "NoisyConv2d",
    "NoisyLinear",
    "NoiseInjection",
    "batch_weight_noise",
    "convert",
    "ConvertReport",
    "strip",
    "set_noise",
    "noise_enabled",
    "no_noise",
    "param_groups",
    "models",
    "robust",
    "attacks",
    "data",
    "evaluate",
    "train",
    "fgsm",
    "pgd",
    "eot_pgd",
    "carlini_wagner_l2",
    "autoattack_rand",
    "square_attack",
    "AttackSpec",
    "TrainConfig",
]
