# The README's two commands. Both create .venv and install what they need: `make run` the
# package alone (what a training run uses: 39 packages, 0.8 GB), `make test` the dev
# extras too (torch, transformers, the trackers, the tools: 148 packages, 2.2 GB). Each
# has its own stamp, so `make test` after `make run` adds the dev extras.
PY ?= python3
VENV := .venv
RUN_STAMP := $(VENV)/.installed-run
DEV_STAMP := $(VENV)/.installed

.PHONY: run test lint bench docs

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

test: lint
	$(VENV)/bin/python -m pytest -q $(PYTEST_ARGS)

bench: $(RUN_STAMP)
	$(VENV)/bin/python bench/trainer_vs_bare.py

# Regenerates the key tables of docs/config.md from the schemas (a test checks they match).
docs: $(RUN_STAMP)
	$(VENV)/bin/python -c "from nnxtrain.config.reference import reference_tables as t; \
	d = open('docs/config.md').read(); i = d.index('## \`model\`'); j = d.index('## \`callbacks\`'); \
	open('docs/config.md', 'w').write(d[:i] + t().rstrip() + '\n\n' + d[j:])"
