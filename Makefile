# make test: create .venv if missing, install cellrep with its test extras, run the tests.
# make demo: same install, then train and evaluate the synthetic-tissue demo in workdir/demo.
SHELL := /bin/bash
# The newest Python >= 3.11 that actually starts (pyenv shims of absent versions fail).
PYTHON ?= $(shell for p in python3.14 python3.13 python3.12 python3.11 python3; do \
  if $$p -c 'import sys; sys.exit(sys.version_info < (3, 11))' >/dev/null 2>&1; then echo $$p; break; fi; done)
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
WORKDIR ?= workdir/demo

.PHONY: install test test-all demo bench clean

$(STAMP): pyproject.toml
	@test -n "$(PYTHON)" || { echo "no Python >= 3.11 found" >&2; exit 1; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test,xgboost]'
	touch $@

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

# Everything, slow tests included (the nightly target).
test-all: $(STAMP)
	$(PY) -m pytest -q -m ''

demo: $(STAMP)
	$(PY) -m cellrep.launch --config=configs/demo.py --workdir=$(WORKDIR)

clean:
	rm -rf $(VENV) workdir .cache .pytest_cache
