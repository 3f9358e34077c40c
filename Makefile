# The two commands a user needs: `make test` and `make demo`. Both create .venv at the
# repo root when missing and install the CPU build of torch before anything else, so no
# dependency can drag in a CUDA build.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
TORCH_SPEC ?= torch==2.13.0
PYTEST_ARGS ?=

.PHONY: install test test-fast demo demo-flow docker-check clean

install: $(STAMP)

$(STAMP): setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

test: install
	$(PY) -m pytest $(PYTEST_ARGS)

# Quick loop for development: skips tests marked slow (multi-process launches).
test-fast: install
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

demo: install
	$(PY) -m janus_train.tools.demo $(DEMO_ARGS)

# The JanusFlow demo (rectified flow, a tiny VAE trained first): docs/janusflow.md#the-demo.
demo-flow: install
	$(PY) -m janus_train.tools.demo --recipe janusflow_tiny_demo --out demo_out/janusflow $(DEMO_ARGS)

# Checks the Dockerfile without a Docker daemon: BuildKit's parser, plus consistency with
# setup.py's extras and this Makefile's torch pin (tests/cluster/test_docker.py).
docker-check: install
	$(PY) -m pytest -q tests/cluster/test_docker.py

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache demo_out
