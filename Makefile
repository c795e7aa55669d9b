# Every target creates .venv on first use: torch first (CPU wheel by default), then clora editable.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.clora-installed

.PHONY: demo test test-all lint clean-venv

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e ".[test,lint]"
	touch $(STAMP)

demo: $(STAMP)
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" bash scripts/demo.sh

test: $(STAMP)
	$(PY) -m pytest

test-all: $(STAMP)
	$(PY) -m pytest -m ""

lint: $(STAMP)
	$(VENV)/bin/ruff check clora plugins tests benchmarks examples
	$(VENV)/bin/ruff format --check clora plugins tests benchmarks examples
	$(VENV)/bin/mypy
	$(VENV)/bin/mypy benchmarks

clean-venv:
	rm -rf $(VENV)
