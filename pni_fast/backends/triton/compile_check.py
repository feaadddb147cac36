"""Compile every Triton kernel of pni_fast for an NVIDIA target without a GPU.

Triton ships its own ptxas and libdevice, so ``triton.compile`` can lower the kernels to PTX
and a cubin on a CPU-only machine. CI uses this (tests/backends/test_triton.py) to catch errors that the
interpreter cannot see (types, layouts, loops, pointer casts) and to check that the noise path
uses no approximate math instruction.

Each configuration goes through Triton's own launch binder (the code ``kernel[grid](...)`` runs),
with CPU tensors standing in for the device pointers, so the compiled variants are exactly the
ones a launch would build: the "aligned" variants carry the specializations real tensors get
(pointers divisible by 16, sizes divisible by 16, integers equal to 1 folded to constants), the
"unaligned" ones have odd sizes and offset pointers.

Run as ``python -m pni_fast.backends.triton.compile_check [sm] [--regs]`` with ``TRITON_INTERPRET`` unset;
``--regs`` also prints ptxas's register / spill count of every variant.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile

__all__ = ["APPROX_INSTRUCTIONS", "FTZ_SQRT", "VECTOR_STORE", "cache_key", "compile_all", "main", "recompile_problems"]

# PTX instructions that would break the 2e-6 agreement of z with the other backends.
APPROX_INSTRUCTIONS = re.compile(r"\b[a-z0-9]+(\.[a-z0-9]+)*\.approx(\.[a-z0-9]+)*")
FTZ_SQRT = re.compile(r"\b(sqrt|rsqrt)(\.[a-z0-9]+)*\.ftz(\.[a-z0-9]+)*")
# What the divisibility specializations buy: 16-byte stores in the element-wise kernels.
VECTOR_STORE = re.compile(r"\bst\.global(\.[a-z0-9]+)*\.v[24]\.")

_BLOCK = 1024
_SEED = 2**40 + 5  # a drawn seed is almost always >= 2**32: typed i64


def _tensor(dtype: str, numel: int, aligned: bool):
    """A CPU tensor standing in for a device pointer (only data_ptr and dtype are looked at)."""
    import torch

    dt = {
        "fp32": torch.float32,
        "fp16": torch.float16,
        "bf16": torch.bfloat16,
        "fp64": torch.float64,
        "i64": torch.int64,
    }[dtype]
    t = torch.empty(numel + 1, dtype=dt)
    return t[:numel] if aligned else t[1:]  # element offset 1: data_ptr % 16 != 0


def _configs():
    """(name, kernel, args, kwargs) covering every code path of kernels.py, launched as ops.py does."""
    import triton.language as tl

    from .alpha_grad_kernels import SEG_ELEM, SEG_ONE, SEG_SCAN, SEG_TWO, alpha_grad_reduce_kernel, perturb_bwd_kernel
    from .list_kernels import alpha_grad_multi_reduce_kernel, perturb_multi_bwd_kernel, perturb_multi_fwd_kernel
    from .noise_kernels import noise_kernel
    from .perturb_kernels import perturb_fwd_kernel

    tl_dtype = {"fp32": tl.float32, "fp16": tl.float16, "bf16": tl.bfloat16, "fp64": tl.float64}
    out = []
    # Sizes as real tensors have them: aligned (multiples of 16, fresh allocations) and odd.
    sizes = {
        True: dict(n=65536, n_alpha=16, inner=4096, scan_inner=256, S=16, J=4, R=1),
        False: dict(n=4099, n_alpha=3, inner=1367, scan_inner=37, S=3, J=3, R=1),
    }
    # Triton types an int by its value: noise covers seeds typed i32, u32 and i64, with and without state.
    for seed, offset, aligned, has_state in (
        (7, 3, True, False),
        (2**31 + 5, 2**31 + 1, True, False),
        (_SEED, 2**33, True, False),
        (_SEED, 0, True, True),
        (_SEED, 5, False, False),
    ):
        n = sizes[aligned]["n"]
        o, st = _tensor("fp32", n, aligned), _tensor("i64", 2, True)
        out.append(
            (
                f"noise seed={seed} aligned={aligned} state={has_state}",
                noise_kernel,
                (o, st if has_state else o, n, seed, offset),
                dict(BLOCK=_BLOCK, HAS_STATE=has_state, PRECISE=True),
            )
        )
    for dt, adt in (("fp32", "fp32"), ("fp16", "fp32"), ("bf16", "bf16"), ("fp64", "fp64")):
        f64, acc = dt == "fp64", "fp64" if dt == "fp64" else "fp32"
        for aligned in (True, False) if dt != "bf16" else (True,):  # bf16 is laid out like fp16
            z = sizes[aligned]
            n = z["n"]
            v, o, g = (_tensor(dt, n, aligned) for _ in range(3))
            sigma, state = _tensor("fp32", 1, True), _tensor("i64", 2, True)
            # The state only changes the key prologue: checked on the aligned variants of two paths.
            for has_state in (False, True) if aligned else (False,):
                st = state if has_state else sigma
                tag = f"{dt}/{adt} aligned={aligned} state={has_state}"
                for mode, n_alpha, inner in (
                    ("layerwise", 1, 1),
                    ("channelwise", z["n_alpha"], z["inner"]),
                    ("elementwise", n, 1),
                ):
                    if has_state and mode != "channelwise":
                        continue
                    for index64 in (False, True) if mode == "channelwise" and aligned and not has_state else (False,):
                        a = _tensor(adt, n_alpha, aligned)
                        out.append(
                            (
                                f"perturb_fwd {mode} index64={index64} {tag}",
                                perturb_fwd_kernel,
                                (v, o, a, sigma, st, n, n_alpha, inner, _SEED, 0),
                                dict(
                                    BLOCK=_BLOCK,
                                    LAYERWISE=n_alpha == 1,
                                    IS_F64=f64,
                                    INDEX64=index64,
                                    HAS_STATE=has_state,
                                    PRECISE=True,
                                ),
                            )
                        )
                a_out = _tensor(adt, z["n_alpha"], aligned)
                part = _tensor(acc, z["J"] * z["S"], True)
                for mode, inner, direct, index64 in (
                    (SEG_ONE, 4096, False, False),
                    (SEG_TWO, z["inner"], False, False),
                    (SEG_SCAN, z["scan_inner"], False, False),
                    (SEG_SCAN, z["scan_inner"], False, True),
                    (SEG_ELEM, 1, False, False),
                    (SEG_ELEM, 1, True, False),
                ):
                    if (has_state and (index64 or mode != SEG_SCAN)) or (index64 and not aligned):
                        continue
                    out.append(
                        (
                            f"perturb_bwd mode={mode} direct={direct} index64={index64} {tag}",
                            perturb_bwd_kernel,
                            (g, a_out if direct else part, a_out, sigma, st, n, inner, z["S"], _SEED, 0),
                            dict(
                                BLOCK=_BLOCK,
                                SEG_MODE=mode,
                                IS_F64=f64,
                                DIRECT=direct,
                                INDEX64=index64,
                                HAS_STATE=has_state,
                                PRECISE=True,
                            ),
                        )
                    )
            part = _tensor(acc, z["J"] * z["S"], True)
            out.append(
                (
                    f"alpha_grad_reduce {dt}/{adt} aligned={aligned}",
                    alpha_grad_reduce_kernel,
                    (
                        part,
                        _tensor(adt, z["n_alpha"], aligned),
                        _tensor("fp32", 1, True),
                        z["S"],
                        z["J"],
                        z["n_alpha"],
                        z["R"],
                        z["scan_inner"],
                        n,
                    ),
                    dict(BLOCK=_BLOCK, BLOCK_K=64, BLOCK_J=2, BLOCK_R=32, IS_F64=f64),
                )
            )
        table, part, state = _tensor("i64", 64, True), _tensor(acc, 4096, True), _tensor("i64", 2, True)
        for t, has_state, index64 in ((1, False, False), (5, False, False), (5, False, True), (5, True, False)):
            if t == 1 and dt != "fp32":
                continue  # T == 1 is folded to a constant: once is enough
            st, tag = state if has_state else table, f"{dt}/{adt} T={t} index64={index64} state={has_state}"
            out.append(
                (
                    f"multi_fwd {tag}",
                    perturb_multi_fwd_kernel,
                    (table, st, t),
                    dict(
                        T_POW2=8,
                        BLOCK=_BLOCK,
                        V_DTYPE=tl_dtype[dt],
                        ALPHA_DTYPE=tl_dtype[adt],
                        SIGMA_DTYPE=tl.float32,
                        IS_F64=f64,
                        INDEX64=index64,
                        HAS_STATE=has_state,
                        PRECISE=True,
                    ),
                )
            )
            out.append(
                (
                    f"multi_bwd {tag}",
                    perturb_multi_bwd_kernel,
                    (table, part, st, t),
                    dict(
                        T_POW2=8,
                        BLOCK=_BLOCK,
                        G_DTYPE=tl_dtype[dt],
                        IS_F64=f64,
                        INDEX64=index64,
                        HAS_STATE=has_state,
                        PRECISE=True,
                    ),
                )
            )
        out.append(
            (
                f"multi_reduce {dt}/{adt}",
                alpha_grad_multi_reduce_kernel,
                (table, part, 5),
                dict(
                    T_POW2=8,
                    BLOCK=_BLOCK,
                    BLOCK_K=128,
                    BLOCK_J=4,
                    BLOCK_R=8,
                    OUT_DTYPE=tl_dtype[adt],
                    SIGMA_DTYPE=tl.float32,
                    IS_F64=f64,
                ),
            )
        )
    return out


def _backend(arch: int):
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend

    target = GPUTarget("cuda", arch, 32)
    return target, make_backend(target)


def _bind(fn, backend, args, kwargs):
    """What ``fn[grid](*args, **kwargs)`` computes before compiling: (cache key, ASTSource, options)."""
    from triton.compiler import ASTSource
    from triton.runtime.jit import compute_cache_key, create_function_from_signature

    binder = create_function_from_signature(fn.signature, fn.params, backend)
    kwargs = dict(kwargs, num_warps=kwargs.get("num_warps", 4))
    bound, specialization, options = binder(*args, **kwargs)
    key = compute_cache_key({}, specialization, options)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
    return key, ASTSource(fn, signature, constexprs, attrs), options


def cache_key(fn, args, kwargs, arch: int = 90) -> str:
    """The key of Triton's per-kernel compile cache for a launch with these arguments."""
    _check_not_interpreted()
    return _bind(fn, _backend(arch)[1], args, kwargs)[0]


def _check_not_interpreted() -> None:
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise RuntimeError("compile_check needs TRITON_INTERPRET unset (the interpreter replaces triton.jit)")


def _registers(ptx: str, arch: int) -> str:
    """ptxas -v's resource line (registers, spills) for one PTX module."""
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        proc = subprocess.run(
            [
                get_ptxas(arch).path,
                "-v",
                f"--gpu-name={sm_arch_from_capability(arch)}",
                src,
                "-o",
                os.path.join(tmp, "k.cubin"),
            ],
            capture_output=True,
            text=True,
        )
    regs = re.search(r"Used (\d+) registers", proc.stderr)
    spills = re.search(r"(\d+) bytes spill stores", proc.stderr)
    return f"{regs.group(1) if regs else '?'} registers, {spills.group(1) if spills else '?'} bytes spilled"


def compile_all(arch: int = 90, verbose: bool = False, registers: bool = False) -> list[str]:
    """Compile every kernel configuration for ``sm_<arch>``; returns the problems found (empty = fine)."""
    _check_not_interpreted()
    import triton

    target, backend = _backend(arch)
    problems = []
    for name, fn, args, kwargs in _configs():
        try:
            _, src, options = _bind(fn, backend, args, kwargs)
            compiled = triton.compile(src, target=target, options=options.__dict__)
        except Exception as exc:  # report every failing configuration, not only the first
            problems.append(f"{name}: {type(exc).__name__}: {exc}")
            continue
        ptx = compiled.asm["ptx"]
        bad = sorted({m.group(0) for rx in (APPROX_INSTRUCTIONS, FTZ_SQRT) for m in rx.finditer(ptx)})
        if bad:
            problems.append(f"{name}: approximate instructions in PTX: {bad}")
        if name.startswith(("noise", "perturb_fwd")) and "aligned=True" in name and not VECTOR_STORE.search(ptx):
            problems.append(f"{name}: no vectorized store in the PTX of an aligned variant")
        if verbose:
            print(f"ok {name}" + (f": {_registers(ptx, arch)}" if registers else ""), flush=True)
    return problems


def recompile_problems(arch: int = 90) -> list[str]:
    """Launches that differ only in seed / offset must share one compiled kernel (one cache key).

    Triton folds an integer argument equal to 1 and marks one divisible by 16 unless the argument
    is in the kernel's ``do_not_specialize``: without it ~1 drawn seed in 16 compiles again.
    """
    _check_not_interpreted()
    _, backend = _backend(arch)
    problems, seen = [], set()
    for name, fn, args, kwargs in _configs():
        names = [p.name for p in fn.params]
        varying = [a for a in ("seed", "offset") if a in names]
        if not varying or fn in seen:
            continue
        seen.add(fn)
        for arg in varying:
            i = names.index(arg)
            keys = {_bind(fn, backend, args[:i] + (v,) + args[i + 1 :], kwargs)[0] for v in (1, 16, 17, 2**20)}
            if len(keys) != 1:
                problems.append(f"{name}: {arg} = 1, 16, 17, 2**20 give {len(keys)} compiled variants, expected 1")
    return problems


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    registers = "--regs" in argv
    rest = [a for a in argv if a != "--regs"]
    arch = int(rest[0]) if rest else 90
    problems = compile_all(arch, verbose=True, registers=registers) + recompile_problems(arch)
    for p in problems:
        print("FAIL", p)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
