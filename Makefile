# Every target creates .venv and installs what it needs on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: demo test bench clean

# torch first: setup.py compiles the CPU kernels (gcnet._C) against it, without build isolation.
$(STAMP): pyproject.toml setup.py requirements/constraints.txt src/gcnet/csrc/*.cpp
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -c requirements/constraints.txt "setuptools>=68" torch
	$(PY) -m pip install -q --disable-pip-version-check --no-build-isolation -c requirements/constraints.txt -e ".[dev,bench]"
	touch $(STAMP)

demo: $(STAMP)
	OMP_WAIT_POLICY=PASSIVE $(PY) -m gcnet.cli demo --out outputs/demo

test: $(STAMP)
	$(PY) -m pytest -n 2 -q

bench: $(STAMP)
	$(PY) -m benchmarks.blocks

clean:
	rm -rf $(VENV) outputs .pytest_cache
