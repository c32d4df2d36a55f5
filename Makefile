# The two commands of the README: `make quickstart` and `make test` (the fast suite);
# `make test-all` adds the tests marked slow (pyproject.toml lists the markers).
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup quickstart test test-all
setup:
	bash scripts/setup.sh

quickstart: setup
	$(VENV)/bin/peftlab run examples/quickstart.yaml --out runs/quickstart

test: setup
	$(PY) -m pytest -q -m "not slow"

test-all: setup
	$(PY) -m pytest -q
