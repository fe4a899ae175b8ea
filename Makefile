# Two commands do all the setup: `make serve` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install -q --disable-pip-version-check

.PHONY: serve test lint train bench clean

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
