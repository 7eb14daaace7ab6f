# The two commands a new user needs: `make demo` and `make test`. Both install what is missing.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: install test test-slow demo bench gpu-check clean

install: $(STAMP)

# torch first, pinned: here it takes the local CPU build; an unpinned torch pulls gigabytes of CUDA packages.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

# Tests run one torch thread each (tests/conftest.py): two pytest workers keep both of CI's cores busy.
TEST_WORKERS ?= 2

test: install
	$(PY) -m pytest -q -n $(TEST_WORKERS)

test-slow: install
	$(PY) -m pytest -q -m slow

demo: install
	$(VENV)/bin/wm demo-pipeline

bench: install
	$(VENV)/bin/wm bench

# On a GPU machine whose Python already has this project's packages (no venv, no download).
gpu-check:
	$(PYTHON) -m wm bench --what gpu

clean:
	rm -rf $(VENV) build *.egg-info
