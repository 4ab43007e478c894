# The two commands of fastrl. Both create their environment if needed (scripts/env.sh: .venv with
# the CPU torch, or the python3 that already has torch) and rebuild fastrl._C when csrc/ changed.
#   make test    the test suite (no GPU needed; CUDA tests run where there is one)
#   make bench   the benchmark suite on the default shapes -> benchmarks/results/latest/
.PHONY: test bench env cmake-check clean

PYTEST_ARGS ?=
BENCH_ARGS ?=

env:
	@bash scripts/env.sh >/dev/null

test:
	@PY=$$(bash scripts/env.sh) && $$PY -m pytest -q $(PYTEST_ARGS)

bench:
	@PY=$$(bash scripts/env.sh) && $$PY -m fastrl.bench $(BENCH_ARGS)

# Compiles every csrc/cuda/*.cu with nvcc (no torch, no GPU) and runs the C++ header-math tests.
cmake-check:
	cmake -S . -B build/cmake -G Ninja >/dev/null && cmake --build build/cmake && ctest --test-dir build/cmake --output-on-failure

clean:
	rm -rf build python/fastrl/_C*.so python/*.egg-info
