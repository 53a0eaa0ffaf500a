# fewstep: `make demo` trains the built-in default; `make test` runs the test suite.
# Both create .venv and install the CPU torch wheel when no torch is importable.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH ?= torch==2.13.0

.PHONY: setup demo test test-fast test-slow bench digits digits-quick mutation clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

setup: $(BIN)/python
	@$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[dev,diffusers,digits]"

demo: setup
	$(BIN)/python -m core.run

# fast suite (parallel), then the slow quality suite; pytest's "no tests ran" (exit 5) fails the target
test: setup
	$(BIN)/python -m pytest -n 2 -m "not slow" -q
	$(BIN)/python -m pytest -n 2 -m "slow" -q

test-fast: setup
	$(BIN)/python -m pytest -n 2 -m "not slow" -q

test-slow: setup
	$(BIN)/python -m pytest -n 2 -m "slow" -q

bench: setup
	mkdir -p benchmarks/results
	FEWSTEP_BENCH_THREADS=1 $(BIN)/python -m pytest benchmarks -q --benchmark-only --benchmark-json=benchmarks/results/cpu.json

# the digits table (docs/methods/digits.md): <= 90 min on 2 CPU cores; digits-quick is a shorter pass
digits: setup
	OMP_NUM_THREADS=2 $(BIN)/python -m benchmarks.digits

digits-quick: setup
	OMP_NUM_THREADS=2 $(BIN)/python -m benchmarks.digits --quick

# mutation testing of the maths modules (not in CI; hours on 2 cores): mutmut, configured in pyproject.toml; prints
# the kill rate per module and writes benchmarks/results/mutation.md (see docs/mutation.md).
# MUTANTS="plugins.denoise.* core.schedules.*" runs only those (results of earlier runs are kept in mutants/);
# MUTANTS="$(.venv/bin/python tests/mutation_sample.py core.timesteps=3)" runs a deterministic sample.
MUTANTS ?=
mutation: setup
	$(BIN)/python -m pip install -q -e ".[mutation]"
	OMP_NUM_THREADS=1 nice -n 10 $(BIN)/mutmut run --max-children 1 $(MUTANTS)
	$(BIN)/python tests/mutation_report.py benchmarks/results/mutation.md

clean:
	rm -rf $(VENV) runs .pytest_cache .benchmarks mutants

# the distillation quality sweep (docs/methods/quality.md): every objective x mixture x seed on all cores
.PHONY: quality
quality: setup
	OMP_NUM_THREADS=1 $(BIN)/python -m benchmarks.quality

# the GPU suite (issue 15): installs the wheels in .whl when present, writes benchmarks/results/gpu-<device>.*
.PHONY: gpu-check
gpu-check:
	PY=$(PY) bash benchmarks/gpu_check.sh
