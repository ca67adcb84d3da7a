# Two commands do all the set-up: `make serve` and `make test`.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
DATA_DIR ?= /usr/share/datasets/fashion-mnist
STAMP := $(VENV)/.installed

.PHONY: serve test lint typecheck system-deps venv clean

$(STAMP): pyproject.toml setup.py
	@$(PY) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || { echo "apserve needs Python >= 3.11 ($(PY) is older)"; exit 1; }
	test -d $(VENV) || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

system-deps:
	@bash scripts/system-deps.sh

serve: system-deps venv
	$(BIN)/apserve serve --host 127.0.0.1 --port 8000

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy model_store kernels policies server loadtest

test: system-deps venv lint
	$(BIN)/python -m pytest -q -p no:cacheprovider

clean:
	rm -rf $(VENV) build *.egg-info
