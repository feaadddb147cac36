#!/usr/bin/env bash
# Run the C++ CPU kernels under AddressSanitizer + UndefinedBehaviorSanitizer.
#
#   scripts/sanitize.sh [extra pytest args]
#
# 1. builds pni_fast._C (CPU kernels only) with -fsanitize=address,undefined into a
#    temporary folder (the normal build in pni_fast/ is never touched);
# 2. puts a copy of the Python package next to that library, so `import pni_fast`
#    loads the sanitized kernels (checked before the tests run);
# 3. runs tests/backends/test_cpu_kernel.py and the cpu backend's kernel contract tests against it
#    with libasan preloaded into Python
#    (an uninstrumented executable) and fails on any sanitizer report, also one
#    printed by a subprocess that a test starts.
# Needs the venv of scripts/setup_venv.sh and gcc. Environment:
#   PYTHON                    interpreter (default: .venv/bin/python)
#   PNI_FAST_SANITIZE_DIR     work folder to use and keep (a second run rebuilds only changed
#                             sources); default: a temporary folder, removed at the end
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-$ROOT/.venv/bin/python}
[ -x "$PY" ] || { echo "sanitize.sh: $PY not found (run scripts/setup_venv.sh first)" >&2; exit 2; }
command -v gcc >/dev/null || { echo "sanitize.sh: gcc not found" >&2; exit 2; }

if [ -n "${PNI_FAST_SANITIZE_DIR:-}" ]; then
  mkdir -p "$PNI_FAST_SANITIZE_DIR"
  WORK=$(cd "$PNI_FAST_SANITIZE_DIR" && pwd)
  rm -rf "$WORK/pkg/pni_fast" "$WORK/reports"
else
  WORK=$(mktemp -d "${TMPDIR:-/tmp}/pni_fast_sanitize.XXXXXX")
  trap 'rm -rf "$WORK"' EXIT
fi
start=$(date +%s)

# --- 1. sanitized build (setup.py appends PNI_FAST_EXTRA_CXXFLAGS / _LDFLAGS) ------------------
SAN="-fsanitize=address,undefined -fno-omit-frame-pointer -fno-sanitize-recover=undefined"
echo "sanitize.sh: building the CPU kernels with $SAN"
(
  cd "$ROOT"
  FORCE_ONLY_CPU=1 PNI_FAST_EXTRA_CXXFLAGS="$SAN -g" PNI_FAST_EXTRA_LDFLAGS="$SAN" \
    "$PY" setup.py -q build_ext --build-lib "$WORK/pkg" --build-temp "$WORK/build" >"$WORK/build.log" 2>&1
) || { tail -n 60 "$WORK/build.log" >&2; echo "sanitize.sh: build FAILED" >&2; exit 1; }
LIB=$(ls "$WORK"/pkg/pni_fast/_C*.so)
# the symbol table goes to a file first: `nm | grep -q` under pipefail fails at random (grep exits at the
# first match, nm then dies of SIGPIPE and the pipeline reports its 141)
nm -D "$LIB" >"$WORK/symbols.txt"
grep -q __asan_report_load "$WORK/symbols.txt" || { echo "sanitize.sh: $LIB has no ASan instrumentation" >&2; exit 1; }
grep -q __ubsan_handle_ "$WORK/symbols.txt" || { echo "sanitize.sh: $LIB has no UBSan instrumentation" >&2; exit 1; }

# --- 2. the Python package beside the sanitized library -------------------------------------
(cd "$ROOT" && find pni_fast -name '*.py' -not -path '*/__pycache__/*' | while read -r f; do
  mkdir -p "$WORK/pkg/$(dirname "$f")"
  cp "$f" "$WORK/pkg/$f"
done)

# --- 3. the tests, with the ASan runtime first in the process --------------------------------
PRELOAD="$(gcc -print-file-name=libasan.so):$(gcc -print-file-name=libstdc++.so)"
export LD_PRELOAD="$PRELOAD"
# reports go to files (pytest captures stderr, and a process that ASan aborts loses it):
# one file per reporting process, subprocesses of the tests included
mkdir -p "$WORK/reports"
export ASAN_OPTIONS="detect_leaks=0:log_path=$WORK/reports/asan"
export UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1:log_path=$WORK/reports/ubsan"
export PYTHONPATH="$WORK/pkg"
export PNI_FAST_NO_JIT=1  # a library that fails to load must fail here, not be rebuilt without sanitizers
cd "$WORK"                # so the checkout's own pni_fast is not on sys.path

"$PY" - "$LIB" <<'EOF'
import os, sys
import pni_fast, pni_fast._ext as ext
lib = sys.argv[1]
assert ext.load(), f"sanitized build did not load: {ext.status_message()}"
import pni_fast._C as C
assert os.path.samefile(C.__file__, lib), (C.__file__, lib)
maps = open("/proc/self/maps").read()
assert "libasan" in maps and "libubsan" in maps, "sanitizer runtimes are not loaded"
print(f"sanitize.sh: testing {lib}")
EOF

set +e
# the C++ CPU kernel's own tests, the kernel contract (tests/backends/test_kernels_*.py) for the cpu backend, and the
# eager fast path (tests/ops/test_fast_path.py: csrc/cpu/noisy_cpu.cpp, stored noise)
PNI_TEST_BACKENDS=cpu "$PY" -m pytest -q -p no:cacheprovider "$ROOT/tests/backends/test_cpu_kernel.py" "$ROOT"/tests/backends/test_kernels_*.py \
  "$ROOT/tests/ops/test_fast_path.py" \
  "$@" 2>&1 | tee "$WORK/pytest.log"
rc=${PIPESTATUS[0]}
set -e
reports=$(cat "$WORK"/reports/* "$WORK/pytest.log" 2>/dev/null |
  grep -cE "ERROR: AddressSanitizer|runtime error:|SUMMARY: (Address|UndefinedBehavior)Sanitizer" || true)
if [ "$reports" -ne 0 ]; then
  for f in "$WORK"/reports/*; do
    [ -f "$f" ] && { echo "=== $f"; head -n 80 "$f"; }
  done
fi
echo "sanitize.sh: pytest exit $rc, sanitizer reports: $reports, $(( $(date +%s) - start )) s"
if [ "$rc" -ne 0 ] || [ "$reports" -ne 0 ]; then
  echo "sanitize.sh: FAILED" >&2
  exit 1
fi
echo "sanitize.sh: OK"
