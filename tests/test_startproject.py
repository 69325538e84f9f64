"""A project made by ``django-admin startproject`` just works, on Django's own defaults.

The README's quick start, followed as a new user would: a fresh project (its SQLite
settings untouched: no WAL, a 5 s busy timeout, deferred transactions), coati_queue
installed in this virtualenv as the README says, an app whose ``tasks.py`` writes to
the database, ``migrate``, ``.send()``, ``runworkers --burst`` with the default
processes and threads. Worker processes, their threads and a second sender then
compete for the one SQLite file; nothing may fail with ``database is locked``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

#: Quick tasks sent before the workers start, and by a second sender while they run.
FIRST_BATCH, SECOND_BATCH = 300, 200

MODELS = '''
from django.db import models


class Note(models.Model):
    n = models.IntegerField()
'''

TASKS = '''
import os
import time

import coati_queue
from django.db import transaction

from .models import Note


@coati_queue.task(name="shop.note")
def note(n):
    # A read then a write in one transaction, as application code does.
    with transaction.atomic():
        Note.objects.filter(n=n).exists()
        Note.objects.create(n=n)
    return n


@coati_queue.task(name="shop.hold")
def hold(started, gate):
    """Keeps one worker busy (so the burst cannot end) until the test opens the gate."""
    open(started, "w").close()
    deadline = time.monotonic() + 120
    while not os.path.exists(gate):
        if time.monotonic() > deadline:
            raise RuntimeError("the gate was never opened")
        time.sleep(0.01)
'''

SEND = '''
from shop.tasks import note
for n in range({start}, {stop}):
    note.send(n)
'''

SUMMARY = '''
import json
from django.db.models import Count
from coati_queue.models import TaskResult
from shop.models import Note
print(json.dumps({"states": dict(TaskResult.objects.values_list("status")
                                 .annotate(n=Count("id")).order_by()),
                  "total": TaskResult.objects.count(), "notes": Note.objects.count(),
                  "errors": list(TaskResult.objects.exclude(error="").values_list("error",
                                                                                  flat=True)[:5])}))
'''

BAD_OUTPUT = ("Traceback", "OperationalError", "database is locked")


def _bin(name: str) -> list[str]:
    """``django-admin`` of this virtualenv (``python -m django`` if it has none)."""
    script = Path(sys.executable).parent / name
    return [str(script)] if script.exists() else [sys.executable, "-m", "django"]


@pytest.fixture
def project(tmp_path):
    """A fresh ``startproject`` with an app ``shop``, migrated; yields (dir, env, run)."""
    root = tmp_path / "mysite"
    root.mkdir()
    queue = tmp_path / "queue"
    queue.mkdir(mode=0o700)
    env = {key: value for key, value in os.environ.items()
           if not key.startswith(("COATI_", "DJANGO_")) and key not in (
               "REDIS_URL", "QUEUE_ENABLED", "PYTHONPATH")}
    # The one thing set from outside: where Huey keeps its files (README: COATI_QUEUE_PATH).
    env.update({"COATI_QUEUE_PATH": str(queue), "PYTHONUNBUFFERED": "1"})

    def run(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        completed = subprocess.run(args, cwd=root, env=env, capture_output=True, text=True,
                                   timeout=timeout)
        assert completed.returncode == 0, f"{args} exited {completed.returncode}:\n" \
                                          f"{completed.stdout}\n{completed.stderr}"
        return completed

    run(*_bin("django-admin"), "startproject", "mysite", ".")
    manage = [sys.executable, "manage.py"]
    run(*manage, "startapp", "shop")
    with open(root / "mysite" / "settings.py", "a") as settings:
        settings.write('\nINSTALLED_APPS += ["coati_queue", "shop"]\n')
    (root / "shop" / "models.py").write_text(MODELS)
    (root / "shop" / "tasks.py").write_text(TASKS)
    run(*manage, "makemigrations", "shop")
    migrated = run(*manage, "migrate")
    output = migrated.stdout + migrated.stderr
    assert "coati_queue.W001" not in output, output  # coati makes its own SQLite setup work
    return root, env, run


def test_fresh_startproject_runs_its_tasks_without_database_locks(project, tmp_path):
    root, env, run = project
    manage = [sys.executable, "manage.py"]
    started, gate = tmp_path / "hold-started", tmp_path / "gate"
    run(*manage, "shell", "-c",
        f"from shop.tasks import hold; hold.send({str(started)!r}, {str(gate)!r})"
        + SEND.format(start=0, stop=FIRST_BATCH))
    log = open(tmp_path / "runworkers.log", "w+")
    workers = subprocess.Popen([*manage, "runworkers", "--burst"], cwd=root, env=env,
                               stdout=log, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 60
        while not started.exists():
            assert workers.poll() is None, "runworkers ended before the hold task started"
            assert time.monotonic() < deadline, "the hold task never started"
            time.sleep(0.01)
        # A second process sends while the workers run: the hold task keeps the burst
        # going until every one of these is queued.
        second = run(*manage, "shell", "-c",
                     SEND.format(start=FIRST_BATCH, stop=FIRST_BATCH + SECOND_BATCH))
        gate.touch()
        code = workers.wait(timeout=120)
    finally:
        if workers.poll() is None:
            workers.kill()
            workers.wait()
    log.seek(0)
    output = log.read()
    log.close()
    assert code == 0, output
    for text in (output, second.stdout + second.stderr):
        assert not [bad for bad in BAD_OUTPUT if bad in text], text
    summary = json.loads(run(*manage, "shell", "-c", SUMMARY).stdout.strip().splitlines()[-1])
    total = FIRST_BATCH + SECOND_BATCH + 1
    assert summary["total"] == total, summary
    assert summary["states"] == {"completed": total}, summary
    assert summary["notes"] == FIRST_BATCH + SECOND_BATCH, summary



@pytest.mark.parametrize("options, name, warned", [
    ({}, "db.sqlite3", False),  # startproject's: coati switches it to WAL itself
    ({"init_command": "PRAGMA journal_mode=WAL;"}, "db.sqlite3", False),
    ({"init_command": "PRAGMA journal_mode = delete"}, "db.sqlite3", True),  # the project's
    ({}, ":memory:", True),
    ({}, "file:shared?mode=memory&cache=shared", True),
])
def test_w001_only_where_coati_cannot_switch_to_wal(monkeypatch, options, name, warned):
    from django.conf import settings

    from coati_queue.checks import check_queue_settings

    monkeypatch.setitem(settings.DATABASES, "default", {
        "ENGINE": "django.db.backends.sqlite3", "NAME": name, "OPTIONS": options})
    ids = [message.id for message in check_queue_settings()]
    assert ("coati_queue.W001" in ids) is warned, ids
