#!/usr/bin/env bash
# Set up ./.venv on a fresh machine: the CPU build of torch from the local wheel cache, the
# test/Triton extras, and pni_fast itself. A plain `pip install -e .` (pip's default build
# isolation) builds pni_fast._C against the torch of .venv (build_backend/pni_fast_build.py,
# docs/install.md); a compile error fails an editable install. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip setuptools wheel
# torch==2.13.0 is the CPU build on this machine kind's local disk; a bare `torch` would pull a CUDA build.
python -m pip install -q "torch==2.13.0"
# Triton: the version torch asks for. torch's CUDA wheels require one (2.13.0: triton==3.7.1) and pip
# installed it with torch above; the CPU wheel requires none, so the Triton interpreter tests get the
# version torch 2.13's CUDA wheels pin (tests/test_triton.py passes with it under TRITON_INTERPRET=1).
TRITON_FOR_CPU_TORCH="triton==3.7.1"
if python -c 'import importlib.metadata as m, sys; sys.exit(any(r.startswith("triton") for r in m.requires("torch") or []))'; then
  python -m pip install -q "$TRITON_FOR_CPU_TORCH"
fi
python -m pip install -q numpy scipy pytest hypothesis ninja pybind11 tqdm matplotlib scikit-learn "ruff==0.17.6"
# torchattacks for the interoperability test (tests/test_attacks.py); it needs only torch at import
python -m pip install -q --no-deps torchattacks
python -m pip install -q -e .
python -c "import pni_fast; print(pni_fast.info())"
