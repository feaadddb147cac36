"""Triton kernels of pni_fast: noise, perturb (forward) and the alpha gradient (backward).

This module gathers them for the ops (single_ops.py, list_ops.py), compile_check.py and the
tests; each concept lives in its own file:

* noise_kernels.py: the noise every kernel draws (Philox counter ``offset + i // 4``, output
  ``i % 4``; Box-Muller; ``rng_state``) and ``_noise_kernel``;
* perturb_kernels.py: ``_perturb_fwd_kernel``, out = v + alpha * sigma * z in one pass;
* alpha_grad_kernels.py: the deterministic two-stage alpha gradient (``_perturb_bwd_kernel``,
  ``_alpha_grad_reduce_kernel``) and its segment modes ``SEG_*``;
* list_kernels.py: the ``*_multi_*`` kernels, one launch for a list of tensors.

Specialization: Triton compiles one variant per integer argument that equals 1 or is divisible
by 16; ``seed`` and ``offset`` change from call to call, so every seeded kernel lists them in
``do_not_specialize`` (one compiled kernel for every drawn seed). Sizes (n, inner, ...) keep the
specialization: they are fixed per layer and n % 16 == 0 lets the masked accesses vectorize.
"""

from __future__ import annotations

# ``name as name``: explicit re-exports (the ops, compile_check.py and the tests use K.<name>).
from .alpha_grad_kernels import SEG_ELEM as SEG_ELEM
from .alpha_grad_kernels import SEG_ONE as SEG_ONE
from .alpha_grad_kernels import SEG_SCAN as SEG_SCAN
from .alpha_grad_kernels import SEG_TWO as SEG_TWO
from .alpha_grad_kernels import _alpha_grad_reduce_kernel as _alpha_grad_reduce_kernel
from .alpha_grad_kernels import _perturb_bwd_kernel as _perturb_bwd_kernel
from .list_kernels import _alpha_grad_multi_reduce_kernel as _alpha_grad_multi_reduce_kernel
from .list_kernels import _perturb_multi_bwd_kernel as _perturb_multi_bwd_kernel
from .list_kernels import _perturb_multi_fwd_kernel as _perturb_multi_fwd_kernel
from .noise_kernels import _noise_kernel as _noise_kernel
from .perturb_kernels import _perturb_fwd_kernel as _perturb_fwd_kernel

__all__: list[str] = []  # private module: the ops live in pni_fast.triton.ops
