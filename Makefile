# Quickstart targets: `make demo` and `make test` each create .venv when it is absent.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test lint format bench bench-parity label-env test-label stress clean

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

# MONAI Label (#18): the server lives in its own environment (.venv-label: monailabel 0.8.5
# needs numpy<2; ~8 GB, a few minutes to build once). test-label exports a bundle, starts a real
# server on 127.0.0.1, infers, uploads labels, trains and infers again (docs/monailabel.md).
LABEL_VENV := .venv-label
LABEL_STAMP := $(LABEL_VENV)/.installed

$(LABEL_STAMP): monailabel_app/requirements.txt
	test -x $(LABEL_VENV)/bin/python || $(PYTHON) -m venv $(LABEL_VENV)
	$(LABEL_VENV)/bin/python -m pip install --quiet --upgrade pip
	nice -n 10 $(LABEL_VENV)/bin/python -m pip install --quiet -r monailabel_app/requirements.txt
	touch $(LABEL_STAMP)

label-env: $(LABEL_STAMP)

test-label: $(STAMP) $(LABEL_STAMP)
	$(PY) scripts/test_label.py

# Fault injection (#21): bad files, memory cap, kill -9, malicious checkpoints, PHI canary;
# prints tried/handled/crashed/hung/lost/executed/leaked (docs/data.md, SECURITY.md).
stress: $(STAMP)
	nice -n 10 $(PY) benchmarks/stress.py

clean:
	rm -rf runs .pytest_cache
