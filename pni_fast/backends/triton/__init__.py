"""Triton backend of pni_fast, registered as PyTorch ops (``torch.ops.pni_fast.*_triton``).

Importing this package registers all five ops; they live in single_ops.py (``triton_op``s,
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

Autograd is attached by :mod:`pni_fast.ops.dispatch` on first use, not here. Importing this package needs
triton; on CPU tensors the kernels run only when ``TRITON_INTERPRET=1`` was set before triton was first
imported.

Notes:
* Noise: the compiled kernels evaluate tl.randn4x's formula on tl.randint4x words with libdevice
  logf/cosf/sinf and an IEEE sqrt (tl.sqrt lowers to ``sqrt.approx.ftz`` on sm_90), so z matches
  the CUDA C++ backend; under the CPU interpreter they call tl.randn4x itself.
* The list ops: one forward launch and two alpha-gradient launches per (dtype, alpha dtype, sigma
  dtype) group, and they refuse CUDA graph capture (list_ops.py says why).
"""

from __future__ import annotations

from . import list_ops, single_ops  # noqa: F401  (importing them registers the ops)

__all__: list[str] = []  # the ops are torch.ops.pni_fast.*_triton
