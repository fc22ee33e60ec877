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

# The suite runs a real Prometheus (and promtool) from Debian's `prometheus` package, and
# drives Debian's `chromium` headless for the status page test (playwright only drives it,
# it downloads no browser): installed here when run as root, otherwise one line says what
# to install. Each entry is TOOL:PACKAGE.
APT_TOOLS := prometheus:prometheus promtool:prometheus chromium:chromium
system-tools:
	@missing=""; packages=""; \
	for entry in $(APT_TOOLS); do tool=$${entry%%:*}; package=$${entry#*:}; \
	  if ! command -v $$tool >/dev/null; then missing="$$missing $$tool"; \
	    case " $$packages " in *" $$package "*) ;; *) packages="$$packages $$package";; esac; \
	  fi; \
	done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    echo "make test: installing Debian's$$packages (missing:$$missing)"; \
	    apt-get install -y -q $$packages >/dev/null || \
	      { apt-get update -q >/dev/null && apt-get install -y -q $$packages >/dev/null; }; \
	  else echo "make test needs Debian's$$packages (missing:$$missing): run 'sudo apt-get install -y$$packages' or make test as root"; exit 2; fi; \
	fi

test: setup system-tools
	$(PY) -m ruff check .
	$(PY) -m mypy
	$(PY) -m pytest -q --durations=15

# The tier without a nats-server, torchrun, the whole pipeline, an embedding model or child
# processes (engine processes, the CLI) or another server (moto, the Kubernetes stand-in, a
# gateway with its engine): under a minute.
unit: setup
	$(PY) -m pytest -q -m "not (connected or e2e or distributed or embeddings or processes or servers)" \
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
