"""Settings for the test suite: the example project's apps on a file SQLite database.

A file (not :memory:) database, so worker subprocesses started by the tests
see what the test process wrote.
"""

import json
import os
import tempfile

import django

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
# One database file per test session; exported so worker subprocesses use it too.
DB_PATH = os.environ.setdefault(
    "COATI_TEST_DB", os.path.join(tempfile.gettempdir(), f"coati_test_{os.getpid()}.sqlite3"))
DATABASES = {
    "default": {
        "ENGINE": "django.db.backends.sqlite3",
        "NAME": DB_PATH,
        "TEST": {"NAME": DB_PATH},
        "OPTIONS": {
            "timeout": 30,
            "transaction_mode": "IMMEDIATE",
            "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
        },
    }
}
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
