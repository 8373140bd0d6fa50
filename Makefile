# Two commands set everything up on a fresh machine:
#   make demo   the main job: AMDIM pretraining on Fashion-MNIST, then linear probes
#   make test   the tests
# Both create .venv (and build the C++/CUDA extension) on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

# Building the CUDA extension: CUDA_HOME must name the toolkit (torch otherwise guesses it from
# the nvcc wrapper and the link fails, cannot find -lcudart). TORCH_CUDA_ARCH_LIST: setup.py's
# default (8.0;9.0+PTX) unless set.
export CUDA_HOME ?= /usr/local/cuda
export MAX_JOBS ?= 2

.PHONY: demo data loss-demo test bench peer-wheels clean

RUN ?= runs/demo

$(STAMP): setup.py pyproject.toml requirements-dev.txt requirements-peers.txt $(wildcard amdim_kernels/csrc/*) amdim_kernels/extension_build.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -r requirements-dev.txt
	$(PY) -m pip install -e . --no-build-isolation
	touch $(STAMP)

# Fashion-MNIST from Debian's package dataset-fashion-mnist, where this machine can install it
data:
	@if [ -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then :; \
	elif command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
		apt-get install -y dataset-fashion-mnist || (apt-get update && apt-get install -y dataset-fashion-mnist); \
	else echo "Fashion-MNIST: run 'sudo apt-get install dataset-fashion-mnist' (or train with --download)"; fi

demo: $(STAMP) data
	$(PY) -m amdim.train --out $(RUN)
	$(PY) -m amdim.evaluate $(RUN)/last.pt --baselines

loss-demo: $(STAMP)
	$(PY) -m benchmarks.demo

# the tests in parallel, one worker per core (pytest-xdist); a test group runs on one worker
test: $(STAMP)
	$(PY) -m pytest -n auto --dist loadgroup

bench: $(STAMP)
	$(PY) -m pytest benchmarks --benchmark-columns=median,iqr,rounds

# The peer libraries as wheels in wheels/, for a GPU machine without network (gpu_check.sh
# installs them from there)
peer-wheels: $(STAMP)
	$(PY) -m pip download --no-deps -r requirements-peers.txt -d wheels

clean:
	rm -rf $(VENV) build *.egg-info
