# Two commands do all the set-up on a fresh machine:
#   make demo   -- the main job (see README)
#   make test   -- the test suite
VENV ?= .venv
PY := $(VENV)/bin/python
# CPU-only machines get torch's CPU build; a GPU machine can pre-install its own torch.
TORCH_SPEC ?= torch==2.13.0

.PHONY: install test test-fast demo bench gpu-check clean

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip show torch >/dev/null 2>&1 || $(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

install: $(VENV)/.installed

test: install
	HF_HUB_OFFLINE=1 $(VENV)/bin/pytest -q

test-fast: install
	HF_HUB_OFFLINE=1 $(VENV)/bin/pytest -q -m "not integration"

demo: install
	RENIO=$(VENV)/bin/renio bash examples/demo.sh

bench: install
	$(PY) benchmarks/bench_weight.py

# On a lent GPU machine, from a clean checkout, with the machine's own python and torch
# (PYTHON=...); at most 8 minutes, one report file. Without a GPU: one line, exit 0.
gpu-check:
	bash benchmarks/gpu_check.sh

clean:
	rm -rf out runs bench_data .pytest_cache
