# Quickstart targets: `make demo` and `make test` each create .venv when it is absent.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test lint format bench bench-parity clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test,tfds]'
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m monai.bundle run --config_file bundles/p2x_histo.json

test: $(STAMP)
	$(PY) -m pytest -q tests

lint: $(STAMP)
	$(VENV)/bin/ruff format --check medp2x tests benchmarks
	$(VENV)/bin/ruff check medp2x tests benchmarks

format: $(STAMP)
	$(VENV)/bin/ruff format medp2x tests benchmarks
	$(VENV)/bin/ruff check --fix medp2x tests benchmarks

bench: $(STAMP)
	$(PY) benchmarks/wsi_throughput.py
	$(PY) benchmarks/views_device.py

# Parity with lightly (#14): installs the benchmark-only extra; ~1 h on a 2-core CPU (docs/methods.md).
bench-parity: $(STAMP)
	$(PY) -m pip install --quiet -e '.[bench]'
	$(PY) benchmarks/parity.py

clean:
	rm -rf runs .pytest_cache
