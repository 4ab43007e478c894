#!/usr/bin/env bash
# The one script to run on a GPU machine (a python3 with a CUDA build of torch, nvcc, ninja; no
# network needed):
#   1. builds fastrl._C with the CUDA kernels (pip install --no-build-isolation -e ., FASTRL_CUDA=1)
#      for this GPU's architecture (TORCH_CUDA_ARCH_LIST, unless already set),
#   2. runs the whole test suite except `slow` tests, CUDA-marked tests included,
#   3. runs the benchmarks: python -m fastrl.bench --out benchmarks/results/<gpu-name-slug>.
# A failing step does not stop the later ones (the benchmarks run even if tests fail); the script
# exits non-zero at the end if any step failed. Logs go to $OUT (if set) or build/gpu_check/, and
# with $OUT set the benchmark results are copied there too.
#
#   PYTHON=/path/to/python scripts/gpu_check.sh        # default: python3
#   PYTEST_ARGS="-x -k advantages" scripts/gpu_check.sh
#   BENCH_ARGS="..." scripts/gpu_check.sh              # extra arguments for python -m fastrl.bench
#   CXX=... scripts/gpu_check.sh                       # host compiler (default: /usr/bin/g++ if present)
# The tests run under pytest-xdist (-n 8) when it is installed: the GPU machine's cores sit idle otherwise.
set -euo pipefail
cd "$(dirname "$0")/.."

PY="${PYTHON:-python3}"
LOG_DIR="${OUT:-build/gpu_check}"
mkdir -p "$LOG_DIR"
LOG_DIR="$(cd "$LOG_DIR" && pwd)"
failed=()

say() { echo "== $*" | tee -a "$LOG_DIR/gpu_check.log"; }

# run NAME CMD...: runs CMD with its output on the console and in $LOG_DIR/NAME.log; records a
# failure instead of exiting.
run() {
  local name="$1"
  shift
  say "$name: $*"
  local rc=0
  "$@" 2>&1 | tee "$LOG_DIR/$name.log" || rc=$?
  if [ "$rc" -ne 0 ]; then
    say "$name FAILED (exit $rc), log: $LOG_DIR/$name.log"
    failed+=("$name")
  fi
  return 0
}

# --- the machine -------------------------------------------------------------------------------
say "gpu_check $(date -u +%Y-%m-%dT%H:%M:%SZ) in $PWD, logs in $LOG_DIR"
MACHINE_LOG="$LOG_DIR/gpu_check.log"
{ nvidia-smi || true; nvcc --version || true; } >>"$MACHINE_LOG" 2>&1
if ! "$PY" - >>"$MACHINE_LOG" 2>&1 <<'PY'
import sys, torch
print("python", sys.version.split()[0], "| torch", torch.__version__, "| torch cuda", torch.version.cuda)
assert torch.version.cuda is not None, "this torch is a CPU-only build"
assert torch.cuda.is_available(), "torch.cuda.is_available() is False"
for i in range(torch.cuda.device_count()):
    print(f"cuda:{i}", torch.cuda.get_device_name(i), "sm_%d%d" % torch.cuda.get_device_capability(i))
PY
then
  say "no usable CUDA torch/GPU for $PY (see above): nothing to check"
  exit 1
fi

# A g++ that links libstdc++ statically into fastrl._C (seen on the GPU image: /opt/gcc/bin/g++, a
# wrapper whose -B dir holds only libstdc++.a) builds a module that segfaults on the first error
# message an op formats. The system g++ links it dynamically, sharing libtorch's.
if [ -z "${CXX:-}" ] || [ "${CXX:-}" = /opt/gcc/bin/g++ ]; then
  if [ -x /usr/bin/g++ ]; then export CXX=/usr/bin/g++ CC=/usr/bin/gcc; fi
fi
say "host compiler: ${CXX:-default} ($(${CXX:-c++} --version 2>/dev/null | head -1))"

if [ -z "${TORCH_CUDA_ARCH_LIST:-}" ]; then
  TORCH_CUDA_ARCH_LIST="$("$PY" -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability(0))')"
fi
export TORCH_CUDA_ARCH_LIST
export MAX_JOBS="${MAX_JOBS:-$(nproc)}"
GPU_SLUG="$("$PY" -c '
import re, torch
print(re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(0).lower()).strip("-") or "gpu")')"
RESULTS="benchmarks/results/$GPU_SLUG"
say "TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST MAX_JOBS=$MAX_JOBS results=$RESULTS"

# --- 1. build ------------------------------------------------------------------------------------
run build env FASTRL_CUDA=1 "$PY" -m pip install --no-build-isolation --no-deps --no-index -v -e .
run cuda_build_check "$PY" -c '
import fastrl, torch
from fastrl import _extension
assert _extension.cuda_built(), "fastrl._C was built without the CUDA kernels"
print("fastrl._C with CUDA kernels; torch", torch.__version__, "on", torch.cuda.get_device_name(0))'

# --- 2. tests (everything but `slow`; the cuda-marked tests run here) ---------------------------
XDIST=""
if "$PY" -c "import xdist" 2>/dev/null; then XDIST="-n ${PYTEST_WORKERS:-8}"; fi
# shellcheck disable=SC2086
run tests "$PY" -m pytest -q -ra -m "not slow" -p no:cacheprovider $XDIST ${PYTEST_ARGS:-}

# --- 3. benchmarks -------------------------------------------------------------------------------
mkdir -p "$RESULTS"
# shellcheck disable=SC2086
run bench "$PY" -m fastrl.bench --out "$RESULTS" ${BENCH_ARGS:-}
if [ -n "${OUT:-}" ] && [ -d "$RESULTS" ]; then
  mkdir -p "$OUT/results"
  cp -r "$RESULTS" "$OUT/results/" || true
fi

# --- summary -------------------------------------------------------------------------------------
if [ "${#failed[@]}" -ne 0 ]; then
  say "FAILED: ${failed[*]} (logs in $LOG_DIR)"
  exit 1
fi
say "all steps passed (logs in $LOG_DIR, benchmark results in $RESULTS)"
