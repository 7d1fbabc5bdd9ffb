# Two commands for a newcomer on a CPU machine: `make demo` and `make test`.
# torch==2.13.0 is pinned because it is the CPU build on local disk here; an
# unpinned torch pulls a multi-GB CUDA build. On a GPU machine, install with
# `pip install -e .` against the torch you already have.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
CPU_TORCH := torch==2.13.0 triton==3.6.0 "numpy<2.4"

.PHONY: install demo test bench clean

install: $(VENV)/.installed

$(VENV)/.installed: setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(CPU_TORCH)
	$(PY) -m pip install -q -e ".[test,plot]"
	touch $@

demo: install
	$(PY) -m recycore demo

test: install
	$(PY) -m pytest -q tests benchmarks

bench: install
	$(PY) -m pytest -q benchmarks --benchmark-json=benchmarks/results/latest.json

clean:
	rm -rf $(VENV) build *.egg-info
