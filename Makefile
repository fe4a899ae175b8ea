# Two commands do all the setup: `make serve` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install -q --disable-pip-version-check

.PHONY: serve test test-docker docker-gpu lint train bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)

# Serving needs no torch: ONNX Runtime on the CPU (use `pip install -e .[serve,gpu]` for a GPU).
$(VENV)/.serve: $(PY) pyproject.toml
	$(PIP) -e ".[serve,cpu]"
	@touch $@

$(VENV)/.dev: $(VENV)/.serve pyproject.toml clients/python/pyproject.toml
	$(PIP) -e ".[serve,cpu,train,dev]" -e ./clients/python
	@touch $@

# The browser tests drive Debian's chromium: Playwright's own browser download is not used.
CHROMIUM := /usr/bin/chromium
SUDO := $(if $(filter 0,$(shell id -u)),,sudo)

$(CHROMIUM):
	$(SUDO) apt-get update -qq
	DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq chromium

serve: $(VENV)/.serve
	$(PY) -m service

test: $(VENV)/.dev $(CHROMIUM)
	$(PY) -m ruff check .
	$(PY) -m pytest

# The deployment on a real Docker engine (tests/test_docker.py): starts an engine when none answers, builds the
# cpu, train and load-balancer images, runs them with docker compose. Not part of `make test`.
test-docker: $(VENV)/.dev
	@start=$$(date +%s); $(PY) -m pytest -m docker tests/test_docker.py -s --durations=0; rc=$$?; \
	echo "docker test: $$(( $$(date +%s) - start )) s"; exit $$rc

# The GPU image (~3 GB of CUDA wheels: not built by the tests). CUDA_MAJOR=13 for driver R580 and newer.
docker-gpu:
	deploy/docker/build.sh gpu

lint: $(VENV)/.dev
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

train: $(VENV)/.dev
	$(PY) -m training digits
	$(PY) -m training cifar
	$(PY) -m training sequence

bench: $(VENV)/.dev
	$(PY) -m bench

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
