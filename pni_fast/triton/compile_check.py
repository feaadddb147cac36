"""Compile every Triton kernel of pni_fast for an NVIDIA target without a GPU.

Triton ships its own ptxas and libdevice, so ``triton.compile`` can lower the kernels to PTX
and a cubin on a CPU-only machine. CI uses this (tests/test_triton.py) to catch errors that the
interpreter cannot see (types, layouts, loops, pointer casts) and to check that the noise path
uses no approximate transcendental instruction.

Run as ``python -m pni_fast.triton.compile_check [sm]`` with ``TRITON_INTERPRET`` unset.
"""
from __future__ import annotations

import os
import re
import sys

__all__ = ["APPROX_INSTRUCTIONS", "compile_all", "main"]

# PTX instructions that would break the 2e-6 agreement of z with the other backends.
APPROX_INSTRUCTIONS = re.compile(r"\b(lg2|sin|cos|sqrt|rsqrt)\.approx")


def _configs():
    """(kernel, signature, constexprs) covering every code path of kernels.py."""
    import triton.language as tl

    from . import kernels as K

    # triton types an int argument i32, u32 or i64 by its value: cover each for seed and offset
    out = [(K._noise_kernel, {"out_ptr": "*fp32", "n": "i32", "seed": t, "offset": t}, {"BLOCK": 1024, "PRECISE": True})
           for t in ("i32", "u32", "i64")]
    for dt, f64 in (("fp32", False), ("fp16", False), ("fp64", True)):  # bf16 lowers like fp16
        for layerwise in (True, False):
            sig = {"v_ptr": f"*{dt}", "out_ptr": f"*{dt}", "alpha_ptr": f"*{dt}", "sigma_ptr": "*fp32",
                   "n": "i32", "n_alpha": "i32", "inner": "i32", "seed": "i64", "offset": "i64"}
            out.append((K._perturb_fwd_kernel, sig, {"BLOCK": 1024, "LAYERWISE": layerwise, "IS_F64": f64,
                                                     "INDEX64": not layerwise and f64, "PRECISE": True}))
        acc = "fp64" if f64 else "fp32"
        for mode, direct in ((K.SEG_ONE, False), (K.SEG_TWO, False), (K.SEG_SCAN, False), (K.SEG_ELEM, False),
                             (K.SEG_ELEM, True)):
            sig = {"g_ptr": f"*{dt}", "part_ptr": f"*{dt}" if direct else f"*{acc}", "out_ptr": f"*{dt}",
                   "sigma_ptr": f"*{dt}", "n": "i32", "inner": "i32", "S": "i32", "seed": "i64", "offset": "i64"}
            out.append((K._perturb_bwd_kernel, sig, {"BLOCK": 1024, "SEG_MODE": mode, "IS_F64": f64,
                                                     "DIRECT": direct, "PRECISE": True}))
        sig = {"part_ptr": f"*{acc}", "out_ptr": f"*{dt}", "sigma_ptr": "*fp32", "S": "i32", "J": "i32",
               "n_alpha": "i32", "R": "i32", "inner": "i32", "n": "i32"}
        out.append((K._alpha_grad_reduce_kernel, sig, {"BLOCK": 1024, "BLOCK_K": 64, "BLOCK_J": 2, "BLOCK_R": 32,
                                                       "IS_F64": f64}))
        tdt = {"fp32": tl.float32, "fp16": tl.float16, "bf16": tl.bfloat16, "fp64": tl.float64}[dt]
        out.append((K._perturb_multi_fwd_kernel, {"table_ptr": "*i64", "T": "i32", "seed": "i64"},
                    {"T_POW2": 8, "BLOCK": 1024, "V_DTYPE": tdt, "SIGMA_DTYPE": tl.float32, "IS_F64": f64,
                     "PRECISE": True}))
        out.append((K._perturb_multi_bwd_kernel, {"table_ptr": "*i64", "part_ptr": f"*{acc}", "T": "i32",
                                                  "seed": "i64"},
                    {"T_POW2": 8, "BLOCK": 1024, "G_DTYPE": tdt, "IS_F64": f64, "PRECISE": True}))
        out.append((K._alpha_grad_multi_reduce_kernel, {"table_ptr": "*i64", "part_ptr": f"*{acc}", "T": "i32"},
                    {"T_POW2": 8, "BLOCK": 1024, "BLOCK_K": 128, "BLOCK_J": 4, "BLOCK_R": 8, "OUT_DTYPE": tdt,
                     "SIGMA_DTYPE": tl.float32, "IS_F64": f64}))
    return out


def compile_all(arch: int = 90, verbose: bool = False) -> list[str]:
    """Compile every kernel configuration for ``sm_<arch>``; returns the problems found (empty = fine)."""
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise RuntimeError("compile_all needs TRITON_INTERPRET unset (the interpreter replaces triton.jit)")
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    target = GPUTarget("cuda", arch, 32)
    problems = []
    for fn, sig, consts in _configs():
        sig = dict(sig, **{k: "constexpr" for k in consts})
        name = f"{fn.__name__}{consts}"
        try:
            compiled = triton.compile(ASTSource(fn, sig, constexprs=consts), target=target,
                                      options={"num_warps": 4})
        except Exception as exc:  # report every failing configuration, not only the first
            problems.append(f"{name}: {type(exc).__name__}: {exc}")
            continue
        ptx = compiled.asm["ptx"]
        bad = sorted(set(m.group(0) for m in APPROX_INSTRUCTIONS.finditer(ptx)))
        if bad:
            problems.append(f"{name}: approximate instructions in PTX: {bad}")
        if verbose:
            print(f"ok {name}")
    return problems


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    arch = int(argv[0]) if argv else 90
    problems = compile_all(arch, verbose=True)
    for p in problems:
        print("FAIL", p)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
