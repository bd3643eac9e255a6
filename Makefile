# `make serve` and `make test` each create .venv when missing, install the project, then run.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.xmodal-installed
RAY_STAMP := $(VENV)/.xmodal-ray-installed
# torch/torchvision pinned to the builds this machine carries on disk (see README: The two commands).
TORCH_PINS ?= torch==2.14.1 torchvision==0.29.1
HOST ?= 127.0.0.1
PORT ?= 8000

.PHONY: venv serve test test-ray lint typecheck pytest fuzz browser-deps clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install --upgrade pip >/dev/null
	$(BIN)/pip install $(TORCH_PINS)
	$(BIN)/pip install -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

# Chromium for the browser tests comes from Debian's packages; best effort, the tests skip without it.
browser-deps:
	@if [ ! -x /usr/bin/chromium ] && command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null) \
		|| echo "chromium could not be installed: browser tests will skip"; \
	fi

serve: $(STAMP)
	$(BIN)/xmodal serve --host $(HOST) --port $(PORT)

lint: $(STAMP)
	$(BIN)/ruff check app models index tests bench
	$(BIN)/ruff format --check app models index tests bench

typecheck: $(STAMP)
	$(BIN)/mypy

# The tests never touch the network: the tiny model, random or locally saved weights.
# Two workers: much of the suite waits on server processes starting (imports, seconds each), so
# two tests side by side fill the 2 cores (10:41 -> ~8 min on this machine).
PYTEST_WORKERS ?= 2
pytest: $(STAMP) browser-deps
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -m "not ray" -n $(PYTEST_WORKERS) --dist load tests

test: lint typecheck pytest

# The Ray engine (`xmodal embed`, `xmodal serve --engine ray`) on a local 2-CPU Ray cluster.
# Installs the ray extra first (once per pyproject.toml change): CI runs on a clean clone.
$(RAY_STAMP): $(STAMP)
	$(BIN)/pip install -e '.[dev,ray]'
	touch $(RAY_STAMP)

test-ray: $(RAY_STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -m ray tests/distributed

# The long schemathesis run (all checks, all modes, stateful phase); `make test` runs it for 40 s.
FUZZ_SECONDS ?= 240
fuzz: $(STAMP)
	HF_HUB_OFFLINE=1 FUZZ_SECONDS=$(FUZZ_SECONDS) $(BIN)/python -m pytest -q tests/e2e/test_fuzz.py --timeout=$$(($(FUZZ_SECONDS) + 600))

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
