# Two commands set up a fresh machine:  make demo   and   make test
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
BIN := $(abspath $(VENV))/bin
STAMP := $(VENV)/.installed
CORES ?= all
DEMO_DIR := data/demo
DEMO_STAMP := $(DEMO_DIR)/.complete
export PATH := $(BIN):$(PATH)

.PHONY: install demo demo-data workflow test test-slurm lint format dag clean niivue

install: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	@touch $@

demo-data: $(DEMO_STAMP)

$(DEMO_STAMP): $(STAMP) src/radflow/demo/cohort.py
	$(BIN)/radflow demo-data $(DEMO_DIR) --threads 2
	@touch $@

workflow: $(STAMP) $(DEMO_STAMP)
	$(BIN)/snakemake --cores $(CORES)

demo: workflow

lint: $(STAMP)
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench
	$(BIN)/snakefmt --check Snakefile workflow/rules

format: $(STAMP)
	$(BIN)/ruff check --fix src tests bench
	$(BIN)/ruff format src tests bench
	$(BIN)/snakefmt Snakefile workflow/rules

test: $(STAMP) lint
	$(BIN)/python -m pytest -q --durations=20

# The workflow through a real single-node SLURM (installs slurm-wlm and munge, starts daemons):
# root on a throwaway Debian 12 machine only; see README "Testing cluster changes".
test-slurm: $(STAMP)
	bash ci/slurm-test.sh

# Refresh the vendored NiiVue build of the review page from the pin in web/package-lock.json
# (needs npm and the registry; the page itself never loads anything from the network).
niivue:
	cd web && npm ci --ignore-scripts --no-audit --no-fund
	cp web/node_modules/@niivue/niivue/dist/niivue.umd.js src/radflow/viewer/niivue.umd.js

dag: $(STAMP)
	$(BIN)/snakemake --rulegraph | dot -Tsvg > docs/rulegraph.svg
	$(BIN)/snakemake --rulegraph | dot -Tpng -Gdpi=110 > docs/rulegraph.png

clean:
	rm -rf results logs benchmarks .snakemake
