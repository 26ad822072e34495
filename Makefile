# make test: create .venv if missing, install cellrep with its test extras, run the tests.
# make demo: same install, then train and evaluate the synthetic-tissue demo in workdir/demo.
# make bench: same install plus the bench extra (PyTorch), run the benchmarks into
#   benchmarks/results/*.json and write their tables into docs/performance.md.
SHELL := /bin/bash
# The newest Python >= 3.11 that actually starts (pyenv shims of absent versions fail).
PYTHON ?= $(shell for p in python3.14 python3.13 python3.12 python3.11 python3; do \
  if $$p -c 'import sys; sys.exit(sys.version_info < (3, 11))' >/dev/null 2>&1; then echo $$p; break; fi; done)
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
BENCH_STAMP := $(VENV)/.installed-bench
BENCHMARKS := bench_peak bench_ensemble bench_inference bench_efficientnet bench_unet \
  bench_hostmem bench_pipeline bench_memory
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

$(BENCH_STAMP): $(STAMP)
	$(PY) -m pip install -q -e '.[test,xgboost,bench]'
	touch $@

# About two hours and a quarter on a 2-core CPU (bench_memory runs the demo and
# cellsighter:runlocal twice each: ~35 min; bench_efficientnet ~15-20 min and bench_unet
# ~25-35 min (an estimate) on an idle machine, twice that with other work on it, whose
# PyTorch rows it then slows several times over);
# each benchmark writes its JSON as it goes (bench_ensemble one
# file per case group, bench_inference one per batch size; replicate AP at 100,000 wells, under
# the retrieval's default 512 MiB block budget, in profiling_100000.json), then report.py
# tables them all.
bench: $(BENCH_STAMP)
	set -e; for b in $(BENCHMARKS); do $(PY) benchmarks/$$b.py; done
	$(PY) benchmarks/bench_profiling.py --sizes=100000 --cases=ap_activity \
	  --reference-max-wells=0 --repeats=1 --out=benchmarks/results/profiling_100000.json
	$(PY) benchmarks/report.py --docs docs/performance.md

clean:
	rm -rf $(VENV) workdir .cache .pytest_cache
