"""Triton kernels of pni_fast, registered as ``torch.ops.pni_fast.*_triton`` on import.

Importing this package needs triton; on CPU tensors the kernels run only when
``TRITON_INTERPRET=1`` was set before triton was first imported.
"""

from .ops import (
    INTERPRETED,
    noise_triton,
    perturb_alpha_grad_multi_triton,
    perturb_alpha_grad_triton,
    perturb_multi_triton,
    perturb_triton,
)

__all__ = [
    "INTERPRETED",
    "noise_triton",
    "perturb_triton",
    "perturb_alpha_grad_triton",
    "perturb_multi_triton",
    "perturb_alpha_grad_multi_triton",
]
