# Two commands set everything up on a fresh machine:
#   make demo   the main job (creates .venv on first use)
#   make test   the tests    (creates .venv on first use)
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

# Building the CUDA extension here: see ../shared/ENV.md
export CUDA_HOME ?= /usr/local/cuda
export TORCH_CUDA_ARCH_LIST ?= 9.0
export MAX_JOBS ?= 2

.PHONY: demo test bench clean

$(STAMP): setup.py pyproject.toml requirements-dev.txt $(wildcard csrc/*)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -r requirements-dev.txt
	$(PY) -m pip install -e . --no-build-isolation
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m benchmarks.demo

test: $(STAMP)
	$(PY) -m pytest

bench: $(STAMP)
	$(PY) -m pytest benchmarks

clean:
	rm -rf $(VENV) build *.egg-info
