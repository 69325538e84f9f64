from tests.settings import *  # noqa
INSTALLED_APPS = [a for a in INSTALLED_APPS if a not in ("example_project.payroll",)]
ROOT_URLCONF = "tests.urls_empty"
COATI_QUEUE = {}
DATABASES["default"]["NAME"] = "/tmp/smoke.sqlite3"
