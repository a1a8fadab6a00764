# Two entry points (see README): `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
EXTRAS ?= onnx,text,camera,test

.PHONY: setup demo test lint format bench
setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "Python >= 3.11 is required (set PYTHON=python3.11)")'
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade --quiet "pip>=23"
	$(PY) -m pip install --quiet -c constraints.txt -e ".[$(EXTRAS)]"
	@touch $@

demo: setup
	$(PY) -m engine.build --category pushpins

lint: setup
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

test: lint
	TRITON_INTERPRET=1 $(PY) -m pytest -q --benchmark-disable

format: setup
	$(PY) -m ruff format .
	$(PY) -m ruff check --fix .

bench: setup
	$(PY) -m pytest benchmarks --benchmark-only
