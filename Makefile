# `make test` and `make quickstart` work on a fresh machine: they create .venv and install first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install test lint quickstart bench clean-quickstart

$(STAMP): requirements.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -r requirements.txt
	touch $(STAMP)

install: $(STAMP)

test: install
	$(BIN)/python -m pytest -q

lint: install
	$(BIN)/ruff check .

# Synthetic pedestrians (generated on first use), then their summary. Training steps join as they land.
quickstart: install
	$(BIN)/python -m data --config configs/quickstart/dgnet.yaml

bench: install
	$(BIN)/python bench/synthetic_bench.py
