# The README's commands. Both create and use .venv; nothing needs installing by hand.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PORT ?= 8000
STAMP := $(VENV)/.installed

SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: serve test unit integration lint clean redis

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	# torch first, pinned: the CPU build on this machine's disk, instead of a multi-GB CUDA download
	$(BIN)/pip install --quiet "torch==2.13.0"
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $(STAMP)

# The result cache's integration tests run a real redis-server: Debian's package, installed once.
redis:
	@command -v redis-server >/dev/null || { $(SUDO) apt-get update -q && $(SUDO) apt-get install -y -q redis-server; }

serve: $(STAMP)
	$(BIN)/ragfan serve --port $(PORT)

# The multinode tests start a Ray cluster of their own (ray.cluster_utils.Cluster): a second process.
test: $(STAMP) redis
	$(BIN)/python -m pytest tests --ignore=tests/multinode
	$(BIN)/python -m pytest tests/multinode

unit: $(STAMP)
	$(BIN)/python -m pytest tests/unit

integration: $(STAMP) redis
	$(BIN)/python -m pytest tests/integration
	$(BIN)/python -m pytest tests/multinode

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/mypy actors serve_app

clean:
	rm -rf $(VENV) .pytest_cache
