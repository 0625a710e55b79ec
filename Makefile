# Twin Pipelines: every target creates the virtual environment and installs on its own.
# make bench BENCH_ARGS=--quick: the benchmarks at tiny sizes (a smoke run, as CI's test does).
SHELL := /bin/bash
.SHELLFLAGS := -eo pipefail -c
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export MLFLOW_DISABLE_TELEMETRY := true
export DO_NOT_TRACK := 1
export DAGSTER_DISABLE_TELEMETRY := 1
export MLFLOW_SKIP_PIP_REQUIREMENTS_CHECK := true
export GX_ANALYTICS_ENABLED := false

.PHONY: venv demo test bench ui lint fmt protos protos-check clean

venv: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@echo "Installing into $(VENV) (pinned by constraints.txt; first time takes 1-3 min)..."
	@$(BIN)/python -m pip install --quiet --disable-pip-version-check -c constraints.txt \
		-e '.[pipelines,site,dev]' 2>&1 | { grep -v "is ignored: it is neither a file nor a directory" || true; }
	@touch $(STAMP)

demo: $(STAMP)            ## run the main job: cohort, 5 local site workers, 3 rounds, MLflow registry
	$(BIN)/twin demo

test: $(STAMP) protos-check   ## the whole test suite
	$(BIN)/python -m pytest

bench: $(STAMP)           ## benchmarks: one table, figures beside limits measured in the same run
	GRPC_VERBOSITY=NONE $(BIN)/python -m benchmarks $(BENCH_ARGS)

ui: $(STAMP)              ## site workers + MLflow UI (:5000) + Dagster UI (:3000)
	$(BIN)/twin ui

lint: $(STAMP)
	$(BIN)/ruff check .

fmt: $(STAMP)
	$(BIN)/ruff check --fix . && $(BIN)/ruff format .

protos: $(STAMP)          ## regenerate twin_wire/v1 from proto/
	$(BIN)/python -m grpc_tools.protoc -I proto --python_out=. --pyi_out=. --grpc_python_out=. \
		proto/twin_wire/v1/site.proto

protos-check: $(STAMP)    ## fail if the committed generated code is stale
	@tmp=$$(mktemp -d) && trap 'rm -rf $$tmp' EXIT && \
	$(BIN)/python -m grpc_tools.protoc -I proto --python_out=$$tmp --pyi_out=$$tmp \
		--grpc_python_out=$$tmp proto/twin_wire/v1/site.proto && \
	for f in site_pb2.py site_pb2.pyi site_pb2_grpc.py; do \
		diff -q $$tmp/twin_wire/v1/$$f twin_wire/v1/$$f >/dev/null || \
		{ echo "twin_wire/v1/$$f is stale: run make protos"; exit 1; }; \
	done

clean:
	rm -rf .twin .pytest_cache
