# The README's two commands. Both create .venv and install what they need.
PY ?= python3
VENV := .venv
STAMP := $(VENV)/.installed

.PHONY: run test lint bench docs

$(STAMP): pyproject.toml setup.py
	$(PY) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q --upgrade pip
	$(VENV)/bin/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

run: $(STAMP)
	$(VENV)/bin/nnxtrain $(ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

test: lint
	$(VENV)/bin/python -m pytest -q $(PYTEST_ARGS)

bench: $(STAMP)
	$(VENV)/bin/python bench/trainer_vs_bare.py

# Regenerates the key tables of docs/config.md from the schemas (a test checks they match).
docs: $(STAMP)
	$(VENV)/bin/python -c "from nnxtrain.config.reference import reference_tables as t; \
	d = open('docs/config.md').read(); i = d.index('## \`model\`'); j = d.index('## \`callbacks\`'); \
	open('docs/config.md', 'w').write(d[:i] + t().rstrip() + '\n\n' + d[j:])"
