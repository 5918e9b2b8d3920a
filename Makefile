# siftlens: the two commands a fresh clone needs are `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH_VERSION ?= 2.13.0

.PHONY: demo test test-browser test-timm lint clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# torch is installed first and pinned here only, so pip takes the local CPU wheel instead of a CUDA build.
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q torch==$(TORCH_VERSION)
	$(BIN)/pip install -q -e .
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed
	$(BIN)/pip install -q -e ".[dev]"
	touch $@

demo: $(VENV)/.installed
	$(BIN)/siftlens demo --out runs/demo

test: $(VENV)/.installed-dev
	$(BIN)/python -m pytest -q

# only the tests that open reports in a real chromium (Debian packages chromium and chromium-driver;
# .ci/run installs them when absent); `make test` runs them too
test-browser: $(VENV)/.installed-dev
	$(BIN)/python -m pytest -q -m browser

lint: $(VENV)/.installed-dev
	$(BIN)/ruff check src tests bench experiments scripts

# timm needs torchvision, which does not work with the local CPU torch wheel: a separate venv with a
# full torch from the registry (a few GB) runs the timm backend's tests on the CPU.
TIMM_VENV := .venv-timm
$(TIMM_VENV)/.installed: pyproject.toml
	$(PY) -m venv $(TIMM_VENV)
	$(TIMM_VENV)/bin/pip install -q --upgrade pip
	$(TIMM_VENV)/bin/pip install -q timm
	$(TIMM_VENV)/bin/pip install -q -e ".[dev]"
	touch $@

test-timm: $(TIMM_VENV)/.installed
	$(TIMM_VENV)/bin/python -m pytest -q -m timm

clean:
	rm -rf $(VENV) $(TIMM_VENV) runs/demo
