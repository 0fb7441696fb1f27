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
# (.dvc/config core.analytics false); the same switches here (lmforge.TELEMETRY_OFF) reach the servers
# this Makefile starts (`make ui`, `make prefect-server`). `?=`: a value in your environment wins.
export DO_NOT_TRACK ?= 1
export MLFLOW_DISABLE_TELEMETRY ?= true
export DVC_NO_ANALYTICS ?= 1
export PREFECT_SERVER_ANALYTICS_ENABLED ?= false
export HF_HUB_DISABLE_TELEMETRY ?= 1
# pip stays quiet too.
export PIP_DISABLE_PIP_VERSION_CHECK := 1
# DVC stages call `python -m stages.<name>`: make that the venv's python.
export PATH := $(BIN):$(PATH)

.PHONY: setup run repro compare test test-gpu plots bench ui prefect-server docs params

# Reinstall only when pyproject.toml or the torch spec changed (idempotent set-up). PYTHONWARNINGS: no
# setuptools "Editable installation" banner (pip's -q does not reach the build backend's warnings).
# --no-compile, then compileall on every core: pip byte-compiles one file at a time (138 s of set-up
# against 102 s this way, measured on 2 cores). Compiled here, not left to first import: with
# PYTHONDONTWRITEBYTECODE set, every process would compile torch again. Not the libraries' own test
# suites (`tests/` directories: 14 % of the files, nothing imports them; 44 s -> 37 s, measured), nor
# transformers' 560 model families but the two lmforge loads (`auto`, `llama`: the HF export and the
# harness); 37 s -> 31 s, measured. A module left out still runs: Python compiles it when imported.
# compileall exits 1 for the few files written for newer Pythons (pip skips those too): that is
# not a failed set-up.
setup:
	@want="$(TORCH) $$(cksum < pyproject.toml)"; \
	if [ ! -x "$(BIN)/python" ] || [ "$$(cat $(STAMP) 2>/dev/null)" != "$$want" ]; then \
		echo "set-up (once; again only when pyproject.toml or TORCH change): .venv/, then $(TORCH),"; \
		echo "then lmforge and its dependencies (a minute or two, quietly)..."; \
		$(PYTHON) -m venv $(VENV); \
		$(BIN)/python -m pip install --quiet --upgrade pip 2>&1 | { grep -v "^WARNING: Location" || true; }; \
		$(BIN)/python -m pip install --quiet --no-compile $(TORCH) 2>&1 | { grep -v "^WARNING: Location" || true; }; \
		PYTHONWARNINGS="ignore:Editable installation" $(BIN)/python -m pip install --quiet --no-compile -e ".[dev]" 2>&1 | { grep -v "^WARNING: Location" || true; }; \
		$(BIN)/python -m compileall -q -j 0 -x '/tests?/|/transformers/models/(?!(auto|llama)/)' "$$($(BIN)/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')" > /dev/null || true; \
		$(BIN)/python -c "import torch, lmforge, stages" ; \
		echo "$$want" > $(STAMP); \
		echo "set-up done"; \
	fi

# The pipeline, then the run saved as the DVC experiment `baseline` (with dvc.lock and the outputs in
# DVC's cache), so `make compare` has it to compare with and `dvc exp apply baseline` brings it back;
# only while params.yaml is the committed one (after `dvc exp run -S`, the run is that experiment's).
run: setup
	@$(MAKE) --no-print-directory repro
	@if git diff --quiet HEAD -- params.yaml 2>/dev/null; then \
		$(BIN)/dvc exp save -n baseline -f && echo "compare experiments with it: make compare"; \
	else \
		echo "params.yaml differs from the last commit: this run is not saved as the baseline"; \
	fi

# The baseline, the workspace and each experiment: the params that differ, the headline figures.
compare: setup
	$(BIN)/python -m lmforge.evaluate.compare

# `dvc repro`, less DVC's closing "Use `dvc push` ..." when no remote is configured (nothing to push
# to: DVC has no setting for it). Unbuffered, so DVC's lines keep their place among the stages'.
repro:
	@if [ -n "$$($(BIN)/dvc remote list)" ]; then $(BIN)/dvc repro; \
	else PYTHONUNBUFFERED=1 $(BIN)/dvc repro | { grep --line-buffered -v '^Use `dvc push`' || true; }; fi

# Two test processes (the cores), each file's tests on one of them (module fixtures are built once),
# files handed out in collection order, which tests/conftest.py starts with the longest
# (LONGEST_FIRST), so no long file runs alone at the end.
# The project's bytecode first: the suite starts ~450 processes that import lmforge, and where
# PYTHONDONTWRITEBYTECODE is set each would compile it again (0.15-0.3 CPU-s apiece, measured).
test: setup
	@$(BIN)/python -m compileall -q -j 0 lmforge stages flows > /dev/null
	$(BIN)/python -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder

# The CUDA tests (tests/gpu/: bf16 + compile, fp16, torchrun FSDP2 over NCCL, kill and resume,
# export, LoRA; fp8 on compute capability >= 8.9). They skip where torch sees no GPU; keep a CUDA
# build: `make test-gpu TORCH=torch`.
test-gpu: setup
	$(BIN)/python -m pytest -q -rs tests/gpu

# The MLflow UI on the store the stages use (MLFLOW_TRACKING_URI, else the embedded sqlite:///mlflow.db);
# open the runs table it prints (not the Traces page). A tracking server serves its own UI.
# (MLflow's GenAI job workers off: seven processes lmforge's runs never use; set the variable to keep them.)
ui: setup
	@uri="$${MLFLOW_TRACKING_URI:-sqlite:///mlflow.db}"; runs="#/experiments/1/runs?workflowType=machine_learning"; \
	case "$$uri" in http://*|https://*) echo "MLFLOW_TRACKING_URI is a server: open $${uri%/}/$$runs"; exit 0;; esac; \
	echo "MLflow runs ($$uri): http://127.0.0.1:5000/$$runs"; \
	MLFLOW_SERVER_ENABLE_JOB_EXECUTION=$${MLFLOW_SERVER_ENABLE_JOB_EXECUTION:-false} \
		exec $(BIN)/mlflow ui --backend-store-uri "$$uri" --host 127.0.0.1 --port 5000

# The Prefect server the flow reports to (then `export PREFECT_API_URL=http://127.0.0.1:4200/api`).
prefect-server: setup
	$(BIN)/prefect server start --host 127.0.0.1

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
