"""``USE_TZ = False``: coati stores naive local time, as Django does, on both backends.

SQLite refuses an aware datetime when ``USE_TZ`` is off, so before this every
``.send()`` failed. Each test runs a project on ``tests.settings_naive_time``
(``USE_TZ = False``, ``TIME_ZONE`` six hours from UTC) in subprocesses: it sends a
plain task, a delayed one and a payroll batch, drains them with ``runworkers
--burst``, then reads the records back, renders the admin pages (queue overview,
tasks, the batch, workers), the batch's progress endpoint, ``/metrics`` and
``queuestats``, and checks that every stored time is naive, local and in order.
"""

from __future__ import annotations

import datetime
import json
import os
import shutil
import subprocess
import sys

import pytest

from .conftest import REPO_ROOT

DELAY = 1.0  # seconds; the delayed task's eta
UTC_OFFSET = datetime.timedelta(hours=-6)  # America/Managua, tests/settings_naive_time.py

SEND = f'''
import datetime, json
from decimal import Decimal
from coati_queue.payroll import start_payroll_batch
from example_project.payroll.models import Company, Employee, Planilla
from tests.testapp.tasks import add

company = Company.objects.create(name="Naive time S.A.")
planilla = Planilla.objects.create(code="naive", name="naive", company=company)
Employee.objects.bulk_create([
    Employee(code=f"naive_e{{i}}", planilla=planilla, first_name="Ana", last_name=str(i),
             monthly_salary=Decimal(12000 + i), hire_date=datetime.date(2020, 3, 1))
    for i in range(3)])
sent_at = datetime.datetime.now()
plain = add.send(1, 2)
delayed = add.send_with_options(args=(2, 3), delay={DELAY})
batch = start_payroll_batch("naive", "2024-01-01", "2024-01-15")
print(json.dumps({{"sent_at": sent_at.isoformat(), "plain": plain, "delayed": delayed,
                  "batch": batch.pk}}))
'''

READ_BACK = '''
import datetime, io, json, os
from django.contrib.auth.models import User
from django.core.management import call_command
from django.test import Client
from django.urls import reverse
from coati_queue import get_queue_driver
from coati_queue.models import PayrollBatch, TaskResult, WorkerHeartbeat

ids = json.loads(os.environ["NAIVE_TEST_IDS"])
stamp = lambda value: value.isoformat() if value else None
records = {str(r.pk): {name: stamp(getattr(r, name)) for name in
                       ("enqueued_at", "eta", "started_at", "finished_at", "expires_at")}
           | {"status": r.status} for r in TaskResult.objects.all()}
batch = PayrollBatch.objects.get(pk=ids["batch"])
beats = [{"last_seen": stamp(b.last_seen), "stopped_at": stamp(b.stopped_at)}
         for b in WorkerHeartbeat.objects.all()]
admin = User.objects.create_superuser("naive", "naive@example.com", "pw")
client = Client()
client.force_login(admin)
pages = {url: client.get(url).status_code for url in (
    reverse("admin:coati_queue_taskresult_overview"),
    reverse("admin:coati_queue_taskresult_changelist"),
    reverse("admin:coati_queue_taskresult_change", args=[ids["plain"]]),
    reverse("admin:coati_queue_payrollbatch_change", args=[batch.pk]),
    reverse("admin:coati_queue_workerheartbeat_changelist"),
    reverse("coati_queue:batch-progress", args=[batch.pk]), reverse("coati_queue:metrics"))}
stats = io.StringIO()
call_command("queuestats", stdout=stats)
print(json.dumps({
    "now": datetime.datetime.now().isoformat(), "records": records, "beats": beats,
    "results": {key: get_queue_driver().get_task_result(ids[key]) for key in ("plain", "delayed")},
    "batch": {"status": batch.status, "created_at": stamp(batch.created_at),
              "started_at": stamp(batch.started_at), "finished_at": stamp(batch.finished_at)},
    "pages": pages, "queuestats": stats.getvalue()}))
'''


@pytest.fixture(scope="module")
def migrated(tmp_path_factory):
    """One migrated database file; each test works on a copy."""
    path = tmp_path_factory.mktemp("naive") / "template.sqlite3"
    _run(["migrate", "-v", "0"], {"COATI_TEST_DB": str(path), "COATI_QUEUE_BACKEND": "huey",
                                  "COATI_QUEUE_PATH": str(path.parent)})
    return path


def _environment(extra: dict[str, str]) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items()
           if not key.startswith("COATI_") and key not in ("DATABASE_URL", "REDIS_URL")}
    env.update({"DJANGO_SETTINGS_MODULE": "tests.settings_naive_time", "PYTHONUNBUFFERED": "1",
                "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT),
                                                            os.environ.get("PYTHONPATH")]))})
    env.update(extra)
    return env


def _run(args: list[str], env: dict[str, str]) -> str:
    completed = subprocess.run([sys.executable, "-m", "django", *args], cwd=REPO_ROOT,
                               env=_environment(env), capture_output=True, text=True,
                               timeout=120)
    assert completed.returncode == 0, f"{args[:2]} exited {completed.returncode}:\n" \
                                      f"{completed.stdout}\n{completed.stderr}"
    assert "Traceback" not in completed.stderr, completed.stderr
    return completed.stdout


def _last_json(output: str) -> dict:
    return json.loads(output.strip().splitlines()[-1])


def _naive(text: str | None) -> datetime.datetime:
    value = datetime.datetime.fromisoformat(text or "")
    assert value.tzinfo is None, f"{text} is not naive"
    return value


@pytest.fixture(params=["huey", "dramatiq"])
def project(request, migrated, tmp_path):
    """The environment of this test's subprocesses: its own database and broker."""
    database = tmp_path / "naive.sqlite3"
    shutil.copyfile(migrated, database)
    env = {"COATI_TEST_DB": str(database), "COATI_QUEUE_BACKEND": request.param}
    if request.param == "huey":
        queue = tmp_path / "huey"
        queue.mkdir(mode=0o700)
        env["COATI_QUEUE_PATH"] = str(queue)
    else:
        env["REDIS_URL"] = request.getfixturevalue("redis_url")
    return request.param, env


def test_naive_local_time_end_to_end(project):
    backend, env = project
    ids = _last_json(_run(["shell", "-c", SEND], env))
    _run(["runworkers", "--burst", "--backend", backend, "--processes", "1", "--threads", "4",
          "--poll-ms", "20"], env)
    seen = _last_json(_run(["shell", "-c", READ_BACK], {**env, "NAIVE_TEST_IDS": json.dumps(ids)}))

    sent_at, now = _naive(ids["sent_at"]), _naive(seen["now"])
    # Local time, not UTC: the subprocess's clock and this one agree on the instant.
    utc_now = datetime.datetime.now(datetime.timezone.utc).replace(tzinfo=None)
    assert abs(now - (utc_now + UTC_OFFSET)) < datetime.timedelta(minutes=5), (now, utc_now)

    assert set(seen["pages"].values()) == {200}, seen["pages"]
    assert "Traceback" not in seen["queuestats"]
    assert {record["status"] for record in seen["records"].values()} == {"completed"}, seen
    for task_id, record in seen["records"].items():
        enqueued, started = _naive(record["enqueued_at"]), _naive(record["started_at"])
        finished, expires = _naive(record["finished_at"]), _naive(record["expires_at"])
        assert sent_at - datetime.timedelta(seconds=1) <= enqueued <= started <= finished <= now
        assert expires > now + datetime.timedelta(days=6), (task_id, record)  # RESULT_TTL 7 d
    delayed = seen["records"][ids["delayed"]]
    eta = _naive(delayed["eta"])
    assert abs((eta - _naive(delayed["enqueued_at"])).total_seconds() - DELAY) < 0.01, delayed
    assert _naive(delayed["started_at"]) >= eta - datetime.timedelta(milliseconds=50), delayed

    for key in ("plain", "delayed"):  # the public result dict: naive ISO times, in order
        result = seen["results"][key]
        assert result["status"] == "completed", result
        assert (sent_at - datetime.timedelta(seconds=1) <= _naive(result["enqueued_at"])
                <= _naive(result["started_at"]) <= _naive(result["finished_at"]) <= now)
    batch = seen["batch"]
    assert batch["status"] == "completed", batch
    assert (sent_at - datetime.timedelta(seconds=1) <= _naive(batch["created_at"])
            <= _naive(batch["started_at"]) <= _naive(batch["finished_at"]) <= now), batch
    assert seen["beats"] and all(sent_at <= _naive(beat["last_seen"]) <= now
                                 and _naive(beat["stopped_at"]) for beat in seen["beats"])
