# The two commands of the README: `make quickstart` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup quickstart test
setup:
	bash scripts/setup.sh

quickstart: setup
	$(VENV)/bin/peftlab run examples/quickstart.yaml --out runs/quickstart

test: setup
	$(PY) -m pytest -q
