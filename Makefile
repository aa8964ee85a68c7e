# The README's two commands. Both create .venv and install what they need: `make run` the
# package alone (what a training run uses: 39 packages, 0.8 GB), `make test` the dev
# extras too (torch, transformers, the trackers, the tools: 148 packages, 2.2 GB). Each
# has its own stamp, so `make test` after `make run` adds the dev extras.
PY ?= python3
VENV := .venv
RUN_STAMP := $(VENV)/.installed-run
DEV_STAMP := $(VENV)/.installed

# CI's second leg (`make test-py312`): the newest jax, flax, optax, orbax and libtpu, which
# need Python >= 3.12 (on 3.11 pip stops at jax 0.10.2), in their own .venv312. It installs
# [dev-core], every dev extra but torch (whose CPU build exists for 3.11 only; on 3.12 pip
# pulls a CUDA build of several GB), so tests/interop runs on 3.11 alone. The interpreter:
# python3.12 if it runs (pyenv's shim on PATH fails while 3.12 is installed but not the
# selected version), else the newest 3.12 under pyenv's root; or set PY312=/path/to/it.
PY312 ?= $(shell python3.12 -c 'import sys; print(sys.executable)' 2>/dev/null || \
	ls -d "$$(pyenv root 2>/dev/null || echo "$$HOME/.pyenv")"/versions/3.12*/bin/python3.12 \
	2>/dev/null | sort -V | tail -n 1)
VENV312 := .venv312
DEV312_STAMP := $(VENV312)/.installed

.PHONY: run test lint bench docs test-py312

$(VENV)/bin/python:
	$(PY) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q --upgrade pip

$(RUN_STAMP): pyproject.toml setup.py | $(VENV)/bin/python
	$(VENV)/bin/python -m pip install -q -e .
	touch $@

# [dev] holds everything `.` does, so it stamps both.
$(DEV_STAMP): pyproject.toml setup.py | $(VENV)/bin/python
	$(VENV)/bin/python -m pip install -q -e '.[dev]'
	touch $@ $(RUN_STAMP)

run: $(RUN_STAMP)
	$(VENV)/bin/nnxtrain $(ARGS)

lint: $(DEV_STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

# Two worker processes, a file of tests each at a time (its module fixtures built once);
# tests/conftest.py starts the files with slow tests first, in an order that
# --no-loadscope-reorder keeps. On two cores the suite takes a
# quarter less wall time than in one process. PYTEST_WORKERS=0 runs it in this process.
PYTEST_WORKERS ?= 2
test: lint
	$(VENV)/bin/python -m pytest -q -n $(PYTEST_WORKERS) --dist loadfile --no-loadscope-reorder $(PYTEST_ARGS)

$(VENV312)/bin/python:
	@test -n "$(PY312)" || { echo "no Python 3.12 found: set PY312=/path/to/python3.12"; exit 1; }
	$(PY312) -m venv $(VENV312)
	$(VENV312)/bin/python -m pip install -q --upgrade pip

$(DEV312_STAMP): pyproject.toml setup.py | $(VENV312)/bin/python
	$(VENV312)/bin/python -m pip install -q -e '.[dev-core]'
	touch $@

# ruff runs once, in `make test` (same ruff, same rules); mypy runs again because it checks
# our calls against the newer jax and flax. Its own cache: the two venvs' packages differ.
test-py312: $(DEV312_STAMP)
	$(VENV312)/bin/mypy --cache-dir .mypy_cache/py312
	$(VENV312)/bin/python -m pytest -q -n $(PYTEST_WORKERS) --dist loadfile --no-loadscope-reorder --ignore=tests/interop $(PYTEST_ARGS)

bench: $(RUN_STAMP)
	$(VENV)/bin/python bench/trainer_vs_bare.py

# Regenerates the key tables of docs/config.md from the schemas (a test checks they match).
docs: $(RUN_STAMP)
	$(VENV)/bin/python -c "from nnxtrain.config.reference import reference_tables as t; \
	d = open('docs/config.md').read(); i = d.index('## \`model\`'); j = d.index('## \`callbacks\`'); \
	open('docs/config.md', 'w').write(d[:i] + t().rstrip() + '\n\n' + d[j:])"
