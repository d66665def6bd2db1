# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: install browser compiler test test-fast demo bench lint clean

$(STAMP): pyproject.toml constraints.txt
	test -d $(VENV) || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -c constraints.txt -e ".[dev,eval]"
	touch $(STAMP)

install: $(STAMP)

# The evaluation report test opens report.html in headless Chromium (Debian's package).
browser:
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
	  || echo "chromium is missing: install it (apt-get install chromium) for the report test"; }

test: $(STAMP) browser
	DS_ACCELERATOR=cpu $(BIN)/python -m pytest -q --durations=25 $(PYTEST_ARGS)

test-fast: $(STAMP)
	DS_ACCELERATOR=cpu $(BIN)/python -m pytest -q -m "not slow" $(PYTEST_ARGS)

# The demo compiles its training step (inductor writes C++ on a CPU): a C++ compiler, as DeepSpeed's
# CPU ops also need. Without one the demo still runs, eager and ~1.5x slower.
compiler:
	@command -v g++ >/dev/null 2>&1 || command -v clang++ >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq g++ >/dev/null) \
	  || echo "g++ is missing: install it (apt-get install g++); without it the demo trains eager (slower)"; }

demo: $(STAMP) compiler
	DS_ACCELERATOR=cpu $(BIN)/omni demo --out demo_out

bench: $(STAMP)
	DS_ACCELERATOR=cpu $(BIN)/python -m benchmarks.run --quick

lint: $(STAMP)
	$(BIN)/ruff check omni tests benchmarks

clean:
	rm -rf $(VENV) demo_out .pytest_cache
