# Two commands do all the set-up on a fresh machine:  make demo  and  make test.
# Both create/refresh a virtual environment in .venv and install everything they need.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# Exact CPU torch pin (a local wheel on CPU machines); override on GPU clusters, e.g. TORCH_SPEC="torch".
TORCH_SPEC ?= torch==2.13.0
PYTEST_ARGS ?=

.PHONY: install demo test test-fast clean

install: $(VENV)/.installed

$(VENV)/.installed: setup.py Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[test,mpi]"
	touch $@

demo: install
	$(PY) tools/run_demo.py

test: install
	$(PY) -m pytest -q --durations=15 $(PYTEST_ARGS) tests

test-fast: install
	$(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS) tests

clean:
	rm -rf $(VENV) build *.egg-info demo_output
