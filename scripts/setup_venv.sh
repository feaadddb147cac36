#!/usr/bin/env bash
# Set up ./.venv on a fresh machine: the CPU build of torch from the local wheel cache,
# the test/Triton extras, and pni_fast itself built against that torch (no build isolation,
# so the extension's ABI matches the torch it runs with). Idempotent.
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
python -m pip install -q numpy scipy pytest hypothesis ninja pybind11 tqdm matplotlib scikit-learn "triton==3.6.0"
# torchattacks for the interoperability test (tests/test_attacks.py); it needs only torch at import
python -m pip install -q --no-deps torchattacks
python -m pip install -q --no-build-isolation -e .
python -c "import pni_fast; print(pni_fast.info())"
