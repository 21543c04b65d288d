# The README's commands. Each sets up its virtual environment on a fresh clone first.
#   make test        the suite on the newest releases the resolver picks (.venv)
#   make test-floor  the suite on the lowest supported releases, constraints/floor.txt (.venv-floor)
VENV ?= .venv
FLOOR_VENV ?= .venv-floor
FLOOR := constraints/floor.txt
PYTHON ?= python3
PY := $(VENV)/bin/python
FLOOR_PY := $(FLOOR_VENV)/bin/python
STAMP := $(VENV)/.tokred-installed
FLOOR_STAMP := $(FLOOR_VENV)/.tokred-installed
# prints the releases a run uses
VERSIONS := -c "import importlib.metadata as m; print('versions:', *(p + '==' + m.version(p) for p in ('torch', 'torchvision', 'transformers', 'timm', 'open_clip_torch')))"

.PHONY: bench test test-floor

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install -e ".[dev]"
	touch $(STAMP)

$(FLOOR_STAMP): pyproject.toml $(FLOOR)
	test -x $(FLOOR_PY) || $(PYTHON) -m venv $(FLOOR_VENV)
	$(FLOOR_PY) -m pip install --upgrade pip
	$(FLOOR_PY) -m pip install -e ".[dev]" -c $(FLOOR)
	touch $(FLOOR_STAMP)

bench: $(STAMP)
	$(VENV)/bin/tokred bench

test: $(STAMP)
	$(PY) $(VERSIONS)
	$(PY) -m pytest -q

test-floor: $(FLOOR_STAMP)
	$(FLOOR_PY) $(VERSIONS)
	$(FLOOR_PY) -m pytest -q
