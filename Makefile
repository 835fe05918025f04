# Two commands for a new user: `make demo` and `make test`. Both build .venv on first use.
PYTHON ?= python3
VENV ?= .venv
# where torch comes from: empty = pip's default (on Linux, PyPI's CUDA build, a few GB);
# https://download.pytorch.org/whl/cpu = the CPU build, enough for the demo and the tests
TORCH_INDEX ?=
BIN := $(VENV)/bin

$(BIN)/qlora: pyproject.toml requirements-ci.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c requirements-ci.txt $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) torch
	$(BIN)/pip install -q -c requirements-ci.txt -e '.[dev]'
	touch $(BIN)/qlora

.PHONY: demo test
demo: $(BIN)/qlora
	$(BIN)/qlora demo

# one torch thread a worker: two workers on two cores, each with torch's default of a thread a
# core, ran a small backward step 5x slower side by side than with one thread each
test: $(BIN)/qlora
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -n 2 tests
