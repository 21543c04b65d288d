# The README's two commands. Both set up .venv on a fresh clone first.
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
STAMP := $(VENV)/.tokred-installed

.PHONY: bench test

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install -e ".[dev]"
	touch $(STAMP)

bench: $(STAMP)
	$(VENV)/bin/tokred bench

test: $(STAMP)
	$(PY) -m pytest -q
