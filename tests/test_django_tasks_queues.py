"""A coati Django tasks backend's own QUEUES, and what its system checks report (Django 6+).

Queues listed in ``TASKS[alias]["QUEUES"]`` pass Django's validation, so they are
real coati queues that ``runworkers`` consumes by default (tested with real
workers given the same ``TASKS``). ``backend.check()`` reports what Django's
checks cannot see.
"""

from __future__ import annotations

import io
import json

import pytest

pytest.importorskip("django.tasks", reason="django.tasks exists from Django 6.0")

from django.core.management import call_command  # noqa: E402
from django.tasks import TaskResultStatus, task_backends  # noqa: E402
from django.tasks.exceptions import InvalidTask  # noqa: E402
from django.test import override_settings  # noqa: E402

from coati_queue.conf import get_settings  # noqa: E402
from coati_queue.models import TaskResult as TaskRecord  # noqa: E402
from tests.conftest import describe_failure  # noqa: E402
from tests.testapp import django_task_defs as defs  # noqa: E402

pytestmark = pytest.mark.django_db(transaction=True)

COATI = "coati_queue.django_tasks.CoatiTaskBackend"
WITH_REPORTS = {"default": {"BACKEND": COATI},
                "reports": {"BACKEND": COATI, "QUEUES": ["reports", "default"]}}


def ids(messages):
    return sorted(message.id for message in messages)


def test_a_backend_queue_is_a_coati_queue_that_workers_consume_by_default(backend):
    with override_settings(TASKS=WITH_REPORTS):
        assert get_settings().QUEUES == ["high", "default", "low", "reports"]  # last
        through_reports = defs.add_numbers.using(backend="reports", queue_name="reports")
        first = through_reports.enqueue(2, 2)
        # The default backend (no QUEUES of its own) accepts every coati queue.
        second = defs.add_numbers.using(queue_name="reports").enqueue(3, 3)
        assert set(TaskRecord.objects.values_list("queue", flat=True)) == {"reports"}
        if backend.queues_work:  # no --queues: the workers' default includes "reports"
            completed = backend.runner(backend.name, env={
                "DJANGO_SETTINGS_MODULE": "tests.settings_django_tasks",
                "COATI_TEST_TASKS": json.dumps(WITH_REPORTS)})
            assert completed.returncode == 0, describe_failure(completed)
        first.refresh()
        second.refresh()
        assert (first.status, first.return_value) == (TaskResultStatus.SUCCESSFUL, 4)
        assert second.return_value == 6
        # Read through another alias, the result still names the backend that enqueued it.
        read = task_backends["default"].get_result(first.id)
        assert read.backend == read.task.backend == "reports" and read == first
    assert get_settings().QUEUES == ["high", "default", "low"]  # TASKS restored, reset


def test_backend_checks_report_queues_coati_cannot_consume():
    tasks = {
        "default": {"BACKEND": COATI},
        "empty": {"BACKEND": COATI, "QUEUES": []},
        "long": {"BACKEND": COATI, "QUEUES": ["default", "q" * 65]},
        "options": {"BACKEND": COATI, "OPTIONS": {"retries": 3}},
    }
    with override_settings(TASKS=tasks):
        found = {alias: ids(task_backends[alias].check()) for alias in tasks}
        assert found == {"default": [], "empty": ["coati_queue.E060"],
                         "long": ["coati_queue.E061"], "options": ["coati_queue.W061"]}
        # What the checks warn about is what enqueue does.
        with pytest.raises(InvalidTask, match="not one of coati_queue's queues"):
            defs.add_numbers.using(backend="empty", queue_name="nightly")  # Django: any
        with pytest.raises(InvalidTask, match="not one of coati_queue's queues"):
            defs.add_numbers.using(backend="long", queue_name="q" * 65)
        # ``manage.py check`` runs them (Django's check of task backends): errors stop it.
        from django.core.management.base import SystemCheckError

        with pytest.raises(SystemCheckError, match="coati_queue.E060"):
            call_command("check")


def test_check_says_run_after_is_refused_while_tasks_run_in_the_caller(queue_env, huey_path):
    out, err = io.StringIO(), io.StringIO()
    queue_env(COATI_QUEUE_BACKEND="immediate")
    backend = task_backends["default"]
    assert backend.supports_defer is False
    assert ids(backend.check()) == ["coati_queue.I060"]
    call_command("check", stdout=out, stderr=err)
    assert "coati_queue.I060" in out.getvalue() + err.getvalue()
    queue_env(COATI_QUEUE_BACKEND="huey", COATI_QUEUE_PATH=huey_path)
    assert backend.supports_defer is True and ids(backend.check()) == []


def test_unapplied_migrations_are_reported_when_databases_are_checked(scratch_database):
    """Also before ``migrate``, which checks its database: a warning, never an error
    that would stop the migration that fixes it."""
    from tests.test_checks import manage

    assert ids(task_backends["default"].check(databases=["default"])) == []  # migrated
    fresh = scratch_database  # a new SQLite file, or a new PostgreSQL database
    plain = manage("check", database=fresh)
    assert plain.returncode == 0 and "W062" not in plain.stdout + plain.stderr
    checked = manage("check", "--database", "default", database=fresh)
    assert checked.returncode == 0, checked.stderr
    assert "coati_queue.W062" in checked.stderr and "0007_taskresult_exception_class" in \
        checked.stderr and "migrate coati_queue" in checked.stderr
    migrated = manage("migrate", "-v0", database=fresh)
    assert migrated.returncode == 0, migrated.stderr
    checked = manage("check", "--database", "default", database=fresh)
    assert checked.returncode == 0 and "W062" not in checked.stdout + checked.stderr
