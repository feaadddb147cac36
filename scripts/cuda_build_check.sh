#!/usr/bin/env bash
# The maintainer's check of the CUDA build, on a machine WITHOUT a GPU (nvcc needed, no GPU):
#
#   bash scripts/cuda_build_check.sh [WORKDIR]
#
# 1. venv   a fresh venv in WORKDIR/venv with the CUDA build of torch ($TORCH_SPEC, several GB; or
#           reuse one with VENV=/path/to/venv), plus setuptools, wheel, ninja;
# 2. build  `FORCE_CUDA=1 pip wheel --no-deps .` with pip's default build isolation, as a user types
#           it, from `git archive HEAD` (WORKTREE=1: the tracked files with uncommitted edits, which
#           a committed tree keeps out). Without a GPU this builds the default architectures
#           (pni_fast/_build_config.py DEFAULT_CUDA_ARCHS) or TORCH_CUDA_ARCH_LIST;
# 3. archs  the wheel's build stamp (_C_build.json) says cuda_kernels and lists the architectures
#           expected (TORCH_CUDA_ARCH_LIST, else the default list less what nvcc cannot build), and
#           `cuobjdump --list-elf` / `--list-ptx` of the library find, for every one of them, one
#           cubin per csrc/cuda/*.cu file, and the PTX of every +PTX entry;
# 4. run    the wheel installed into the venv imports outside the checkout, loads its kernels
#           ahead of time (PNI_FAST_NO_JIT=1: no just-in-time fallback), has CUDA kernels
#           registered, runs the CPU path (noisy_weight, a NoisyLinear forward and backward), and
#           `python -m pni_fast info`-style status names the architectures;
# 5. guard  FORCE_CUDA=1 with an architecture nvcc cannot build fails with one clear message.
#
# Writes WORKDIR/summary.txt (status and seconds per step) and one log per step; exit code 0 when
# every step passed. Environment:
#   TORCH_SPEC            torch requirement of the venv (default torch==2.14.1, a +cu130 build)
#   VENV                  an existing venv with a CUDA torch to use instead of creating one
#   PYTHON                interpreter that creates the venv (default python3)
#   TORCH_CUDA_ARCH_LIST  architectures to build (default: the library's default list); a shorter
#                         list (e.g. "9.0+PTX") makes the build several times faster
#   WORKTREE=1            build the working tree's tracked files instead of HEAD
#   MAX_JOBS              parallel compile jobs (torch's BuildExtension; default: all CPUs)
#   CUDA_HOME             the CUDA toolkit (default: /usr/local/cuda or /opt/cuda, else torch's guess)
#   CUOBJDUMP             cuobjdump to use (default: PATH, $CUDA_HOME/bin, then the one Triton ships)
# Measured times: docs/install.md ("The CUDA build without a GPU").
set -uo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
WORK=${1:-$(mktemp -d "${TMPDIR:-/tmp}/pni_cuda_build_check.XXXXXX")}
mkdir -p "$WORK" && WORK=$(cd "$WORK" && pwd)
TORCH_SPEC=${TORCH_SPEC:-torch==2.14.1}
PYTHON=${PYTHON:-python3}
if [ -z "${CUDA_HOME:-}" ]; then  # torch's own guess (the folder above nvcc on PATH) may be a wrapper's
  for c in /usr/local/cuda /opt/cuda; do
    if [ -x "$c/bin/nvcc" ]; then export CUDA_HOME=$c; break; fi
  done
fi
SUMMARY="$WORK/summary.txt"
FAILED=()
T0=$SECONDS
echo "# pni_fast scripts/cuda_build_check.sh ($(date -u +%Y-%m-%dT%H:%M:%SZ)), $(nproc) CPUs, work dir $WORK" >"$SUMMARY"
echo "TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-<unset: the default list>} MAX_JOBS=${MAX_JOBS:-<unset>}" \
  "CUDA_HOME=${CUDA_HOME:-<unset>}" >>"$SUMMARY"

step() {  # name command...: runs the command, logs to WORK/<name>.log, records status and seconds
  local name=$1 t=$SECONDS rc
  shift
  echo "[cuda_build_check] $name: start -> $WORK/$name.log"
  "$@" >"$WORK/$name.log" 2>&1
  rc=$?
  local status=ok
  [ "$rc" = 0 ] || { status=FAIL; FAILED+=("$name"); }
  printf '%-6s %-5s %6s s\n' "$name" "$status" "$((SECONDS - t))" >>"$SUMMARY"
  echo "[cuda_build_check] $name: $status in $((SECONDS - t)) s"
  if [ "$status" != ok ]; then tail -n 30 "$WORK/$name.log" | sed 's/^/    /'; fi
  return "$rc"
}

finish() {
  echo "total  $((SECONDS - T0)) s" >>"$SUMMARY"
  if [ ${#FAILED[@]} -eq 0 ]; then echo "overall: ok" >>"$SUMMARY"; else echo "overall: FAIL (${FAILED[*]})" >>"$SUMMARY"; fi
  echo
  cat "$SUMMARY"
  [ ${#FAILED[@]} -eq 0 ]
  exit $?
}

# --- 1. the venv with the CUDA torch --------------------------------------------------------------
make_venv() {
  if [ -n "${VENV:-}" ]; then
    echo "reusing $VENV"
  else
    VENV="$WORK/venv"
    "$PYTHON" -m venv "$VENV" || return
    "$VENV/bin/pip" install -q "$TORCH_SPEC" setuptools wheel ninja || return
  fi
  "$VENV/bin/python" - <<'EOF'
import torch
from torch.utils.cpp_extension import CUDA_HOME
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, GPU visible: {torch.cuda.is_available()}, "
      f"CUDA_HOME {CUDA_HOME}, torch's archs {torch.cuda.get_arch_list()}")
if torch.version.cuda is None:
    raise SystemExit("this torch is a CPU-only build: set TORCH_SPEC to a CUDA build")
if CUDA_HOME is None:
    raise SystemExit("torch finds no CUDA toolkit (nvcc): set CUDA_HOME")
EOF
}
VENV=${VENV:-}
step venv make_venv || finish
[ -n "$VENV" ] || VENV="$WORK/venv"
PY="$VENV/bin/python"

# --- 2. FORCE_CUDA=1 pip wheel, default build isolation --------------------------------------------
build() {
  rm -rf "$WORK/src" "$WORK/dist"
  mkdir -p "$WORK/src"
  if [ "${WORKTREE:-0}" = 1 ]; then  # the tracked files as they are now, uncommitted edits included
    (cd "$ROOT" && git ls-files -z | xargs -0 cp --parents -t "$WORK/src") || return
    echo "source: the working tree of $ROOT (tracked files)"
  else
    git -C "$ROOT" archive HEAD | tar -x -C "$WORK/src" || return
    echo "source: commit $(git -C "$ROOT" rev-parse HEAD)"
  fi
  FORCE_CUDA=1 VIRTUAL_ENV="$VENV" "$VENV/bin/pip" wheel -v --no-deps -w "$WORK/dist" "$WORK/src"
}
step build build || finish
WHEEL=$(ls "$WORK"/dist/pni_fast-*.whl 2>/dev/null | head -1)

# --- 3. the architectures inside the library --------------------------------------------------------
find_cuobjdump() {
  local c
  for c in "${CUOBJDUMP:-}" "$(command -v cuobjdump 2>/dev/null)" "${CUDA_HOME:-/usr/local/cuda}/bin/cuobjdump" \
           "$("$PY" -c 'import os, triton; print(os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin/cuobjdump"))' 2>/dev/null)"; do
    if [ -n "$c" ] && [ -x "$c" ]; then echo "$c"; return; fi
  done
}
check_archs() {
  local dump lib
  dump=$(find_cuobjdump)
  [ -n "$dump" ] || { echo "cuobjdump not found (set CUOBJDUMP)"; return 1; }
  rm -rf "$WORK/wheel" && mkdir -p "$WORK/wheel"
  "$PY" -m zipfile -e "$WHEEL" "$WORK/wheel" || return
  lib=$(ls "$WORK"/wheel/pni_fast/_C*.so) || return
  echo "wheel $WHEEL; library $lib ($(du -h "$lib" | cut -f1)); cuobjdump $dump"
  "$dump" --list-elf "$lib" >"$WORK/elf.txt" 2>&1
  "$dump" --list-ptx "$lib" >"$WORK/ptx.txt" 2>&1
  cat "$WORK/elf.txt" "$WORK/ptx.txt"
  "$PY" - "$WORK/wheel/pni_fast" "$WORK/elf.txt" "$WORK/ptx.txt" "$ROOT" <<'EOF'
import collections, glob, importlib.util, json, os, re, sys
pkg, elf_txt, ptx_txt, root = sys.argv[1:]
spec = importlib.util.spec_from_file_location("cfg", os.path.join(pkg, "_build_config.py"))
cfg = importlib.util.module_from_spec(spec); spec.loader.exec_module(cfg)
stamp = json.load(open(os.path.join(pkg, cfg.STAMP_NAME)))
print("stamp:", json.dumps(stamp))
assert stamp["cuda_kernels"] is True, "the stamp says the library has no CUDA kernels"
cuda = stamp["cuda"]
import torch
from torch.utils.cpp_extension import CUDA_HOME
nvcc = cfg.nvcc_gpu_codes(cfg.nvcc_path(CUDA_HOME))
# no GPU here: TORCH_CUDA_ARCH_LIST, else the default list less what nvcc / torch cannot run
expected = cfg.cuda_arch_plan(os.environ.get("TORCH_CUDA_ARCH_LIST"), [], nvcc, torch.cuda.get_arch_list())
assert (cuda["sass"], cuda["ptx"]) == (expected["sass"], expected["ptx"]), (cuda, expected)
n_cu = len(glob.glob(os.path.join(root, "csrc", "cuda", "*.cu")))
elf = collections.Counter(re.findall(r"\.(sm_\d+[af]?)\.cubin", open(elf_txt).read()))
ptx = collections.Counter(re.findall(r"\.(sm_\d+[af]?)\.ptx", open(ptx_txt).read()))
print(f"cubins per architecture: {dict(elf)}; PTX per architecture: {dict(ptx)}; {n_cu} .cu files")
for sm in cuda["sass"]:
    assert elf[sm] == n_cu, f"{sm}: {elf[sm]} cubins, expected {n_cu} (one per .cu file)"
assert set(elf) == set(cuda["sass"]), f"unexpected cubins: {set(elf) - set(cuda['sass'])}"
for comp in cuda["ptx"]:
    sm = "sm_" + comp[len("compute_"):]
    assert ptx[sm] == n_cu, f"{comp}: PTX of {ptx[sm]} files, expected {n_cu}"
print(f"archs ok: {cuda['arch_list']} ({cuda['source']}), nvcc {cuda.get('nvcc')}; left out: {cuda.get('dropped')}")
EOF
}
step archs check_archs

# --- 4. install and run the CPU path with the CUDA torch ---------------------------------------------
run_cpu_path() {
  "$VENV/bin/pip" install -q --no-deps --force-reinstall "$WHEEL" || return
  (cd "$WORK" && PNI_FAST_NO_JIT=1 "$PY" - <<'EOF'
import torch
import pni_fast
from pni_fast import _ext
msg = _ext.status_message()
print(msg)
assert _ext.load() and "ahead-of-time" in msg, msg
assert _ext.has_cuda() and _ext.has_op("perturb", "cuda") and _ext.has_op("sigma", "cuda"), msg
assert "with CUDA kernels for sm_" in msg, msg
w = torch.randn(64, 32)
a = pni_fast.noisy_weight(w, torch.tensor(0.25), seed=7)
b = pni_fast.noisy_weight(w, torch.tensor(0.25), seed=7)
assert torch.equal(a, b) and not torch.equal(a, w)
layer = pni_fast.NoisyLinear(32, 8)
x = torch.randn(4, 32, requires_grad=True)
layer(x).sum().backward()
assert x.grad is not None and all(p.grad is not None for p in layer.parameters() if p.requires_grad)
print(pni_fast.ops.registry.info() if hasattr(pni_fast, "backends") else "")
print("CPU path ok with", torch.__version__)
EOF
  )
}
step run run_cpu_path

# --- 5. an architecture nvcc cannot build: one clear error, no library ----------------------------------
guard() {
  local out
  out=$(cd "$WORK/src" && FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST=5.0 VIRTUAL_ENV="$VENV" \
        "$VENV/bin/pip" wheel --no-deps -w "$WORK/dist_guard" . 2>&1)
  local rc=$?
  echo "$out" | tail -20
  [ "$rc" != 0 ] && echo "$out" | grep -q "pni_fast: ERROR: TORCH_CUDA_ARCH_LIST=5.0 asks for 5.0" \
    && ! ls "$WORK"/dist_guard/*.whl 2>/dev/null
}
step guard guard

finish
