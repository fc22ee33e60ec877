# lmforge: `make demo` runs the demo pipeline, `make test` runs the test suite.
# Both set themselves up on a fresh machine (a virtual environment in .venv).

VENV ?= .venv
PY := $(VENV)/bin/python
export OMP_WAIT_POLICY ?= PASSIVE

.PHONY: setup system-tools demo test unit lint typecheck proto bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

demo: setup
	$(PY) scripts/demo.py

# The suite runs a real Prometheus (and promtool) from Debian's `prometheus` package:
# installed here when run as root, otherwise one line says what to install.
APT_TOOLS := prometheus promtool
system-tools:
	@missing=""; for tool in $(APT_TOOLS); do command -v $$tool >/dev/null || missing="$$missing $$tool"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then apt-get install -y -q prometheus >/dev/null; \
	  else echo "make test needs Debian's prometheus package (missing:$$missing): run 'sudo apt-get install -y prometheus' or make test as root"; exit 2; fi; \
	fi

test: setup system-tools
	$(PY) -m ruff check .
	$(PY) -m mypy
	$(PY) -m pytest -q --durations=15

# The tier without a nats-server, torchrun, the whole pipeline, an embedding model or child
# processes (engine processes, the CLI): under a minute.
unit: setup
	$(PY) -m pytest -q -m "not (connected or e2e or distributed or embeddings or processes)" \
		-p no:cacheprovider

lint: setup
	$(PY) -m ruff check .

# mypy over libs/lmforge and services, configured in pyproject.toml ([tool.mypy]).
typecheck: setup
	$(PY) -m mypy

proto: setup
	$(PY) -m lmforge.contracts.codegen

bench: setup
	$(PY) benchmarks/bus_hop.py

clean:
	rm -rf $(VENV) .lmforge .cache
