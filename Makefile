# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: install test test-fast demo bench lint clean

$(STAMP): pyproject.toml constraints.txt
	test -d $(VENV) || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -c constraints.txt -e ".[dev,eval]"
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	DS_ACCELERATOR=cpu $(BIN)/python -m pytest -q $(PYTEST_ARGS)

test-fast: $(STAMP)
	DS_ACCELERATOR=cpu $(BIN)/python -m pytest -q -m "not slow" $(PYTEST_ARGS)

demo: $(STAMP)
	DS_ACCELERATOR=cpu $(BIN)/omni demo --out demo_out

bench: $(STAMP)
	DS_ACCELERATOR=cpu $(BIN)/python -m benchmarks.run --quick

lint: $(STAMP)
	$(BIN)/ruff check omni tests benchmarks

clean:
	rm -rf $(VENV) demo_out .pytest_cache
