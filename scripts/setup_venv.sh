#!/usr/bin/env bash
# Set up ./.venv on a fresh machine: the CPU build of torch from the local wheel cache, the test/Triton
# extras, and pni_fast itself (editable), then build pni_fast._C in place against the torch of .venv.
#
# Idempotent and cheap to repeat (README's two commands start with it): two stamps under .venv record what
# the last successful run set up. Unchanged dependencies (this script, pyproject.toml, setup.py,
# build_backend/) skip every pip call; unchanged kernel sources (csrc/) skip the compile; a changed source
# recompiles only what changed (`setup.py build_ext --inplace`, ninja's incremental build under build/).
# A second run with nothing changed takes a few seconds (README: measured times).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate

digest() { find "$@" -type f ! -name '*.pyc' -print0 | sort -z | xargs -0 sha256sum | sha256sum | cut -d' ' -f1; }
DEPS_STAMP=.venv/.pni_fast_deps
SRC_STAMP=.venv/.pni_fast_src
deps_now=$(digest scripts/setup_venv.sh pyproject.toml setup.py build_backend)
src_now=$(digest csrc pni_fast/_build_config.py)

if [ "$(cat "$DEPS_STAMP" 2>/dev/null)" != "$deps_now" ]; then
  python -m pip install -q --upgrade pip setuptools wheel
  # torch==2.13.0 is the CPU build on this machine kind's local disk; a bare `torch` would pull a CUDA build.
  python -m pip install -q "torch==2.13.0"
  # Triton: the version torch asks for. torch's CUDA wheels require one (2.13.0: triton==3.7.1) and pip
  # installed it with torch above; the CPU wheel requires none, so the Triton interpreter tests get the
  # version torch 2.13's CUDA wheels pin (tests/backends/test_triton.py passes with it under TRITON_INTERPRET=1).
  TRITON_FOR_CPU_TORCH="triton==3.7.1"
  if python -c 'import importlib.metadata as m, sys; sys.exit(any(r.startswith("triton") for r in m.requires("torch") or []))'; then
    python -m pip install -q "$TRITON_FOR_CPU_TORCH"
  fi
  python -m pip install -q numpy scipy pytest pytest-xdist pytest-randomly hypothesis ninja pybind11 tqdm matplotlib scikit-learn \
    "ruff==0.17.6" "import-linter==2.16"
  # torchattacks for the interoperability test (tests/robust/test_attacks.py); it needs only torch at import
  python -m pip install -q --no-deps torchattacks
  # the package, editable, without compiling (the compile below is incremental; pip's would start over)
  PNI_FAST_SKIP_BUILD=1 python -m pip install -q --no-build-isolation --no-deps -e . > .venv/pip_editable.log 2>&1 || {
    cat .venv/pip_editable.log
    exit 1
  }
  rm -f "$SRC_STAMP"
  echo "$deps_now" > "$DEPS_STAMP"
fi

if [ "$(cat "$SRC_STAMP" 2>/dev/null)" != "$src_now" ] || ! ls pni_fast/_C*.so > /dev/null 2>&1; then
  echo "setup_venv: compiling pni_fast._C (incremental: only what changed since the last build)"
  python setup.py -q build_ext --inplace > .venv/build_ext.log 2>&1 || {
    tail -40 .venv/build_ext.log
    echo "setup_venv: the C++ build failed (full log: .venv/build_ext.log)" >&2
    exit 1
  }
  echo "$src_now" > "$SRC_STAMP"
fi
python -c "import pni_fast; print(pni_fast.info())"
