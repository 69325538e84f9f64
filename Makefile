# The two commands a new user types: `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
DEMO_EMPLOYEES ?= 1000
DEMO_PLANILLA  ?= planilla_demo

.PHONY: demo test test-lts test-next install system-deps bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

# .venv is the long-term-support line at the *lowest* versions setup.cfg allows
# (tests/constraints-lowest.txt), so the bottom of every range is what CI proves.
# Reinstall when the package metadata or the pins change.
LOWEST := tests/constraints-lowest.txt
$(VENV)/.installed: setup.cfg pyproject.toml $(LOWEST) | $(PY)
	$(PY) -m pip install -q -c $(LOWEST) -e ".[test,demo]"
	$(PY) -m pip check
	touch $@

install: $(VENV)/.installed

# Real services for the tests: redis-server, PostgreSQL, Chromium + ChromeDriver
# for the admin pages, iproute2 for the multi-host test, gettext for the .mo check. Installed from Debian when missing and we are root.
system-deps:
	@missing=""; \
	command -v redis-server >/dev/null 2>&1 || missing="$$missing redis-server"; \
	ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || missing="$$missing postgresql"; \
	command -v chromium >/dev/null 2>&1 || missing="$$missing chromium"; \
	command -v chromedriver >/dev/null 2>&1 || missing="$$missing chromium-driver"; \
	command -v ip >/dev/null 2>&1 || missing="$$missing iproute2"; \
	command -v msgfmt >/dev/null 2>&1 || missing="$$missing gettext"; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    echo "Installing$$missing"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	  else \
	    echo "Missing$$missing: install them (sudo apt-get install$$missing) or tests needing them skip"; \
	  fi; \
	fi

# The whole suite on both supported lines:
#   1. Python 3.11 + Django 5.2 LTS, lowest allowed versions, SQLite (WAL)   .venv
#   2. Python 3.12 + newest Django 6.x and newest libraries, PostgreSQL      .venv-next
test: test-lts test-next

test-lts: install system-deps
	$(PY) manage.py check --fail-level WARNING
	$(PY) manage.py makemigrations --check --dry-run
	$(PY) -m pytest --ds=tests.settings

# Python 3.12 from: PYTHON_NEXT=..., python3.12 on the PATH, pyenv's builds, uv's
# managed Pythons (installed with `uv python install 3.12` where uv can download).
# Missing: a failure under CI=true, a loud skip otherwise.
VENV_NEXT := .venv-next
PY_NEXT   := $(VENV_NEXT)/bin/python
find_python312 = for p in "$(PYTHON_NEXT)" python3.12 $(HOME)/.pyenv/versions/3.12*/bin/python \
	  $$(uv python find 3.12 2>/dev/null); do \
	  [ -n "$$p" ] && "$$p" -c 'import sys; assert sys.version_info[:2] == (3, 12)' \
	    >/dev/null 2>&1 && { echo "$$p"; break; }; done

$(PY_NEXT):
	@py="$$($(find_python312))"; \
	if [ -z "$$py" ] && command -v uv >/dev/null 2>&1; then \
	  uv python install 3.12 && py="$$($(find_python312))"; fi; \
	if [ -z "$$py" ]; then \
	  echo "No Python 3.12 found (PATH, pyenv, uv): set PYTHON_NEXT=/path/to/python3.12"; \
	  exit 1; fi; \
	echo "Python 3.12 line: $$py"; \
	"$$py" -m venv $(VENV_NEXT) && $(PY_NEXT) -m pip install -q --upgrade pip

# The newest release of everything setup.cfg allows (upgraded when the metadata changes).
$(VENV_NEXT)/.installed: setup.cfg pyproject.toml | $(PY_NEXT)
	$(PY_NEXT) -m pip install -q --upgrade --upgrade-strategy eager -e ".[test,demo]"
	touch $@

test-next: system-deps
	@if ! $(MAKE) -s $(PY_NEXT); then \
	  if [ "$$CI" = true ]; then echo "FAIL: the Python 3.12 + Django 6 line cannot run"; exit 1; fi; \
	  echo "SKIPPED: the Python 3.12 + Django 6 line (no Python 3.12 here)"; exit 0; fi; \
	set -e; \
	$(MAKE) -s $(VENV_NEXT)/.installed; \
	$(PY_NEXT) -c 'import django; assert django.VERSION >= (6,), django.__version__'; \
	$(PY_NEXT) manage.py check --fail-level WARNING; \
	COATI_TEST_DATABASE=postgres $(PY_NEXT) -m pytest --ds=tests.settings

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

bench: install system-deps
	$(PY) benchmarks/throughput.py
	$(PY) benchmarks/payroll.py

clean:
	rm -rf $(VENV) .venv-next .coati_queue example_project/db.sqlite3* test-artifacts
