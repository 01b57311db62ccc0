# The two commands of the README: `make serve` and `make test`. Both set up .venv first.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: setup serve test lint bench bench-all bench-quick protos

setup: $(STAMP)

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	bash deploy/install-system-deps.sh
	touch $(STAMP)

# A local cluster: the coordinator (rank 0, HTTP on :8000) plus 2 worker processes,
# serving the embedded default model.
serve: setup
	$(VENV)/bin/edgellm serve --local-workers 2

lint: setup
	$(PY) -m ruff check .
	$(PY) -m mypy server worker bench loadtest planner

# Two pytest processes, each taking whole test files in collection order (a file's module
# fixtures, a served cluster or the arm64 tree, stay in one process; tests/conftest.py puts the
# emulated and container tests, which wait on qemu and dockerd, first).
TEST_PROCESSES ?= 2

test: lint
	$(PY) -m pytest -n $(TEST_PROCESSES) --dist loadfile --no-loadscope-reorder

bench: setup
	$(PY) bench/decode_and_allreduce.py

protos: setup
	PATH=$(VENV)/bin:$$PATH protos/generate.sh

# Every benchmark of bench/ with modest sizes: bench/results/<timestamp>/{results.json,summary.md,*.png},
# and the tables of docs/benchmarks.md in docs/benchmarks/latest.md
bench-all: setup
	$(PY) bench/run_all.py

# The same, smaller: no 1.1B-shape checkpoint, one planner pass, shorter series
bench-quick: setup
	$(PY) bench/run_all.py --quick
