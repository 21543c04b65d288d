# The README's commands. Each sets up its virtual environment on a fresh clone first.
#   make bench       the demo benchmark and the VLM accuracy subset (.venv)
#   make test        the suite on the newest releases the resolver picks (.venv)
#   make test-floor  the suite on the lowest supported releases, constraints/floor.txt (.venv-floor)
#   make test-wheel  builds the wheel, installs it alone in a fresh venv (.venv-wheel, created for the run
#                    and removed after it, nothing shared with .venv) and runs the CLI from a temporary folder outside
#                    the source tree: the demo assets must come from the wheel
VENV ?= .venv
FLOOR_VENV ?= .venv-floor
WHEEL_VENV ?= .venv-wheel
LMMS_VENV ?= .venv-lmms
FLOOR := constraints/floor.txt
PYTHON ?= python3
PY := $(VENV)/bin/python
FLOOR_PY := $(FLOOR_VENV)/bin/python
STAMP := $(VENV)/.tokred-installed
FLOOR_STAMP := $(FLOOR_VENV)/.tokred-installed
LMMS_PY := $(LMMS_VENV)/bin/python
LMMS_STAMP := $(LMMS_VENV)/.tokred-installed
# prints the releases a run uses
VERSIONS := -c "import importlib.metadata as m; print('versions:', *(p + '==' + m.version(p) for p in ('torch', 'torchvision', 'transformers', 'timm', 'open_clip_torch')))"

.PHONY: bench test test-floor test-wheel test-lmms

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

# the demo benchmark, then the fast subset of the VLM accuracy sweep (the shipped digits VLM on its
# 200-question slice, every default reducer at 1/4 and 1/8 of the visual tokens; about 2 minutes)
bench: $(STAMP)
	$(VENV)/bin/tokred bench
	$(VENV)/bin/tokred sweep --model "$$($(PY) -c 'import tokred.reference as r; print(r.assets_dir() / "digits_vlm")')" \
		--keeps 0.25,0.125 --max-new-tokens 24 --out results/sweep_vlm_subset

test: $(STAMP)
	$(PY) $(VERSIONS)
	$(PY) -m pytest -q

test-floor: $(FLOOR_STAMP)
	$(FLOOR_PY) $(VERSIONS)
	$(FLOOR_PY) -m pytest -q

# tokred[lmms] (lmms-eval and its ~100 dependencies) in its own venv, layered over $(VENV) so that no second
# torch is downloaded: a .pth line puts $(VENV)'s site-packages after the new venv's own, and a constraints
# file pins torch/torchvision to $(VENV)'s releases. What lmms-eval adds or upgrades lands in $(LMMS_VENV) only.
$(LMMS_STAMP): $(STAMP) pyproject.toml
	test -x $(LMMS_PY) || $(PYTHON) -m venv $(LMMS_VENV)
	$(PY) -c "import sysconfig; print(sysconfig.get_paths()['purelib'])" \
	  > "$$($(LMMS_PY) -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")/tokred-base-venv.pth"
	$(PY) -c "import importlib.metadata as m; print(*(p + '==' + m.version(p) for p in ('torch', 'torchvision')), sep='\n')" \
	  > $(LMMS_VENV)/constraints.txt
	$(LMMS_PY) -m pip install -e ".[lmms]" -c $(LMMS_VENV)/constraints.txt
	touch $(LMMS_STAMP)

# The lmms-eval plugin's tests (tests/test_lmms_eval.py: the CLI on the local digits tasks, one and two real
# ranks under accelerate launch --multi_gpu, a bad spec's non-zero exit, tokred report, the Python API);
# `make test` skips them because $(VENV) has no lmms-eval.
test-lmms: $(LMMS_STAMP)
	$(LMMS_PY) $(VERSIONS)
	$(LMMS_PY) -c "import importlib.metadata as m; print('versions:', *(p + '==' + m.version(p) for p in ('lmms-eval', 'datasets', 'accelerate', 'filelock')))"
	$(LMMS_PY) -m pytest -q tests/test_lmms_eval.py

# The wheel builds without a warning from setuptools (issue 24: `project.license` as a table, undeclared asset
# folders). Short runs (about a minute in all): the reference model on 64 digits with two settings and three
# timing rounds, the picture of one digit, and the one-line message of a missing extra (the wheel
# venv has no scikit-learn, which `tokred sweep` needs).
test-wheel:
	rm -rf dist build $(WHEEL_VENV)
	$(PYTHON) -m venv $(WHEEL_VENV)
	$(WHEEL_VENV)/bin/python -m pip install --upgrade pip
	mkdir -p dist
	$(WHEEL_VENV)/bin/python -m pip wheel -v --no-deps -w dist . > dist/build.log 2>&1 || { cat dist/build.log; exit 1; }
	! grep -E '[A-Z][A-Za-z]*Warning:' dist/build.log  # the build warns of nothing (setuptools' deprecations, undeclared data)
	$(WHEEL_VENV)/bin/python -m pip install dist/tokred-*.whl
	set -e; WHEEL_BIN="$$(pwd)/$(WHEEL_VENV)/bin"; RUN="$$(mktemp -d)"; cd "$$RUN"; \
	"$$WHEEL_BIN/python" -c "import tokred, tokred.reference as r; print('tokred from', tokred.__file__); assert '$(CURDIR)/tokred' not in tokred.__file__; print('assets from', r.assets_dir())"; \
	"$$WHEEL_BIN/tokred" --version; \
	"$$WHEEL_BIN/tokred" bench --limit 64 --batch-size 64 --rounds 3 --reducers none,tome:r=4 --threads 1 --no-progress; \
	"$$WHEEL_BIN/tokred" viz; \
	"$$WHEEL_BIN/tokred" viz --model vit_tiny_patch16_224 --layers 0,11; \
	if "$$WHEEL_BIN/tokred" sweep 2> sweep.err; then echo "tokred sweep ran without scikit-learn"; exit 1; fi; \
	cat sweep.err; grep -q "pip install 'tokred\[sweep\]'" sweep.err; \
	ls -l results/bench results/viz; cd /; rm -rf "$$RUN"
	rm -rf $(WHEEL_VENV) build  # several GB, recreated by the next run; dist/ keeps the wheel
