# flannel-xdp: every target sets up what it needs through `make setup`.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: setup test unit demo bench lint clean

setup:
	@bash scripts/setup.sh

test: setup
	$(PY) -m pytest $(PYTEST_ARGS)

unit: setup
	$(PY) -m pytest -m "not root" $(PYTEST_ARGS)

demo: setup
	$(VENV)/bin/flannel-xdp demo $(if $(KEEP),--keep,)

bench: setup
	$(PY) -m flannel_xdp.bench

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

clean:
	rm -rf $(VENV) build *.egg-info
