# Set-up lives here so a fresh clone needs exactly one command per job (see README.md).
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed

.PHONY: train test

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -e ".[test]"
	touch $(STAMP)

train: $(STAMP)
	$(VENV)/bin/python train.py +experiment=shapes $(ARGS)

# Lint first (seconds): ruff (pyflakes, import order, formatting) and import-linter (the layering in pyproject.toml).
test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/lint-imports
	$(VENV)/bin/python -m pytest -q $(ARGS)
