# Two entry points (see README): `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
EXTRAS ?= onnx,text,camera,test

.PHONY: setup demo test test-gpu lint format bench
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

# On a CUDA machine: the kernel tests with compiled Triton kernels (`make test` interprets
# them), then every gpu-marked test elsewhere (pytest's exit 5, "none collected", is fine).
test-gpu: setup
	@$(PY) -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else "make test-gpu needs a CUDA device; torch sees none")'
	env -u TRITON_INTERPRET $(PY) -m pytest -q --benchmark-disable -m "gpu or not slow" tests/kernels
	env -u TRITON_INTERPRET $(PY) -m pytest -q --benchmark-disable -m gpu --ignore=tests/kernels tests \
		|| [ $$? -eq 5 ]

format: setup
	$(PY) -m ruff format .
	$(PY) -m ruff check --fix .

bench: setup
	$(PY) -m pytest benchmarks --benchmark-only
