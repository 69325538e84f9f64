# The two commands a new user types: `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
DEMO_EMPLOYEES ?= 1000
DEMO_PLANILLA  ?= planilla_demo

.PHONY: demo test test-next install system-deps bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

# Reinstall when the package metadata changes.
$(VENV)/.installed: setup.cfg pyproject.toml | $(PY)
	$(PY) -m pip install -q -e ".[test,demo]"
	touch $@

install: $(VENV)/.installed

# Real services for the tests: redis-server, and Chromium + ChromeDriver for the
# admin pages. Installed from Debian when missing and we are root.
system-deps:
	@missing=""; \
	command -v redis-server >/dev/null 2>&1 || missing="$$missing redis-server"; \
	command -v chromium >/dev/null 2>&1 || missing="$$missing chromium"; \
	command -v chromedriver >/dev/null 2>&1 || missing="$$missing chromium-driver"; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    echo "Installing$$missing"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	  else \
	    echo "Missing$$missing: install them (sudo apt-get install$$missing) or tests needing them skip"; \
	  fi; \
	fi

test: install system-deps
	$(PY) manage.py check --fail-level WARNING
	$(PY) manage.py makemigrations --check --dry-run
	$(PY) -m pytest --ds=tests.settings

# Main job: a payroll of $(DEMO_EMPLOYEES) employees on the embedded default
# (Huey + files + SQLite); with REDIS_URL set, on Dramatiq + Redis.
demo: install
	$(PY) manage.py migrate --noinput -v0
	$(PY) manage.py seed_demo --employees $(DEMO_EMPLOYEES) --seed 42 --planilla $(DEMO_PLANILLA) --reset
	@set -e; \
	$(PY) manage.py runworkers --processes 2 --threads 8 & workers=$$!; \
	trap 'kill -TERM $$workers 2>/dev/null; wait $$workers 2>/dev/null' EXIT; \
	status=0; \
	$(PY) manage.py run_payroll --planilla $(DEMO_PLANILLA) --desde 2024-01-01 --hasta 2024-01-15 --wait || status=$$?; \
	kill -TERM $$workers; wait $$workers || true; trap - EXIT; \
	echo "Workers stopped."; exit $$status

# The same suite on the next Python and Django (3.12 + Django 6.x) in .venv-next,
# for maintainers; CI runs `make test`. PYTHON_NEXT=/path/to/python3.12 to choose.
# (pyenv's own builds first: its python3.12 shim fails unless 3.12 is selected)
PYTHON_NEXT ?= $(firstword $(wildcard $(HOME)/.pyenv/versions/3.12*/bin/python) \
                           $(shell command -v python3.12))
test-next: system-deps
	@test -n "$(PYTHON_NEXT)" || { echo "No Python 3.12 found: set PYTHON_NEXT"; exit 1; }
	$(MAKE) install VENV=.venv-next PYTHON=$(PYTHON_NEXT)
	.venv-next/bin/python -m pip install -q "django>=6,<7"
	.venv-next/bin/python -m pytest --ds=tests.settings

bench: install system-deps
	$(PY) benchmarks/throughput.py
	$(PY) benchmarks/payroll.py

clean:
	rm -rf $(VENV) .venv-next .coati_queue example_project/db.sqlite3* test-artifacts
