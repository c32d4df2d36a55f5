# The two commands of the README: `make quickstart` and `make test` (the fast suite).
# `make test-all` adds the tests marked slow (pyproject.toml lists the markers); `make lint` runs ruff
# with the configuration in pyproject.toml. CI (.ci/run) runs lint, test and test-slow: together, all.
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup quickstart test test-slow test-all lint
setup:
	bash scripts/setup.sh

quickstart: setup
	$(VENV)/bin/peftlab run examples/quickstart.yaml --out runs/quickstart

test: setup
	$(PY) -m pytest -q -m "not slow"

test-slow: setup
	$(PY) -m pytest -q -m slow

test-all: setup
	$(PY) -m pytest -q

lint: setup
	$(VENV)/bin/ruff check peftlab tests bench scripts
