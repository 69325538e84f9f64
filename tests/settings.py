"""Settings for the test suite: the example project's apps on a file SQLite database
(or on PostgreSQL with ``COATI_TEST_DATABASE=postgres``, see DATABASES below).

A file (not :memory:) database, so worker subprocesses started by the tests
see what the test process wrote.
"""

import json
import os
import tempfile

import django
from django.core.exceptions import ImproperlyConfigured

from example_project.database import database_settings

BASE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SECRET_KEY = "coati-queue-tests"
DEBUG = False
ALLOWED_HOSTS = ["*"]
USE_TZ = True
TIME_ZONE = "America/Managua"
LANGUAGE_CODE = "en"
LANGUAGES = [("es", "Español"), ("en", "English")]
INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "coati_queue",
    "example_project.payroll",
    "tests.testapp",
]
MIDDLEWARE = [
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.locale.LocaleMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
]
ROOT_URLCONF = "example_project.urls"
TEMPLATES = [{
    "BACKEND": "django.template.backends.django.DjangoTemplates",
    "DIRS": [],
    "APP_DIRS": True,
    "OPTIONS": {"context_processors": [
        "django.template.context_processors.request",
        "django.contrib.auth.context_processors.auth",
        "django.contrib.messages.context_processors.messages",
    ]},
}]
STATIC_URL = "/static/"
# The database: DATABASE_URL (dj-database-url) when set, else one SQLite file per test
# session. COATI_TEST_DATABASE=postgres without a DATABASE_URL starts a throw-away
# PostgreSQL cluster for this process (tests/pg_cluster.py) and exports its URL.
# Worker subprocesses inherit DATABASE_URL and get the test database's name in
# COATI_TEST_DB (tests/conftest.py worker_env), so they use the test process's data.
TEST_DATABASE = os.environ.get("COATI_TEST_DATABASE", "sqlite").strip().lower() or "sqlite"
if TEST_DATABASE not in ("sqlite", "postgres"):
    raise ImproperlyConfigured(f"COATI_TEST_DATABASE={TEST_DATABASE!r}: use sqlite or postgres")
POSTGRES_UNAVAILABLE = ""  # why the PostgreSQL run cannot happen here (tests skip, not in CI)
if TEST_DATABASE == "postgres" and not os.environ.get("DATABASE_URL"):
    from tests.pg_cluster import PostgresUnavailable, session_database_url

    try:
        session_database_url()
    except PostgresUnavailable as error:
        if os.environ.get("CI") == "true":
            raise ImproperlyConfigured(f"COATI_TEST_DATABASE=postgres: {error}") from error
        POSTGRES_UNAVAILABLE = str(error)
DATABASE_URL = "" if POSTGRES_UNAVAILABLE else os.environ.get("DATABASE_URL", "")
if DATABASE_URL:
    DATABASES = {"default": database_settings(DATABASE_URL, "")}
    if os.environ.get("COATI_TEST_DB"):  # a worker subprocess: the test database itself
        DATABASES["default"]["NAME"] = os.environ["COATI_TEST_DB"]
else:
    DATABASES = {"default": database_settings(None, os.environ.setdefault(
        "COATI_TEST_DB",
        os.path.join(tempfile.gettempdir(), f"coati_test_{os.getpid()}.sqlite3")))}
if DATABASES["default"]["ENGINE"].endswith("sqlite3"):
    # A file the workers open too, not Django's in-memory test database. (On a server
    # Django creates test_<NAME>, so a DATABASE_URL naming real data is never dropped.)
    DATABASES["default"]["TEST"] = {"NAME": DATABASES["default"]["NAME"]}
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
COATI_QUEUE = {
    "PAYROLL": {
        "ACTIVE_EMPLOYEES": "example_project.payroll.services.active_employee_ids",
        "CALCULATE_EMPLOYEE": "example_project.payroll.services.calculate_and_store",
        # The browser test's workers use a paced hook (tests/testapp/payroll_hooks.py).
        "CALCULATE_MANY": os.environ.get("COATI_TEST_CALCULATE_MANY",
                                         "example_project.payroll.services.calculate_many"),
    },
}
# Worker subprocesses of the fault battery (tests/test_faults.py) get shortened delivery
# settings (heartbeats, reconcile intervals, chunk size) through the environment.
COATI_QUEUE.update(json.loads(os.environ.get("COATI_TEST_QUEUE_OVERRIDES", "{}")))
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"console": {"class": "logging.StreamHandler"}},
    "loggers": {"coati_queue": {"handlers": ["console"], "level": "INFO"}},
}

# Django 6+: django.tasks functions run on coati_queue (tests/test_django_tasks.py).
if django.VERSION >= (6, 0):
    TASKS = {"default": {"BACKEND": "coati_queue.django_tasks.CoatiTaskBackend"}}
