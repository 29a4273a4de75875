# flannel-xdp: every target sets up what it needs through `make setup`.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: setup peers peers-cni test unit demo bench lint clean

setup:
	@bash scripts/setup.sh

# The real flanneld, CNI plugins and Kubernetes binaries the tests run next to ours, built
# once into /var/cache/flannel-xdp (see scripts/peers.sh). The lab's pods come from the CNI
# plugins (seconds to build), its stock nodes run flanneld: the demo on the embedded default
# needs only the CNI tools and never waits for the Kubernetes build.
peers:
	@bash scripts/peers.sh

peers-cni:
	@bash scripts/peers.sh cni-plugins flannel-cni cnitool

test: setup peers
	$(PY) -m pytest $(PYTEST_ARGS)

unit: setup
	$(PY) -m pytest -m unit $(PYTEST_ARGS)

demo: setup peers-cni
	$(VENV)/bin/flannel-xdp demo $(if $(KEEP),--keep,)

bench: setup peers
	$(PY) -m flannel_xdp.bench

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

clean:
	rm -rf $(VENV) build *.egg-info
