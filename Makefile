# The README's commands. Both create and use .venv; nothing needs installing by hand.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PORT ?= 8000
STAMP := $(VENV)/.installed

SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: serve test unit integration lint clean debs redis

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	# torch first, pinned: the CPU build on this machine's disk, instead of a multi-GB CUDA download
	$(BIN)/pip install --quiet "torch==2.13.0"
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $(STAMP)

# The integration tests run real servers from Debian's packages, installed once with apt when missing:
# redis-server (the result cache), prometheus (ragfan's metrics) and chromium (the /dashboard page).
DEBS := redis-server prometheus chromium
debs:
	@missing=$$(for deb in $(DEBS); do command -v $$deb >/dev/null || echo $$deb; done); \
	[ -z "$$missing" ] || { $(SUDO) apt-get update -q && $(SUDO) apt-get install -y -q --no-install-recommends $$missing; }

redis: debs

# METRICS_PORT=8080 pins the port where Ray exports its metrics and ragfan's (cluster_configs/prometheus/)
serve: $(STAMP)
	$(BIN)/ragfan serve --port $(PORT)$(if $(METRICS_PORT), --metrics-port $(METRICS_PORT))

# The multinode tests start a Ray cluster of their own (ray.cluster_utils.Cluster): a second process.
test: $(STAMP) debs
	$(BIN)/python -m pytest tests --ignore=tests/multinode
	$(BIN)/python -m pytest tests/multinode

unit: $(STAMP)
	$(BIN)/python -m pytest tests/unit

integration: $(STAMP) debs
	$(BIN)/python -m pytest tests/integration
	$(BIN)/python -m pytest tests/multinode

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/mypy actors serve_app

clean:
	rm -rf $(VENV) .pytest_cache
