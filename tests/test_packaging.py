"""What ``pip install coati-queue`` gives a user: a wheel and an sdist with every file the
app needs at run time, installed into a fresh virtualenv and used by a project outside
this repository (so nothing is imported from the source tree).

Built with ``python -m build --no-isolation`` (the venv's setuptools and wheel; no
download at build time), without ``--wheel``/``--sdist``: the sdist is built first and the
wheel from the unpacked sdist, so a file the sdist lacks is missing from the wheel too.
Select with ``-m packaging``.
"""

from __future__ import annotations

import gettext
import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import textwrap
import zipfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.packaging

REPO = Path(__file__).resolve().parent.parent
PACKAGE = REPO / "coati_queue"
RUNTIME_DEPENDENCIES = ("django", "dramatiq", "huey", "redis", "prometheus-client")
NOT_SHIPPED = shutil.ignore_patterns(".git", ".venv*", "build", "dist", "*.egg-info",
                                     "__pycache__", "*.pyc", ".coati_queue", "test-artifacts",
                                     "*.sqlite3*", ".pytest_cache", ".mypy_cache")


def package_files() -> set[str]:
    """Every file of the package in the source tree, as ``coati_queue/...``."""
    return {path.relative_to(REPO).as_posix() for path in PACKAGE.rglob("*")
            if path.is_file() and "__pycache__" not in path.parts and path.suffix != ".pyc"}


def po_translation(language: str, msgid: str) -> str:
    """The msgstr of a one-line entry of coati_queue's catalog for ``language``."""
    po = (PACKAGE / "locale" / language / "LC_MESSAGES" / "django.po").read_text("utf-8")
    match = re.search(rf'^msgid "{re.escape(msgid)}"\nmsgstr "(.+)"$', po, re.MULTILINE)
    assert match, f"{msgid!r} is not translated in the {language} catalog"
    return match[1]


@pytest.fixture(scope="module")
def dists(tmp_path_factory) -> dict[str, Path]:
    """The sdist and the wheel (built from that sdist) of a copy of the source tree."""
    work = tmp_path_factory.mktemp("build")
    source = work / "src"
    shutil.copytree(REPO, source, ignore=NOT_SHIPPED)
    completed = subprocess.run(
        [sys.executable, "-m", "build", "--no-isolation", "--outdir", str(work / "dist"),
         str(source)], capture_output=True, text=True, timeout=180)
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    assert "Package would be ignored" not in completed.stdout + completed.stderr
    wheels = list((work / "dist").glob("coati_queue-*.whl"))
    sdists = list((work / "dist").glob("coati_queue-*.tar.gz"))
    assert len(wheels) == 1 and len(sdists) == 1, list((work / "dist").iterdir())
    return {"wheel": wheels[0], "sdist": sdists[0]}


def assert_ships_the_package(names: set[str], where: str) -> None:
    expected = package_files()
    assert not expected - names, f"missing from the {where}: {sorted(expected - names)}"
    # Spelled out, so a failure says which kind of file a user would lack.
    migrations = {name for name in expected
                  if re.fullmatch(r"coati_queue/migrations/\w+\.py", name)}
    for kind, wanted in {
        "admin templates": {n for n in expected if n.startswith("coati_queue/templates/admin/")},
        "static files": {n for n in expected if n.startswith("coati_queue/static/coati_queue/")},
        "compiled catalogs": {n for n in expected if n.endswith("/LC_MESSAGES/django.mo")},
        "migrations": migrations,
        "py.typed": {"coati_queue/py.typed"},
    }.items():
        assert wanted, f"the source tree has no {kind}"
        assert wanted <= names, f"{kind} missing from the {where}: {sorted(wanted - names)}"
    assert len(migrations) >= 7  # __init__ and 0001..0006 at least


def test_wheel_ships_every_file_of_the_package(dists):
    with zipfile.ZipFile(dists["wheel"]) as wheel:
        names = set(wheel.namelist())
    package = {name for name in names if name.startswith("coati_queue/")}
    assert_ships_the_package(package, "wheel")
    assert package == package_files(), "the wheel ships files the source tree does not have"
    metadata = next(name for name in names if name.endswith(".dist-info/METADATA"))
    with zipfile.ZipFile(dists["wheel"]) as wheel:
        requires = [line.split(": ", 1)[1] for line in
                    wheel.read(metadata).decode().splitlines() if line.startswith("Requires-Dist")]
    required = {re.match(r"[A-Za-z0-9_.-]+", line)[0].lower() for line in requires
                if "extra ==" not in line}
    assert required == set(RUNTIME_DEPENDENCIES), requires


def test_sdist_ships_the_package_and_its_build_files(dists):
    with tarfile.open(dists["sdist"]) as sdist:
        names = {name.split("/", 1)[1] for name in sdist.getnames() if "/" in name}
    assert_ships_the_package({name for name in names if name.startswith("coati_queue/")}, "sdist")
    assert {"setup.cfg", "pyproject.toml", "README.rst", "PKG-INFO"} <= names


def test_committed_catalogs_are_compiled_from_their_po_files(tmp_path):
    """The .mo files are committed (a wheel build needs no gettext); a .po edited without
    recompiling would ship the old translations."""
    msgfmt = shutil.which("msgfmt")
    if msgfmt is None:
        message = "msgfmt is not installed (apt-get install gettext)"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    catalogs = sorted(PACKAGE.glob("locale/*/LC_MESSAGES/django.po"))
    assert catalogs
    for po in catalogs:
        compiled = tmp_path / f"{po.parent.parent.name}.mo"
        subprocess.run([msgfmt, "--check", "-o", str(compiled), str(po)], check=True, timeout=30)
        with open(compiled, "rb") as fresh, open(po.with_suffix(".mo"), "rb") as committed:
            expected = gettext.GNUTranslations(fresh)._catalog
            shipped = gettext.GNUTranslations(committed)._catalog
        stale = sorted(key for key in expected.keys() | shipped.keys()
                       if expected.get(key) != shipped.get(key))
        assert not stale, (f"{po.with_suffix('.mo')} is stale; run `django-admin "
                           f"compilemessages` in coati_queue/ (differs for {stale[:5]})")


SETTINGS = '''\
from pathlib import Path

HERE = Path(__file__).resolve().parent
SECRET_KEY = "packaging-smoke-test"
DEBUG = False
ALLOWED_HOSTS = ["testserver"]
USE_TZ = True
USE_I18N = True
LANGUAGE_CODE = "es"
INSTALLED_APPS = [
    "django.contrib.admin", "django.contrib.auth", "django.contrib.contenttypes",
    "django.contrib.sessions", "django.contrib.messages", "django.contrib.staticfiles",
    "coati_queue", "smokeapp",
]
MIDDLEWARE = [
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
]
ROOT_URLCONF = "urls"
TEMPLATES = [{
    "BACKEND": "django.template.backends.django.DjangoTemplates",
    "APP_DIRS": True,
    "OPTIONS": {"context_processors": [
        "django.template.context_processors.request",
        "django.contrib.auth.context_processors.auth",
        "django.contrib.messages.context_processors.messages",
    ]},
}]
DATABASES = {"default": {"ENGINE": "django.db.backends.sqlite3", "NAME": HERE / "db.sqlite3"}}
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
STATIC_URL = "/static/"
COATI_QUEUE = {"BACKEND": "huey", "PATH": str(HERE / "queue"), "WORKER_PROCESSES": 1,
               "WORKER_THREADS": 1}
'''

URLS = '''\
from django.contrib import admin
from django.urls import path

urlpatterns = [path("admin/", admin.site.urls)]
'''

TASKS = '''\
from coati_queue import task


@task
def add(a: int, b: int) -> int:
    return a + b
'''

SMOKE = '''\
import json
import subprocess
import sys

import django

django.setup()

from django.contrib.auth.models import User
from django.contrib.staticfiles import finders
from django.core.management import call_command
from django.db.migrations.recorder import MigrationRecorder
from django.template.loader import get_template
from django.test import Client
from django.utils import translation

import coati_queue
from coati_queue import get_queue_driver
from smokeapp.tasks import add

call_command("migrate", verbosity=0)
task_id = add.send(2, 3)
worker = subprocess.run([sys.executable, "-m", "django", "runworkers", "--burst"],
                        capture_output=True, text=True, timeout=120)
result = get_queue_driver().get_task_result(task_id)

client = Client()
client.force_login(User.objects.create_superuser("admin", "admin@example.com", "x"))
changelist = client.get("/admin/coati_queue/taskresult/")
overview = client.get("/admin/coati_queue/taskresult/overview/")
with translation.override("es"):
    app_name = str(translation.gettext("Background jobs"))
print(json.dumps({
    "package": coati_queue.__file__,
    "worker": [worker.returncode, worker.stdout[-2000:], worker.stderr[-2000:]],
    "status": result and result["status"],
    "result": result and result["result"],
    "applied": sorted(name for app, name in
                      MigrationRecorder.Migration.objects.values_list("app", "name")
                      if app == "coati_queue"),
    "template": get_template("admin/coati_queue/taskresult/overview.html").origin.name,
    "static": finders.find("coati_queue/admin.css"),
    "app_name": app_name,
    "changelist": [changelist.status_code, changelist.content.decode()],
    "overview": [overview.status_code, overview.content.decode()],
}))
'''


def test_installed_wheel_runs_a_project_outside_the_repository(dists, tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    # The dependencies at the versions this suite runs on (lowest or newest line).
    constraints = tmp_path / "constraints.txt"
    constraints.write_text("".join(f"{name}=={importlib.metadata.version(name)}\n"
                                   for name in RUNTIME_DEPENDENCIES))
    install = subprocess.run(
        [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check",
         "-c", str(constraints), str(dists["wheel"])],
        capture_output=True, text=True, timeout=300)
    assert install.returncode == 0, install.stdout[-3000:] + install.stderr[-3000:]

    project = tmp_path / "project"
    (project / "smokeapp").mkdir(parents=True)
    (project / "settings.py").write_text(SETTINGS)
    (project / "urls.py").write_text(URLS)
    (project / "smokeapp" / "__init__.py").write_text("")
    (project / "smokeapp" / "tasks.py").write_text(TASKS)
    (project / "smoke.py").write_text(SMOKE)
    env = {key: value for key, value in os.environ.items()
           if key not in {"PYTHONPATH", "DJANGO_SETTINGS_MODULE", "VIRTUAL_ENV"}
           and not key.startswith("COATI_QUEUE") and key not in {"REDIS_URL", "QUEUE_ENABLED"}}
    env.update(DJANGO_SETTINGS_MODULE="settings", PYTHONPATH=str(project))
    smoke = subprocess.run([str(python), "smoke.py"], cwd=project, env=env,
                           capture_output=True, text=True, timeout=180)
    assert smoke.returncode == 0, smoke.stdout[-3000:] + smoke.stderr[-5000:]
    report = json.loads(smoke.stdout.strip().splitlines()[-1])

    site_packages = str(venv / "lib")
    assert report["package"].startswith(site_packages), report["package"]
    assert report["worker"][0] == 0, report["worker"]
    assert (report["status"], report["result"]) == ("completed", 5), report
    shipped = sorted(path.stem for path in (PACKAGE / "migrations").glob("0*.py"))
    assert report["applied"] == shipped
    assert report["template"].startswith(site_packages), report["template"]
    assert report["static"] and report["static"].startswith(site_packages), report["static"]
    translated = po_translation("es", "Background jobs")
    assert report["app_name"] == translated != "Background jobs"
    status, page = report["changelist"]
    assert status == 200, page[-2000:]
    assert "smokeapp.tasks.add" in page and translated in page
    status, page = report["overview"]
    assert status == 200, page[-2000:]
    assert "coati_queue/admin.css" in page
