# Two entry points for a fresh machine with Python 3.10+ and make:
#   make demo   sets up .venv (runtime deps) and runs the main job's quickstart
#   make test   sets up .venv (runtime + test deps) and runs the test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
WORKDIR ?= workdir/quickstart
PIP := $(BIN)/python -m pip

.PHONY: demo test bench example clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip

$(VENV)/.runtime-installed: pyproject.toml | $(BIN)/python
	$(PIP) install --quiet -e .
	touch $@

$(VENV)/.dev-installed: pyproject.toml | $(BIN)/python
	$(PIP) install --quiet -e '.[dev]'
	touch $(VENV)/.runtime-installed $@

demo: $(VENV)/.runtime-installed
	$(BIN)/python -m fdiv_jax.main --config=configs/quickstart.py --workdir=$(WORKDIR)

example: $(VENV)/.runtime-installed
	$(BIN)/python examples/divergence_table.py

test: $(VENV)/.dev-installed
	$(BIN)/python -m pytest -n 2 -q

bench: $(VENV)/.dev-installed
	$(BIN)/python benchmarks/sampling.py
	$(BIN)/python benchmarks/train_step.py

clean:
	rm -rf $(VENV) workdir
