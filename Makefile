# Set-up, demo and tests. Everything runs from the repository root inside .venv.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
NPROC ?= 2

DS := $(BIN)/deepspeed --num_gpus $(NPROC) launch/pretrain.py --recipe
WEIGHTS := raw ema lawa

.PHONY: setup demo test experiment clean-demo gpu-wheels

setup: $(VENV)/.installed

# torch first: a machine that already has torch (a GPU cluster) reuses it through system site-packages; a machine
# without one gets the CPU wheel, or the default CUDA build where an NVIDIA driver is present.
$(VENV)/.installed: requirements.txt pyproject.toml
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
	# The project itself, editable: its packages import each other from any directory, scripts included.
	$(BIN)/pip install -q --no-build-isolation --no-deps -e .
	touch $@

# The embedded default end to end: prepare, train (long and short schedule), consolidate, evaluate, compare.
# Each step resumes or skips what is already done, so running it again continues where it stopped.
demo: setup
	$(DS) recipes/tiny_cpu.yaml
	$(DS) recipes/tiny_cpu_short.yaml
	for w in $(WEIGHTS); do test -d release/tiny_cpu_$$w || \
		$(BIN)/python -m averaging.consolidate runs/tiny_cpu/checkpoints --weights $$w --out release/tiny_cpu_$$w; done
	for w in $(WEIGHTS); do $(BIN)/python -m eval.evaluate release/tiny_cpu_$$w --max-tokens 50000; done
	$(BIN)/python -m eval.compare runs/tiny_cpu runs/tiny_cpu_short --out reports/tiny_cpu

clean-demo:
	rm -rf runs/tiny_cpu runs/tiny_cpu_short release/tiny_cpu_* reports/tiny_cpu

# The CPU experiment: a long run with EMA and LAWA against schedules 25% and 50% as long, its horizon swept at 25,
# 50 and 100% (in the report) and around where it reaches the target, and the same long run at a 4x lower peak LR
# swept at 25, 50 and 100%. Each swept step rebuilds 8 power EMAs from every snapshot so far: minutes a step here.
experiment: setup
	$(DS) recipes/experiment_long.yaml
	$(DS) recipes/experiment_short25.yaml
	$(DS) recipes/experiment_short50.yaml
	$(DS) recipes/experiment_long_lowlr.yaml
	$(BIN)/python -m eval.compare runs/experiment_long runs/experiment_short25 runs/experiment_short50 \
		--target 2.9 --out reports/experiment
	$(BIN)/python -m eval.sweep runs/experiment_long --at 300 325 350 375 400 --target 2.9 \
		--out reports/experiment_target
	$(BIN)/python -m eval.sweep runs/experiment_long_lowlr --at 400 800 1600 --out reports/experiment_lowlr_sweep

test: setup
	$(BIN)/python -m pytest -q -rfE --durations=15 tests

# The wheels bench/gpu.sh installs on the lent GPU machine (x86-64, Python 3.12, torch with CUDA; no deepspeed,
# hjson, pydantic or datasets' own needs there): DeepSpeed built here without its compiled ops, the rest downloaded
# for that Python, each at the version this venv has. Git-ignored; carried with the device call as `.whl`.
GPU_WHEELS := hjson pydantic pydantic_core annotated_types typing_inspection datasets dill multiprocess fsspec \
	typing_extensions xxhash
gpu-wheels: setup
	rm -rf .whl && mkdir .whl
	DS_BUILD_OPS=0 $(BIN)/pip wheel -q --no-deps --no-build-isolation -w .whl \
		deepspeed==$$($(BIN)/python -c "import importlib.metadata as m; print(m.version('deepspeed'))")
	$(BIN)/pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
		$$($(BIN)/python -c "import importlib.metadata as m; print(*(f'{n}=={m.version(n)}' for n in '$(GPU_WHEELS)'.split()))")
	du -sh .whl
