# `make demo`: create .venv, install (CPU torch from local disk first, never a multi-GB CUDA build), run the
# embedded tiny FRE default. `make test`: same install, then the default test suite. CI runs `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
# CPU machines get the CPU build (torch 2.13.0 lies on local disk here); machines with nvidia-smi get PyPI's CUDA build.
TORCH_SPEC ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && echo torch || echo torch==2.13.0)

.PHONY: install demo test test-slow bench clean

$(BIN)/lmmr1-lite: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet -e ".[test]"
	@touch $@

install: $(BIN)/lmmr1-lite

demo: install
	$(BIN)/lmmr1-lite train --stage fre

test: install
	$(BIN)/python -m pytest -q

test-slow: install
	$(BIN)/python -m pytest -q -m slow

bench: install
	$(BIN)/python bench/kernels_cpu_memory.py

clean:
	rm -rf $(VENV) runs build *.egg-info
