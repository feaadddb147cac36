#!/usr/bin/env bash
# The one prepared GPU check of pni_fast: build the CUDA kernels, run the GPU tests, the benchmarks
# in a short mode and compute-sanitizer, and put every log and result into OUTDIR.
#
#   bash scripts/gpu_check.sh OUTDIR             # on a machine with an NVIDIA GPU (H100/H200)
#   bash scripts/gpu_check.sh OUTDIR --cpu-only  # dry run without a GPU (what tests/tooling/test_gpu_check.py runs)
#
# Stages, each under its own time limit (seconds); a failing or timed-out stage is recorded and
# the later stages still run. The whole run is capped at BUDGET=400 s: a stage gets its fixed
# limit or what is left of the budget (less the 5 s its kill may take), whichever is smaller, so
# a first run on an H100/H200 (cold caches, compiling everything) ends by ~6 min 45 s and leaves
# over 60 s of an 8-minute device slot spare. Fixed limits sum to 395 s. --cpu-only doubles every
# limit and the budget (a dry run on a shared CPU machine; its timing says nothing about a GPU run).
#
#   env         20  device, driver, torch/CUDA/Triton versions, supported range  -> env.txt
#   build      150  FORCE_CUDA=1 pip install --no-build-isolation --no-deps -e . -> build.log
#                   for the GPU's own architecture, then checks that the compiled library loads
#                   with its CUDA kernels and that they hold machine code for this GPU
#   tests      120  the GPU tests ($GPU_TESTS: the kernel contract for the cuda and triton backends,
#                   test_cuda*.py, test_sigma.py, test_triton.py) on the GPU (pytest-xdist, 6 workers)
#                                                                                -> tests.log
#   bench       60  benchmarks/run_all.py: training step (batch 128, limit 20 s),
#                   op sweep at 8M elements without torch.compile (limit 35 s)  -> bench.log, bench.tar.gz
#   sanitizer   45  compute-sanitizer memcheck (28 s) over a few CUDA tests, racecheck (12 s) over
#                   the kernels with shared memory (the alpha-gradient and sigma reductions)
#                                                                                -> sanitizer.log
#   rest      left  the rest of tests/ (-m "not slow"), only with >= 20 s left   -> tests_rest.log
#
# Status labels in summary.txt: ok; skipped (with the reason); FAIL; TIMEOUT only when the stage
# itself reached its limit ("stopped at the stage's N s limit"). A command inside a stage that hits
# its own shorter limit (a sanitizer tool) is a FAIL whose note names that command and its limit.
#
# OUTDIR then holds at most 8 files: summary.txt (status, exit code and seconds per stage),
# env.txt, build.log, tests.log, bench.log, bench.tar.gz (unpacks to <device-slug>/ with
# ops.json/ops.md/train.json/train.md/RESULTS.md/plots, i.e. benchmarks/results/<device-slug>/),
# sanitizer.log and tests_rest.log. Exit code: 0 when no stage failed, 1 otherwise, 2 on bad usage.
#
# --cpu-only skips what needs a GPU: no CUDA build (the existing build is only loaded), the tests
# run on CPU (GPU tests skip with their reasons), the benchmarks in their tiniest mode, and the
# sanitizer stage only checks that its test selection is not empty; `rest` is left to CI.
#
# Environment: PYTHON (default python3); PNI_GPU_CHECK_ONLY=name[,name] runs only those stages (the
# others are listed as skipped); PNI_GPU_CHECK_FAIL_STAGE=name[:rc][,name[:rc]] simulates a failure of
# those stages with exit code rc (default 1; 124: a command inside it timed out) (tests of this script); PNI_GPU_CHECK_BUDGET=seconds replaces the 400 s budget (tests);
# MAX_JOBS / TORCH_CUDA_ARCH_LIST are passed to the build.
set -uo pipefail

usage() { echo "usage: bash scripts/gpu_check.sh OUTDIR [--cpu-only]" >&2; exit 2; }

OUTDIR="" CPU_ONLY=0
for arg in "$@"; do
  case "$arg" in
    --cpu-only) CPU_ONLY=1 ;;
    -h|--help) sed -n '2,40p' "$0"; exit 0 ;;
    -*) echo "gpu_check: unknown option $arg" >&2; usage ;;
    *) [ -z "$OUTDIR" ] || { echo "gpu_check: more than one OUTDIR given" >&2; usage; }; OUTDIR=$arg ;;
  esac
done
[ -n "$OUTDIR" ] || usage
mkdir -p "$OUTDIR" || { echo "gpu_check: cannot create OUTDIR $OUTDIR" >&2; exit 2; }
OUT=$(cd "$OUTDIR" && pwd)
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT" || exit 2
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")
trap 'rm -rf "$WORK"' EXIT

PYTHON=${PYTHON:-python3}
BUDGET=400
# --cpu-only (CI, a shared CPU machine where importing torch alone can take 10 s) doubles every
# limit and the budget: its timing says nothing about the device slot
SCALE=1
[ "$CPU_ONLY" = 1 ] && SCALE=2
BUDGET=${PNI_GPU_CHECK_BUDGET:-$((BUDGET * SCALE))}  # PNI_GPU_CHECK_BUDGET: only in tests of this script
KILL_GRACE=5  # timeout -k: what a stage's kill may add to its limit
export OUT ROOT WORK PYTHON CPU_ONLY PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1

# The GPU test files; the kernel contract files (parametrized by backend) run for the GPU backends
# only (PNI_TEST_BACKENDS, tests/support/kernels.py): CI runs them for the CPU backends.
GPU_TESTS="tests/backends/test_kernels_rng.py tests/backends/test_kernels_contract.py tests/backends/test_kernels_lists.py tests/backends/test_cuda.py"
GPU_TESTS+=" tests/test_cuda_api.py tests/ops/test_cuda_graphs.py tests/ops/test_sigma.py tests/backends/test_triton.py"
# compute-sanitizer runs these CUDA-backend tests (in $SAN_FILES): forward + alpha gradient (fp32 for
# every stage-1 path of the kernel, and fp16), the deterministic alpha-grad reduction, multi-tensor
# launches (> 32 tensors) and unaligned views.
SAN_FILES="tests/backends/test_kernels_contract.py tests/backends/test_kernels_lists.py"
SAN_K='test_perturb_and_alpha_grad[cuda-conv-channelwise-float16]'
for c in layerwise-tail layerwise-large conv-channelwise linear-channelwise-long aligned-rows elementwise-odd \
         act-channelwise-7x7 act-channelwise-4x4 act-channelwise-32x32 act-per-feature; do
  SAN_K+=" or test_perturb_and_alpha_grad[cuda-$c-float32]"
done
SAN_K+=' or test_alpha_grad_deterministic[cuda] or (test_multi_equals_single and [cuda-)'
SAN_K+=' or test_unaligned_views[cuda-float32] or test_unaligned_views[cuda-float16]'
# racecheck only checks shared-memory hazards, and runs several times slower than memcheck: the kernels
# that use shared memory, i.e. the block reductions of the alpha gradient (layerwise and channelwise)
# and of sigma
SAN_RACE_FILES="tests/backends/test_kernels_contract.py tests/ops/test_sigma.py"
SAN_RACE_K='test_alpha_grad_deterministic[cuda] or test_perturb_and_alpha_grad[cuda-layerwise-large-float32]'
SAN_RACE_K+=' or (test_sigma and cuda and float32)'
export GPU_TESTS SAN_FILES SAN_K SAN_RACE_FILES SAN_RACE_K

note() { echo "$*" >"$WORK/note_$STAGE"; }  # one line for summary.txt (called inside a stage)
export -f note

pytest_opts() {  # options every pytest run here shares
  local opts=(-q -p no:cacheprovider -rfEs)
  if "$PYTHON" -c "import pytest_timeout" 2>/dev/null; then opts+=(--timeout=90); fi
  echo "${opts[@]}"
}
xdist_opts() {  # parallel workers where pytest-xdist exists (GPU machine: 16 CPUs)
  if "$PYTHON" -c "import xdist" 2>/dev/null; then echo "-n ${1:-6}"; fi
}
export -f pytest_opts xdist_opts

# ---------------------------------------------------------------------------------------------
# Stages: each prints to its log; 0 = ok, 77 = skipped (with a note), anything else = failure
# ---------------------------------------------------------------------------------------------

stage_env() {
  echo "# pni_fast gpu_check environment ($(date -u +%Y-%m-%dT%H:%M:%SZ))"
  echo "mode: $([ "$CPU_ONLY" = 1 ] && echo cpu-only || echo gpu); host $(uname -srm); $(nproc) CPUs"
  echo "git: $(git -C "$ROOT" rev-parse HEAD 2>/dev/null || echo 'no git metadata')"
  git -C "$ROOT" status --short 2>/dev/null | head -20
  if command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=name,driver_version,compute_cap,memory.total,memory.used,clocks.max.sm \
      --format=csv
    nvidia-smi
  else
    echo "nvidia-smi: not found"
  fi
  if command -v nvcc >/dev/null; then nvcc --version | tail -2; else echo "nvcc: not on PATH"; fi
  local san; san=$(find_sanitizer)
  if [ -n "$san" ]; then echo "compute-sanitizer: $san ($("$san" --version 2>&1 | tail -1))"
  else echo "compute-sanitizer: not found"; fi
  "$PYTHON" - <<'EOF'
import importlib.metadata as md, os, platform, sys
import torch
def v(name):
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return "not installed"
print(f"python {platform.python_version()} ({sys.executable})")
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}")
print(f"triton {v('triton')}, numpy {v('numpy')}, pytest {v('pytest')}, pytest-xdist {v('pytest-xdist')}, "
      f"pytest-timeout {v('pytest-timeout')}, scipy {v('scipy')}")
print(f"cuda available: {torch.cuda.is_available()}, devices: {torch.cuda.device_count()}")
sys.path.insert(0, os.path.join(os.getcwd(), "pni_fast"))
import _build_config as cfg
print(cfg.torch_support_note(torch.__version__, v("triton")))
for i in range(torch.cuda.device_count()):
    p = torch.cuda.get_device_properties(i)
    free, total = torch.cuda.mem_get_info(i)
    print(f"  cuda:{i} {p.name}, sm_{p.major}{p.minor}, {p.multi_processor_count} SMs, "
          f"{total / 2**30:.1f} GiB ({free / 2**30:.1f} GiB free)")
sys.path.insert(0, os.getcwd())
from benchmarks.common import device_slug
slug = device_slug(torch.device("cuda")) if torch.cuda.is_available() else "cpu-only"
open(os.path.join(os.environ["WORK"], "slug"), "w").write(slug)
print(f"benchmark results folder: benchmarks/results/{slug}/")
if os.environ["CPU_ONLY"] != "1" and not torch.cuda.is_available():
    sys.exit("torch sees no CUDA device: the GPU stages cannot run")
EOF
}

find_sanitizer() {
  local c
  for c in "$(command -v compute-sanitizer 2>/dev/null)" "${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer" \
           /usr/local/cuda/bin/compute-sanitizer; do
    if [ -n "$c" ] && [ -x "$c" ]; then echo "$c"; return; fi
  done
}

verify_extension() {  # the compiled library loads (no just-in-time fallback) and, on GPU, has CUDA kernels
  PNI_FAST_NO_JIT=1 "$PYTHON" - <<'EOF'
import os, sys
import pni_fast
from pni_fast import _ext
print(pni_fast.info())
if os.environ["CPU_ONLY"] == "1":
    sys.exit(0)
if not (_ext.load() and _ext.has_cuda()):
    sys.exit(f"the CUDA kernels are not loaded: {_ext.status_message()}")
warnings = _ext.gpu_arch_warnings()
if warnings:
    sys.exit("the CUDA kernels hold no machine code for this GPU: " + "; ".join(warnings))
EOF
}

stage_build() {
  if [ "$CPU_ONLY" = 1 ]; then
    note "cpu-only: no CUDA build; the existing build was loaded"
    verify_extension
    return
  fi
  local cc
  cc=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -1 | tr -d ' ')
  export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-${cc:-9.0}}
  export MAX_JOBS=${MAX_JOBS:-$(nproc)}
  # torch guesses CUDA_HOME from the nvcc on PATH (a wrapper script there gives a folder without
  # libcudart: setup.py then stops at once and names the folder to set)
  if [ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ]; then export CUDA_HOME=/usr/local/cuda; fi
  echo "TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST MAX_JOBS=$MAX_JOBS CUDA_HOME=${CUDA_HOME:-unset, torch guesses}"
  FORCE_CUDA=1 "$PYTHON" -m pip install --no-build-isolation --no-deps --no-index --disable-pip-version-check \
    -e . || return
  verify_extension
}

stage_tests() {
  # PNI_FAST_NO_JIT: test the library just built, never a silent just-in-time rebuild
  if [ "$CPU_ONLY" = 1 ]; then
    note "cpu-only: tests/test_cuda*.py (their CPU checks; GPU tests skip); the kernel contract runs in CI"
    # shellcheck disable=SC2046
    PNI_FAST_NO_JIT=1 "$PYTHON" -m pytest tests/backends/test_cuda.py tests/test_cuda_api.py tests/ops/test_cuda_graphs.py $(pytest_opts)
    return
  fi
  # the sm_90 ahead-of-time compile check needs no GPU and takes long: CI runs it
  # shellcheck disable=SC2046
  PNI_FAST_NO_JIT=1 PNI_TEST_BACKENDS=cuda,triton "$PYTHON" -m pytest $GPU_TESTS $(pytest_opts) $(xdist_opts 6) \
    --deselect tests/backends/test_triton.py::test_kernels_compile_for_sm90_without_approx_math --durations=20
}

stage_bench() {
  local slug dest rc=0
  slug=$(cat "$WORK/slug" 2>/dev/null || echo unknown-device)
  dest="$WORK/bench/$slug"
  mkdir -p "$dest"
  if [ "$CPU_ONLY" = 1 ]; then
    note "cpu-only: benchmarks/run_all.py --quick (CPU, tiniest sizes)"
    timeout -k 3 60 "$PYTHON" benchmarks/run_all.py --quick --threads 1 --no-plot --out "$dest" || rc=$?
  else
    note "short mode: training step batch 128; ops at 8388608 elements, no torch.compile"
    timeout -k 2 20 "$PYTHON" benchmarks/run_all.py --skip-ops --out "$WORK/train" || rc=$?
    timeout -k 2 33 "$PYTHON" benchmarks/run_all.py --skip-train --no-compile --sizes 8388608 --out "$dest" \
      || rc=$?
    if [ -f "$WORK/train/train.json" ]; then  # one RESULTS.md with both sections, as run_all writes it
      cp "$WORK/train/train.json" "$WORK/train/train.md" "$dest/"
      { echo; echo "Training step: produced by \`python benchmarks/run_all.py --skip-ops\`."; echo
        cat "$WORK/train/train.md"; } >>"$dest/RESULTS.md"
    fi
  fi
  ls -l "$dest"
  tar -czf "$OUT/bench.tar.gz" -C "$WORK/bench" "$slug" && echo "wrote $OUT/bench.tar.gz ($slug/)"
  return "$rc"
}

stage_sanitizer() {
  # shellcheck disable=SC2046
  if [ "$CPU_ONLY" = 1 ]; then
    local n n_race
    "$PYTHON" -m pytest $SAN_FILES --collect-only -q -p no:cacheprovider -k "$SAN_K" >"$WORK/san_collect.txt"
    cat "$WORK/san_collect.txt"
    n=$(grep -c '::' "$WORK/san_collect.txt")
    PNI_TEST_BACKENDS=cuda "$PYTHON" -m pytest $SAN_RACE_FILES --collect-only -q -p no:cacheprovider -k "$SAN_RACE_K" \
      >"$WORK/san_race_collect.txt"
    cat "$WORK/san_race_collect.txt"
    n_race=$(grep -c '::' "$WORK/san_race_collect.txt")
    echo "sanitizer selection: $n tests (memcheck), $n_race tests (racecheck)"
    note "cpu-only: compute-sanitizer not run; its -k selection has $n tests (racecheck: $n_race)"
    [ "$n" -ge 5 ] && [ "$n_race" -ge 2 ] && return 77
    echo "the sanitizer selections pick too few tests (memcheck -k \"$SAN_K\": $n; racecheck -k \"$SAN_RACE_K\": $n_race)"
    return 1
  fi
  local san rc=0 tool
  san=$(find_sanitizer)
  if [ -z "$san" ]; then note "compute-sanitizer not found"; return 77; fi
  export PYTORCH_NO_CUDA_MEMORY_CACHING=1 PNI_FAST_NO_JIT=1  # every allocation visible to memcheck
  local files k lim r
  for tool in memcheck racecheck; do
    if [ "$tool" = memcheck ]; then files=$SAN_FILES k=$SAN_K lim=28; else files=$SAN_RACE_FILES k=$SAN_RACE_K lim=12; fi
    echo "=== compute-sanitizer --tool $tool (limit $lim s)"
    timeout -k 2 "$lim" "$san" --tool "$tool" --error-exitcode 86 "$PYTHON" -m pytest $files -q \
      -p no:cacheprovider -rfE -k "$k" >"$WORK/san_$tool.log" 2>&1
    r=$?
    cat "$WORK/san_$tool.log"
    echo "=== $tool: exit code $r"
    if grep -q "Device not supported" "$WORK/san_$tool.log"; then
      note "compute-sanitizer does not support this device (e.g. a gVisor sandbox)"
      return 77
    fi
    case $r in
      0) ;;
      124|137) rc=1; echo "$tool stopped at its own ${lim} s limit" >>"$WORK/san_notes" ;;
      86) rc=1; echo "$tool reported errors" >>"$WORK/san_notes" ;;
      *) rc=1; echo "$tool: exit code $r" >>"$WORK/san_notes" ;;
    esac
  done
  [ -f "$WORK/san_notes" ] && note "$(paste -sd ';' "$WORK/san_notes" | sed 's/;/; /g')"
  return "$rc"
}

stage_rest() {
  if [ "$CPU_ONLY" = 1 ]; then
    note "cpu-only: the CPU suite is CI's job (python -m pytest tests)"
    return 77
  fi
  # shellcheck disable=SC2046
  local ignore=() f
  for f in $GPU_TESTS tests/tooling/test_gpu_check.py; do ignore+=("--ignore=$f"); done
  "$PYTHON" -m pytest tests -m "not slow" "${ignore[@]}" $(pytest_opts) $(xdist_opts 12)
}
export -f stage_env stage_build stage_tests stage_bench stage_sanitizer stage_rest find_sanitizer verify_extension

# ---------------------------------------------------------------------------------------------
# Runner
# ---------------------------------------------------------------------------------------------

T_START=$SECONDS
FAILED=()
SUMMARY="$OUT/summary.txt"
{
  echo "# pni_fast scripts/gpu_check.sh $([ "$CPU_ONLY" = 1 ] && echo --cpu-only || echo on the GPU) ($(date -u +%Y-%m-%dT%H:%M:%SZ))"
  printf '%-10s %-8s %4s %7s %6s  %-15s %s\n' stage status rc seconds limit log note
} >"$SUMMARY"

run_stage() {  # name limit log: the stage gets min(limit, what the budget has left less the kill grace)
  local name=$1 limit=$2 log=$3 t0=$SECONDS rc status left
  STAGE=$name; export STAGE
  left=$((BUDGET - (SECONDS - T_START) - KILL_GRACE))
  : >"$OUT/$log"
  if [ "$left" -lt 10 ]; then
    echo "not run: only $((left + KILL_GRACE)) s of the ${BUDGET} s budget left" >>"$OUT/$log"
    printf '%-10s %-8s %4s %7s %6s  %-15s %s\n' "$name" skipped 0 0 "$limit" "$log" \
      "only $((left + KILL_GRACE)) s of the ${BUDGET} s budget left" >>"$SUMMARY"
    echo "[gpu_check] $name: skipped, only $((left + KILL_GRACE)) s of the ${BUDGET} s budget left"
    return
  fi
  limit=$((limit * SCALE))
  [ "$limit" -le "$left" ] || limit=$left
  echo "[gpu_check] $name: start (limit ${limit} s) -> $log"
  if [ -n "${PNI_GPU_CHECK_ONLY:-}" ] && [[ ",$PNI_GPU_CHECK_ONLY," != *",$name,"* ]]; then
    echo "not run: PNI_GPU_CHECK_ONLY=$PNI_GPU_CHECK_ONLY" >>"$OUT/$log"
    note "not selected (PNI_GPU_CHECK_ONLY)"
    rc=77
  elif [[ ",${PNI_GPU_CHECK_FAIL_STAGE:-}," =~ ,$name(:([0-9]+))?, ]]; then
    echo "simulated failure (PNI_GPU_CHECK_FAIL_STAGE=$PNI_GPU_CHECK_FAIL_STAGE)" >>"$OUT/$log"
    rc=${BASH_REMATCH[2]:-1}
    [ "$rc" = 124 ] || note "simulated failure"
  else
    timeout -k 5 "$limit" bash -c "stage_$name" >>"$OUT/$log" 2>&1
    rc=$?
  fi
  local dt=$((SECONDS - t0))
  case $rc in
    0) status=ok ;;
    77) status=skipped; rc=0 ;;
    124|137)
      if [ "$dt" -ge "$limit" ]; then status=TIMEOUT; note "stopped at the stage's ${limit} s limit"
      else status=FAIL; [ -s "$WORK/note_$name" ] || note "a command inside the stage timed out (exit code $rc)"; fi ;;
    *) status=FAIL ;;
  esac
  [ "$status" = ok ] || [ "$status" = skipped ] || FAILED+=("$name")
  local n; n=$(cat "$WORK/note_$name" 2>/dev/null || true)
  printf '%-10s %-8s %4s %7s %6s  %-15s %s\n' "$name" "$status" "$rc" "$dt" "$limit" "$log" "$n" >>"$SUMMARY"
  echo "[gpu_check] $name: $status (exit code $rc) in ${dt} s${n:+ - $n}"
  if [ "$status" != ok ] && [ "$status" != skipped ]; then
    echo "[gpu_check] last lines of $log:"
    tail -n 25 "$OUT/$log" | sed 's/^/    /'
  fi
}

run_stage env 20 env.txt
run_stage build 150 build.log
run_stage tests 120 tests.log
run_stage bench 60 bench.log
run_stage sanitizer 45 sanitizer.log
LEFT=$((BUDGET - (SECONDS - T_START) - KILL_GRACE))
if [ "$LEFT" -gt 120 ]; then LEFT=120; fi
LEFT=$((LEFT / SCALE))  # run_stage scales it back
if [ "$LEFT" -ge 20 ]; then
  run_stage rest "$LEFT" tests_rest.log
else
  printf '%-10s %-8s %4s %7s %6s  %-15s %s\n' rest skipped 0 0 "$LEFT" - "only ${LEFT} s of the budget left" \
    >>"$SUMMARY"
  echo "[gpu_check] rest: skipped, only ${LEFT} s of the ${BUDGET} s budget left"
fi

TOTAL=$((SECONDS - T_START))
if [ ${#FAILED[@]} -eq 0 ]; then
  echo "overall: ok in ${TOTAL} s" >>"$SUMMARY"
else
  echo "overall: FAIL in ${TOTAL} s (failed: ${FAILED[*]})" >>"$SUMMARY"
fi
echo
cat "$SUMMARY"
echo "[gpu_check] results in $OUT: $(cd "$OUT" && ls | tr '\n' ' ')"
[ ${#FAILED[@]} -eq 0 ]
