# Two entry points: `make run` (the pipeline on the built-in corpus, saved as the DVC experiment
# `baseline`) and `make test`; after a run, `make compare` puts experiments beside the baseline,
# `make plots` draws dvc.yaml's plots into reports/plots/*.svg, offline; `make docs` builds
# the docs site into site/ (offline; `make test` builds it too, strictly, in tests/test_docs.py).
# All create .venv/ and install torch first (pinned CPU build by default; override
# with e.g. `make run TORCH=torch` to keep a CUDA build), then the project.

SHELL := /bin/bash
.SHELLFLAGS := -eo pipefail -c
PYTHON ?= python3
TORCH ?= torch==2.13.0
VENV := .venv
BIN := $(CURDIR)/$(VENV)/bin
STAMP := $(VENV)/.installed

# Telemetry is off in every process that imports lmforge (lmforge.quiet_env) and in DVC's own
# (.dvc/config core.analytics false); pip stays quiet too.
export PIP_DISABLE_PIP_VERSION_CHECK := 1
# DVC stages call `python -m stages.<name>`: make that the venv's python.
export PATH := $(BIN):$(PATH)

.PHONY: setup run compare test test-gpu plots bench ui docs params

# Reinstall only when pyproject.toml or the torch spec changed (idempotent set-up).
setup:
	@want="$(TORCH) $$(cksum < pyproject.toml)"; \
	if [ ! -x "$(BIN)/python" ] || [ "$$(cat $(STAMP) 2>/dev/null)" != "$$want" ]; then \
		$(PYTHON) -m venv $(VENV); \
		$(BIN)/python -m pip install --quiet --upgrade pip 2>&1 | { grep -v "^WARNING: Location" || true; }; \
		$(BIN)/python -m pip install --quiet $(TORCH) 2>&1 | { grep -v "^WARNING: Location" || true; }; \
		$(BIN)/python -m pip install --quiet -e ".[dev]" 2>&1 | { grep -v "^WARNING: Location" || true; }; \
		$(BIN)/python -c "import torch, lmforge, stages" ; \
		echo "$$want" > $(STAMP); \
	fi

# The pipeline, then the run saved as the DVC experiment `baseline` (with dvc.lock and the outputs in
# DVC's cache), so `make compare` has it to compare with and `dvc exp apply baseline` brings it back;
# only while params.yaml is the committed one (after `dvc exp run -S`, the run is that experiment's).
run: setup
	$(BIN)/dvc repro
	@if git diff --quiet HEAD -- params.yaml 2>/dev/null; then \
		$(BIN)/dvc exp save -n baseline -f && echo "compare experiments with it: make compare"; \
	else \
		echo "params.yaml differs from the last commit: this run is not saved as the baseline"; \
	fi

# The baseline, the workspace and each experiment: the params that differ, the headline figures.
compare: setup
	$(BIN)/python -m lmforge.evaluate.compare

# Two test processes, each file's tests on one of them (module fixtures are built once): the
# suite waits on subprocesses and servers about half the time, so this halves its wall time.
test: setup
	$(BIN)/python -m pytest -q -n 2 --dist loadfile

# The CUDA tests (tests/gpu/: bf16 + compile, fp16, torchrun FSDP2 over NCCL, kill and resume,
# export, LoRA). They skip where torch sees no GPU; keep a CUDA build: `make test-gpu TORCH=torch`.
test-gpu: setup
	$(BIN)/python -m pytest -q -rs tests/gpu

# The MLflow UI on the embedded store; open the runs table it prints (not the Traces page).
ui: setup
	@echo "MLflow runs: http://127.0.0.1:5000/#/experiments/1/runs?workflowType=machine_learning"
	$(BIN)/mlflow ui --backend-store-uri sqlite:///mlflow.db --host 127.0.0.1 --port 5000

# The Vega-Lite specs of `dvc plots show --json`, rendered by vl-convert (no browser, no CDN).
plots: setup
	$(BIN)/python -m lmforge.evaluate.plots

# params.yaml and docs/reference/params.md, regenerated from the typed params (lmforge/core/*_params.py:
# defaults, descriptions, docstrings) after a knob is added or changed; tests/test_params_yaml.py and
# tests/test_params_reference.py fail until they are.
params: setup
	$(BIN)/python -m lmforge.core.params_yaml > params.yaml.new && mv params.yaml.new params.yaml
	$(BIN)/python -m lmforge.core.params_reference > docs/reference/params.md.new && mv docs/reference/params.md.new docs/reference/params.md

# The docs site (mkdocs.yml, docs/) into site/: open site/index.html, no server or network needed.
docs: setup
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --site-dir site

bench: setup
	$(BIN)/python bench/data_prep.py
