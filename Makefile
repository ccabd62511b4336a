# Set-up, demo and tests. Everything runs from the repository root inside .venv.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
NPROC ?= 2

.PHONY: setup demo test experiment bench clean-demo

setup: $(VENV)/.installed

# torch first: a machine that already has torch (a GPU cluster) reuses it through system site-packages; a machine
# without one gets the CPU wheel, or the default CUDA build where an NVIDIA driver is present.
$(VENV)/.installed: requirements.txt
	@if $(PYTHON) -c "import torch" 2>/dev/null; then \
		$(PYTHON) -m venv --system-site-packages $(VENV); \
	else \
		$(PYTHON) -m venv $(VENV); \
		$(BIN)/pip install -q -U pip setuptools wheel; \
		if command -v nvidia-smi >/dev/null 2>&1; then $(BIN)/pip install -q torch; \
		else $(BIN)/pip install -q torch==2.13.0; fi; \
	fi
	$(BIN)/pip install -q -U pip setuptools wheel
	# deepspeed ships as source: build it against the torch above, without its optional compiled ops.
	DS_BUILD_OPS=0 $(BIN)/pip install -q --no-build-isolation -r requirements.txt
	touch $@

demo: setup
	$(BIN)/deepspeed --num_gpus $(NPROC) launch/pretrain.py --recipe recipes/tiny_cpu.yaml

test: setup
	$(BIN)/python -m pytest -q tests
