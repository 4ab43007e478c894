#!/usr/bin/env bash
# Prints the Python interpreter that `make test` / `make bench` use, after making sure it has what
# fastrl needs and that fastrl._C is built from the current sources.
#   - FASTRL_PYTHON=/path/to/python: use that interpreter.
#   - else a python3 that already imports torch (a GPU box with its own CUDA torch): use it as is.
#   - else create .venv with the CPU torch 2.13.0 wheel.
# Everything the script itself prints except the interpreter path goes to stderr.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ -n "${FASTRL_PYTHON:-}" ]; then
  py="$FASTRL_PYTHON"
elif python3 -c "import torch" 2>/dev/null; then
  py="$(command -v python3)"
else
  if [ ! -x .venv/bin/python ]; then
    echo "[fastrl] creating .venv" >&2
    python3 -m venv .venv >&2
    .venv/bin/python -m pip install -q --upgrade pip >&2
  fi
  py="$PWD/.venv/bin/python"
fi

# module:requirement pairs; only missing ones are installed (a GPU box without network has them).
reqs="torch:torch==2.13.0 numpy:numpy pybind11:pybind11 ninja:ninja setuptools:setuptools>=64 wheel:wheel
pytest:pytest hypothesis:hypothesis matplotlib:matplotlib triton:triton verl:verl==0.9.1 trl:trl==1.16.0
cachetools:cachetools uvicorn:uvicorn fastapi:fastapi IPython:ipython"
# (triton: its kernels run in the tests under TRITON_INTERPRET=1. The last four: modules verl's
# ray_trainer imports without declaring them; the end-to-end test of
# verl's compute_advantage with our estimators installed needs that module)
missing=$("$py" - "$reqs" <<'PY'
import importlib.util, sys
for pair in sys.argv[1].split():
    mod, req = pair.split(":", 1)
    if importlib.util.find_spec(mod) is None:
        print(req)
PY
)
if [ -n "$missing" ]; then
  echo "[fastrl] installing:" $missing >&2
  # torch first and alone, so that verl/trl see it installed and don't pull another build
  if echo "$missing" | grep -q '^torch=='; then "$py" -m pip install -q torch==2.13.0 >&2; fi
  others=$(echo "$missing" | grep -v '^torch==' || true)
  if [ -n "$others" ]; then "$py" -m pip install -q $others >&2 || echo "[fastrl] warning: could not install:" $others >&2; fi
fi

# (Re)build fastrl._C when it is missing or older than any source file.
so=$(ls python/fastrl/_C*.so 2>/dev/null | head -n 1 || true)
if [ -z "$so" ] || [ -n "$(find csrc setup.py -newer "$so" -type f 2>/dev/null | head -n 1)" ]; then
  echo "[fastrl] building fastrl._C (pip install --no-build-isolation -e .)" >&2
  MAX_JOBS="${MAX_JOBS:-$(nproc)}" "$py" -m pip install -q --no-build-isolation --no-deps -e . >&2
fi
echo "$py"
