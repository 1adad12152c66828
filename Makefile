# Two commands on a fresh machine: `make demo` and `make test`. Everything else is optional.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed
TEST_STAMP := $(VENV)/.installed-test
DEMO_DIR ?= runs/demo

.PHONY: demo test test-slow install install-test bench clean

$(STAMP): setup.py
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# The CPU wheel of torch lies on local disk; install it first so nothing pulls a CUDA build.
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e .
	touch $@

$(TEST_STAMP): $(STAMP)
	$(PIP) install -q -e '.[test,hf,triton]'
	touch $@

install: $(STAMP)
install-test: $(TEST_STAMP)

demo: $(STAMP)
	$(VENV)/bin/mohge-prepare-demo
	$(VENV)/bin/mohge-train --config-name demo out_dir=$(DEMO_DIR)

test: $(TEST_STAMP)
	$(PY) -m pytest -q tests

# Slow checks (long multi-rank parity runs, docs commands, compile): CI's second step.
test-slow: $(TEST_STAMP)
	$(PY) -m pytest -q -m slow tests || [ $$? -eq 5 ]  # 5: no test is marked slow

bench: $(STAMP)  # CPU benchmarks (tables + JSON in runs/); bench/bench_gpu.py needs a GPU
	$(PY) bench/bench_ep.py --out runs/bench_ep.json
	$(PY) bench/bench_data.py --out runs/bench_data.json
	$(PY) bench/bench_moe.py --out runs/bench_moe.json

clean:
	rm -rf $(VENV) runs
