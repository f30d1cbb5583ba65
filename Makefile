# `make run` and `make test` set everything up on a fresh machine (Python 3.11 with pip).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
export PATH := $(abspath $(BIN)):$(PATH)
export DVC_NO_ANALYTICS := 1
export PYTHONUNBUFFERED := 1

.PHONY: run baseline test bench quality gpu-check install clean-outputs plots-template team-up team-down

# PyTorch build: cuda where nvidia-smi answers, else cpu (requirements-cuda.lock / requirements-cpu.lock);
# `make install TORCH=cuda` chooses it. pip installs without byte-compiling, and compileall then does it on
# every core (pip uses one), for the library's src/ too (where PYTHONDONTWRITEBYTECODE is set, no process would
# save what it compiles); files written for other Python versions fail to compile and are skipped, as pip skips them.
TORCH ?= $(if $(shell nvidia-smi -L 2>/dev/null),cuda,cpu)

$(BIN)/.installed-$(TORCH): requirements.lock requirements-$(TORCH).lock pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet --no-compile -r requirements.lock -r requirements-$(TORCH).lock
	$(BIN)/python -m pip install --quiet --no-deps -e .
	$(BIN)/python -m compileall -qq -j 0 $(VENV)/lib src > /dev/null || true
	rm -f $(BIN)/.installed-*
	touch $@

install: $(BIN)/.installed-$(TORCH)

# the pipeline, then the project's own summary (the data, FCD against its floors, the registered version, next steps)
run: install
	dvc repro
	$(BIN)/mnist-ldm summary

# the baseline git keeps (dvc.lock, metrics/, plots/curves/): the default params on the bundled subset, rebuilt
# after a change to the code and staged for the next commit (docs/pipeline.md, "The baseline in git")
baseline: install
	@test ! -e data/raw/mnist || { echo "error: data/raw/mnist exists; the baseline is the bundled subset's"; exit 2; }
	@git diff --quiet HEAD -- params.yaml || { echo "error: params.yaml differs from HEAD's; the baseline runs HEAD's"; \
		exit 2; }
	HF_HUB_OFFLINE=1 dvc repro
	$(BIN)/mnist-ldm summary
	git add dvc.lock metrics plots/curves

# pytest-xdist processes: three on two cores (the tests wait on servers and subprocesses a fifth of the
# time); each test module stays on one worker (its fixtures are built once)
TEST_WORKERS ?= 3

test: install
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder -m "not slow" -q --durations=15

# speed against this machine's own limit, and two jobs sharing its cores (about 6 minutes on 2 cores)
bench: install
	$(BIN)/python benchmarks/speed.py
	$(BIN)/python benchmarks/concurrent_jobs.py

# quality studies on full MNIST, after `make run` (each writes benchmarks/results/; about 1.5 hours in all)
quality: install
	$(BIN)/python benchmarks/quality_vs_steps.py
	$(BIN)/python benchmarks/design_table.py

gpu-check:  # on a machine with CUDA: the full-MNIST pipeline and the speed figures (needs only PyTorch)
	python3 benchmarks/gpu_check.py

# `dvc plots show/diff` draw offline: .dvc/plots_offline.html inlines pinned Vega builds from the npm registry
plots-template:
	python3 tools/plots_template.py

# the team's stack on this machine (docs/team.md): PostgreSQL, SeaweedFS's S3 and mlflow server, data under .team/
team-up: install
	$(BIN)/python tools/team.py up

team-down:
	$(BIN)/python tools/team.py down
