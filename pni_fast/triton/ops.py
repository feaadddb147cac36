"""Triton backend of pni_fast, registered as PyTorch ops (``torch.ops.pni_fast.*_triton``).

Importing this module registers all five ops; they live in single_ops.py (``triton_op``s,
traceable by ``torch.compile``) and list_ops.py (opaque ``custom_op``s launched through a packed
pointer table), and launch with what launch_config.py holds (block size, alpha-gradient plans).

Signatures are those of docs/ops.md (op contract v2), suffixed ``_triton``:

* ``noise_triton(like, seed, offset, rng_state=None) -> Tensor``
* ``perturb_triton(v, alpha, sigma, seed, offset, inner, rng_state=None) -> Tensor``
* ``perturb_alpha_grad_triton(grad, alpha, sigma, seed, offset, inner, rng_state=None) -> Tensor``
* ``perturb_multi_triton(vs, alphas, sigmas, seeds, offsets, inners, rng_state=None) -> Tensor[]``
* ``perturb_alpha_grad_multi_triton(grads, alphas, sigmas, seeds, offsets, inners, rng_state=None)``

``rng_state`` (int64 [2] on the op's device: seed, counter base) is read by the kernels from
device memory: no host sync, so on CUDA its values are not range-checked (they are the bits of a
uint64 seed and counter); on CPU (interpreter) they get the usual seed/offset checks. alpha may
be float32 with float16/bfloat16 tensors; the alpha gradient has alpha's dtype and is
accumulated in float32 (float64 for float64). Every output is a fresh tensor.

Autograd is registered by ``pni_fast.functional``, not here.

Notes:
* Noise: the compiled kernels evaluate tl.randn4x's formula on tl.randint4x words with libdevice
  logf/cosf/sinf and an IEEE sqrt (tl.sqrt lowers to ``sqrt.approx.ftz`` on sm_90), so z matches
  the CUDA C++ backend; under the CPU interpreter they call tl.randn4x itself.
* The list ops: one forward launch and two alpha-gradient launches per (dtype, alpha dtype, sigma
  dtype) group, and they refuse CUDA graph capture (list_ops.py says why).
"""

from __future__ import annotations

# ``name as name``: explicit re-exports of the names this module has always offered.
from .launch_config import BLOCK as BLOCK
from .launch_config import INTERPRETED as INTERPRETED
from .launch_config import NUM_WARPS as NUM_WARPS
from .launch_config import PRECISE as PRECISE
from .list_ops import perturb_alpha_grad_multi_triton, perturb_multi_triton
from .single_ops import noise_triton, perturb_alpha_grad_triton, perturb_triton

__all__ = [
    "noise_triton",
    "perturb_triton",
    "perturb_alpha_grad_triton",
    "perturb_multi_triton",
    "perturb_alpha_grad_multi_triton",
    "INTERPRETED",
]
