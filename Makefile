# The two commands a new user needs:
#   make demo   run a local federation on the embedded default data
#   make test   lint, format check and the whole test suite
# Both create .venv and install everything from nothing.

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# CPU build of torch by default. On a GPU machine: make TORCH_SPEC="torch" (or a CUDA wheel of your choice).
TORCH_SPEC ?= torch==2.13.0

.PHONY: demo demo-comms test lint format venv bench clean chromium

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $@

venv: $(BIN)/.installed

demo: venv
	$(BIN)/python scripts/federation.py

# The comms layer alone: DHT discovery, signed int8 pushes over shaped links, rejections.
demo-comms: venv
	$(BIN)/python scripts/demo.py

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# The dashboard's browser test drives Debian's chromium through chromium-driver: installed
# when missing and apt-get can (root, or sudo without a password); elsewhere the test skips.
chromium:
	@if command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; then :; \
	elif command -v apt-get >/dev/null 2>&1; then \
	  if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO="sudo -n"; fi; \
	  { $$SUDO apt-get update -qq && $$SUDO env DEBIAN_FRONTEND=noninteractive \
	    apt-get install -y -qq --no-install-recommends chromium chromium-driver >/dev/null; } \
	  || echo "make: could not install chromium (the dashboard's browser test will skip)"; \
	else echo "make: no apt-get: the dashboard's browser test skips unless chromium is there"; fi

test: lint chromium
	$(BIN)/python -m pytest -q

format: venv
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

# Every benchmark, one after the other (they compare side by side inside each script), then
# BENCHMARKS.md from their JSON. Run on a quiet machine; it takes a while.
bench: venv
	$(BIN)/python scripts/bench_comms.py --json docs/benchmarks/bench_comms.json
	$(BIN)/python scripts/bench_aggregator.py --json docs/benchmarks/bench_aggregator.json
	$(BIN)/python scripts/bench_island.py --json docs/benchmarks/bench_island.json
	$(BIN)/python scripts/bench_ensemble.py --json docs/benchmarks/bench_ensemble.json
	$(BIN)/python scripts/bench_quality.py --json docs/benchmarks/bench_quality.json
	$(BIN)/python scripts/gen_benchmarks.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
