"""Settings of the example project.

This module is the only place that reads ``os.environ`` for the project's own
settings. coati_queue reads its own environment variables (``REDIS_URL``,
``QUEUE_ENABLED``, ``COATI_QUEUE_PATH``...) itself, so they are not repeated here.
"""

import os
from pathlib import Path

from example_project.database import database_settings

# The repository root: manage.py lives here, the project package below it.
BASE_DIR = Path(__file__).resolve().parent.parent

DEBUG = os.environ.get("DJANGO_DEBUG", "1").strip().lower() in {"1", "true", "yes", "on"}

SECRET_KEY = os.environ.get(
    "DJANGO_SECRET_KEY",
    "django-insecure-coati-queue-example-project-do-not-use-in-production",
)

ALLOWED_HOSTS = ["*"] if DEBUG else [
    host.strip() for host in os.environ.get("DJANGO_ALLOWED_HOSTS", "").split(",") if host.strip()
]

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "coati_queue",
    "example_project.payroll",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.locale.LocaleMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]

ROOT_URLCONF = "example_project.urls"
WSGI_APPLICATION = "example_project.wsgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

# DATABASE_URL (dj-database-url syntax: postgres://user:password@host:5432/name) picks
# the database; without it, the demo's SQLite file (DJANGO_DB_PATH to move it) with
# the options of example_project/database.py (WAL, IMMEDIATE, a 30 s lock timeout).
DATABASES = {
    "default": database_settings(
        os.environ.get("DATABASE_URL"),
        os.environ.get("DJANGO_DB_PATH") or BASE_DIR / "example_project" / "db.sqlite3"),
}

DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
]

LANGUAGE_CODE = os.environ.get("DJANGO_LANGUAGE_CODE", "es")
# Each language named in itself, as the language switcher shows them.
LANGUAGES = [("es", "Español"), ("en", "English")]
USE_I18N = True
USE_TZ = True
TIME_ZONE = "America/Managua"

STATIC_URL = "static/"
STATIC_ROOT = BASE_DIR / "example_project" / "static"

LOGIN_URL = "admin:login"

# Hooks coati_queue calls to fan a payroll out per employee (see payroll/services.py).
# CALCULATE_MANY is optional: with it a chunk of employees costs one read and one
# bulk write instead of a read and a write per employee.
COATI_QUEUE = {
    "PAYROLL": {
        "ACTIVE_EMPLOYEES": "example_project.payroll.services.active_employee_ids",
        "CALCULATE_EMPLOYEE": "example_project.payroll.services.calculate_and_store",
        "CALCULATE_MANY": "example_project.payroll.services.calculate_many",
    },
}

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {
        "simple": {"format": "%(asctime)s %(levelname)s %(name)s: %(message)s"},
    },
    "handlers": {
        "console": {"class": "logging.StreamHandler", "formatter": "simple"},
    },
    "root": {"handlers": ["console"], "level": "WARNING"},
    "loggers": {
        "coati_queue": {"handlers": ["console"], "level": "INFO", "propagate": False},
    },
}
