# Set-up lives here so a fresh clone needs exactly one command per job (see README.md).
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed

.PHONY: train test test-torch test-bench

# The oldest torch we support (README.md, Supported versions): `make test-torch` checks it in its own venv;
# `make test-torch TORCH=2.14.1 TORCHVISION=0.29.1` checks another release the same way.
TORCH ?= 2.12.0
TORCHVISION ?= 0.27.0
TORCH_VENV := .venv-torch$(TORCH)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -e ".[test,qlora]"
	touch $(STAMP)

train: $(STAMP)
	$(VENV)/bin/python train.py +experiment=shapes $(ARGS)

# Lint first (seconds): ruff (pyflakes, import order, formatting) and import-linter (the layering in pyproject.toml).
test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/lint-imports
	$(VENV)/bin/python -m pytest -q $(ARGS)

# Compiled steps never slower than eager, 0 graph breaks and 0 recompiles, then the compile, packing and
# accumulation tests, on the torch release named by TORCH (not part of CI: it installs a second torch).
test-torch: $(TORCH_VENV)/.installed
	$(TORCH_VENV)/bin/python -c "import torch; print('torch', torch.__version__)"
	$(TORCH_VENV)/bin/python train_debug.py --quick --expect-speedup
	$(TORCH_VENV)/bin/python -m pytest -q tests/test_compile.py tests/test_packing.py tests/test_accumulation.py $(ARGS)

$(TORCH_VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(TORCH_VENV)
	$(TORCH_VENV)/bin/pip install --quiet --upgrade pip
	$(TORCH_VENV)/bin/pip install --quiet "torch==$(TORCH)" "torchvision==$(TORCHVISION)" -e ".[test,qlora]"
	touch $@

# The lmms-eval benchmark tests (tests/test_benchmark.py) in .venv-bench, which has the bench extra: lmms-eval is
# large and pins other releases (wandb), so it stays out of the main venv and `make test` skips those tests.
BENCH_VENV := .venv-bench

test-bench: $(BENCH_VENV)/.installed
	$(BENCH_VENV)/bin/python -m pytest -q tests/test_benchmark.py $(ARGS)

$(BENCH_VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(BENCH_VENV)
	$(BENCH_VENV)/bin/pip install --quiet --upgrade pip
	$(BENCH_VENV)/bin/pip install --quiet -e ".[test,bench]"
	touch $@
