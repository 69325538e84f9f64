"""Django's own tasks framework (``django.tasks``, Django 6+) on coati_queue's backend.

Runs under ``make test-next`` (Python 3.12, Django 6.x); on Django 5.2 the
framework does not exist and the module is skipped. Every backend of the
contract suite: the Django task runs on real workers and its result is read
back from the task record, as another process would.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import sys
import uuid

import pytest

pytest.importorskip("django.tasks", reason="django.tasks exists from Django 6.0")

from asgiref.sync import async_to_sync  # noqa: E402
from django.core.exceptions import SuspiciousOperation  # noqa: E402
from django.db import transaction  # noqa: E402
from django.tasks import TaskResultStatus, task_backends  # noqa: E402
from django.tasks import task as django_task  # noqa: E402
from django.tasks.base import TASK_REFRESH_ATTRS  # noqa: E402
from django.tasks.exceptions import InvalidTask, TaskResultDoesNotExist  # noqa: E402
from django.tasks.signals import task_enqueued  # noqa: E402
from django.test import override_settings  # noqa: E402
from django.utils import timezone  # noqa: E402
from django.utils.module_loading import import_string  # noqa: E402

from coati_queue.models import TaskResult as TaskRecord  # noqa: E402
from tests.testapp import django_task_defs as defs  # noqa: E402

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def signal_log(tmp_path, monkeypatch):
    """Django's task signals as sent, in this process and in the workers (which inherit
    the environment): ``signal_log(result_id)`` -> ``[(signal, status), ...]``."""
    path = tmp_path / "signals.jsonl"
    monkeypatch.setenv(defs.SIGNAL_LOG, str(path))

    def read(result_id=None):
        lines = [json.loads(line) for line in path.read_text().splitlines()] \
            if path.exists() else []
        return [line for line in lines if result_id is None or line["id"] == result_id]

    return read


def test_a_django_task_runs_on_the_workers_and_its_result_reads_back(backend):
    enqueued = []
    task_enqueued.connect(lambda sender, task_result, **_: enqueued.append(task_result.id),
                          weak=False, dispatch_uid="test-enqueued")
    try:
        result = defs.add_numbers.enqueue(2, 3)
    finally:
        task_enqueued.disconnect(dispatch_uid="test-enqueued")
    assert enqueued == [result.id]
    record = TaskRecord.objects.get(pk=result.id)  # tracked like every coati task
    assert (record.task_name, record.queue) == ("coati.django_task", "default")
    # As Django's ImmediateBackend, a task run in the caller is finished when enqueue returns.
    assert result.status == (TaskResultStatus.READY if backend.queues_work
                             else TaskResultStatus.SUCCESSFUL)
    backend.drain()
    result.refresh()
    assert result.status == TaskResultStatus.SUCCESSFUL
    assert result.return_value == 5
    assert result.attempts == 1 and result.errors == []
    assert result.started_at <= result.finished_at
    again = defs.add_numbers.get_result(result.id)
    assert (again.args, again.kwargs, again.return_value) == ([2, 3], {}, 5)


def test_enqueue_returns_what_get_result_and_refresh_return(backend):
    """One result, whichever way it is read: enqueue's own, get_result's, after refresh."""
    task = defs.add_numbers.using(queue_name="high")
    if backend.queues_work:  # the immediate backend cannot defer (see test_run_after...)
        # Microseconds and another time zone than the database's UTC.
        task = task.using(run_after=timezone.localtime() + datetime.timedelta(hours=1))
    result = task.enqueue(1, 2)
    read = task_backends["default"].get_result(result.id)
    assert read == result
    assert read.task == task  # queue_name, run_after, priority, backend kept
    assert read.enqueued_at == result.enqueued_at
    before = {name: getattr(result, name) for name in TASK_REFRESH_ATTRS}
    result.refresh()
    assert {name: getattr(result, name) for name in TASK_REFRESH_ATTRS} == before


@override_settings(USE_TZ=False)
def test_enqueue_and_get_result_agree_without_time_zones(backend):
    task = defs.add_numbers
    if backend.queues_work:
        task = task.using(run_after=timezone.now() + datetime.timedelta(hours=1))
        assert timezone.is_naive(task.run_after)
    result = task.enqueue(1, 2)
    read = defs.add_numbers.get_result(result.id)
    assert read == result and timezone.is_naive(read.enqueued_at)
    assert read.task.run_after == task.run_after


def test_inside_a_transaction_the_task_is_enqueued_at_commit(backend, signal_log):
    """A rollback enqueues nothing: no record, no message, no task_enqueued (as django-tasks'
    DatabaseBackend); a commit sends it, then the task runs as usual."""
    with pytest.raises(RuntimeError), transaction.atomic():
        dropped = defs.add_numbers.enqueue(1, 1)
        raise RuntimeError("roll back")
    with transaction.atomic():
        kept = defs.add_numbers.enqueue(2, 2)
        assert signal_log() == [] and kept.status == TaskResultStatus.READY
    backend.drain()
    assert not TaskRecord.objects.filter(pk=dropped.id).exists()
    kept.refresh()
    assert kept.return_value == 4
    assert [entry["signal"] for entry in signal_log()] == ["enqueued", "started", "finished"]
    assert {entry["id"] for entry in signal_log()} == {kept.id}


def test_a_failing_django_task_fails_once_with_its_exception_class(backend):
    result = defs.break_rule.enqueue("emp_7")
    at_length = defs.break_rule_at_length.enqueue("emp_8")
    backend.drain()
    result.refresh()
    at_length.refresh()
    assert result.status == at_length.status == TaskResultStatus.FAILED
    assert result.attempts == 1  # Django's semantics: no automatic retries
    (error,) = result.errors
    assert error.exception_class is defs.RuleBroken
    assert "rule broke for emp_7" in error.traceback
    with pytest.raises(ValueError, match="Task failed"):
        result.return_value
    # A message over several lines and a note: the class is stored, not parsed.
    (error,) = at_length.errors
    assert error.exception_class is defs.RuleBroken
    assert error.traceback.rstrip().endswith(
        "RuleBroken: rule broke for emp_8\nSecond line: contract: 7\nNote: the contract ended")
    assert TaskRecord.objects.get(pk=at_length.id).exception_class == \
        "tests.testapp.django_task_defs.RuleBroken"


def test_system_exit_and_keyboard_interrupt_fail_the_task(backend, signal_log):
    exited, interrupted = defs.exit_process.enqueue(3), defs.interrupt.enqueue()
    backend.drain()
    for result, kind, line in ((exited, SystemExit, "SystemExit: 3"),
                               (interrupted, KeyboardInterrupt,
                                "KeyboardInterrupt: pressed ctrl-c inside a task")):
        result.refresh()
        assert result.status == TaskResultStatus.FAILED
        (error,) = result.errors
        assert error.exception_class is kind
        assert error.traceback.rstrip().endswith(line)
        finished = [entry for entry in signal_log(result.id) if entry["signal"] == "finished"]
        assert [(f["status"], f["errors"]) for f in finished] == [
            ("FAILED", [f"builtins.{kind.__name__}"])]


def test_old_records_without_a_stored_class_parse_it_from_the_traceback(backend):
    """Records written before the class was stored: the exception line is the first after
    the last frame, whatever follows it (message lines, notes)."""
    result = defs.break_rule_at_length.enqueue("emp_9")
    backend.drain()
    TaskRecord.objects.filter(pk=result.id).update(exception_class="")
    (error,) = defs.break_rule_at_length.get_result(result.id).errors
    assert error.exception_class is defs.RuleBroken


@pytest.mark.parametrize("traceback, expected", [
    ('Traceback (most recent call last):\n  File "x.py", line 1, in f\n    raise E\n'
     '    ^^^^^^^\nmod.sub.Broken: first\nsecond: line\nA note\n', "mod.sub.Broken"),
    ('Traceback (most recent call last):\n  File "x.py", line 1, in f\nValueError: a\n\n'
     'During handling of the above exception, another exception occurred:\n\n'
     'Traceback (most recent call last):\n  File "x.py", line 2, in g\n'
     'KeyError: \'b\'\n', "builtins.KeyError"),
    ("SystemExit: 3\n", "builtins.SystemExit"),
    ("KeyboardInterrupt\n", "builtins.KeyboardInterrupt"),
    ("", "builtins.Exception"),
])
def test_exception_class_fallback_parser(traceback, expected):
    from coati_queue.django_tasks import exception_class_path

    assert exception_class_path(traceback) == expected


def test_context_queue_and_json_normalised_results(backend):
    with_context = defs.report_attempt.enqueue(label="x")
    high = defs.on_high_queue.enqueue()
    assert TaskRecord.objects.get(pk=high.id).queue == "high"
    backend.drain()
    with_context.refresh()
    high.refresh()
    assert with_context.return_value == {"label": "x", "attempt": 1, "id": with_context.id}
    assert high.return_value == ["tuples", "become", "lists"]


def test_run_after_defers_the_task(backend):
    run_after = timezone.now() + datetime.timedelta(seconds=1.5)
    if not backend.queues_work:
        # Django's ImmediateBackend refuses run_after; so does coati's immediate backend
        # (supports_defer is False) rather than run a deferred task at once.
        assert task_backends["default"].supports_defer is False
        with pytest.raises(InvalidTask, match="does not support run_after"):
            defs.describe_own_task.using(run_after=run_after)
        return
    assert task_backends["default"].supports_defer is True
    task = defs.describe_own_task.using(run_after=run_after, queue_name="low")
    result = task.enqueue()
    backend.drain()  # a burst worker waits for delayed jobs
    result.refresh()
    assert result.status == TaskResultStatus.SUCCESSFUL
    assert result.started_at >= run_after
    # The worker ran the task as enqueued: its context shows the queue and run_after.
    assert result.return_value == {"queue": "low", "backend": "default",
                                   "run_after": run_after.astimezone(datetime.UTC).isoformat()}


def test_async_variants_behave_like_the_sync_ones(backend):
    async def enqueue_and_read():
        result = await defs.add_later.aenqueue(4, 5)
        return result, await defs.add_later.aget_result(result.id)

    result, read = async_to_sync(enqueue_and_read)()
    assert read == result
    backend.drain()
    async_to_sync(result.arefresh)()
    assert result.status == TaskResultStatus.SUCCESSFUL and result.return_value == 9
    assert result == defs.add_later.get_result(result.id)
    with pytest.raises(TaskResultDoesNotExist):
        async_to_sync(task_backends["default"].aget_result)(str(uuid.uuid4()))


def test_what_the_backend_refuses(backend):
    with pytest.raises(InvalidTask, match="Queue 'nightly' is not valid"):
        defs.add_numbers.using(queue_name="nightly").enqueue(1, 2)
    with pytest.raises(InvalidTask, match="priority"):
        defs.add_numbers.using(priority=10).enqueue(1, 2)
    assert task_backends["default"].supports_priority is False
    with pytest.raises(TypeError):
        defs.add_numbers.enqueue(datetime.date(2024, 1, 1), 2)  # JSON only
    with pytest.raises(TaskResultDoesNotExist):
        task_backends["default"].get_result("not-a-task-id")
    assert not TaskRecord.objects.exists()


# -- the path in the message is untrusted -------------------------------------------------
def _planted(module_path, args=(), kwargs=None):
    """A runner message written straight to the broker (no enqueue, no check at send)."""
    from coati_queue.core.jobs import Job
    from coati_queue.django_tasks import RUNNER_NAME

    return Job(task=RUNNER_NAME, args=[module_path, list(args), dict(kwargs or {})],
               queue="default", max_retries=0)


def test_planted_messages_naming_other_paths_are_refused_before_any_import(
        backend, tmp_path, monkeypatch):
    """A module outside the installed apps is never imported (its import would leave a
    file); inside an app, only a Django task of this backend runs."""
    imported, called = tmp_path / "imported", tmp_path / "called"
    (tmp_path / "coati_planted_mod.py").write_text(
        f"open({str(imported)!r}, 'w').close()\n"
        f"def run(*args, **kwargs):\n    open({str(called)!r}, 'w').close()\n")
    monkeypatch.syspath_prepend(str(tmp_path))  # importable here and in the workers
    from coati_queue.django_tasks import RefusedTaskPath

    touched = tmp_path / "touched"
    planted = {
        "coati_planted_mod.run": "not inside an installed app",
        "os.system": "not inside an installed app",
        "builtins.print": "not inside an installed app",
        "tests.testapp.tasks.add": "not a Django task",     # a coati task, not django.tasks
        "tests.testapp.django_task_defs.nothing_here": "cannot be imported",
        "tests.testapp.__init__.x": "not the dotted path",
        "": "not the dotted path",
    }
    jobs = [_planted(path, [f"touch {touched}"]) for path in planted]
    jobs.append(_planted(42))
    backend.driver.send(jobs)
    if backend.queues_work:
        from tests.conftest import REPO_ROOT, describe_failure

        completed = backend.runner(backend.name, env={
            "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), str(tmp_path)])})
        assert completed.returncode == 0, describe_failure(completed)
    for job, expected in zip(jobs, [*planted.values(), "not the dotted path"]):
        record = TaskRecord.objects.get(pk=job.id)
        assert record.status == "failed", (job.args[0], record.error)
        assert issubclass(import_string(record.exception_class), RefusedTaskPath), record.traceback
        assert expected in record.error, (job.args[0], record.error)
    assert not imported.exists() and not called.exists() and not touched.exists()
    assert "coati_planted_mod" not in sys.modules
    # The refused records cannot be read back as Django results either (no import there).
    with pytest.raises(SuspiciousOperation, match="not inside an installed app"):
        task_backends["default"].get_result(jobs[0].id)
    assert not imported.exists()


@pytest.mark.parametrize("module_path, error", [
    ("tests.testapp.django_task_defs.plain_function", SuspiciousOperation),
    ("tests.testapp.tasks.add", SuspiciousOperation),  # a coati task, not a Django one
    ("tests.testapp.django_task_defs.removed_since", ImportError),  # as django-tasks raises
])
def test_get_result_of_a_record_naming_no_django_task_raises(module_path, error):
    """As django-tasks' DatabaseBackend: a record whose path is not a Task is suspicious."""
    from coati_queue.django_tasks import RUNNER_NAME

    record = TaskRecord.objects.create(task_name=RUNNER_NAME, backend="huey",
                                       args=[module_path, [1], {}])
    with pytest.raises(error):
        task_backends["default"].get_result(str(record.pk))


def test_a_forged_backend_alias_is_refused(backend):
    """The alias travels in the message too: only a coati backend of TASKS runs it."""
    job = _planted("tests.testapp.django_task_defs.add_numbers", [1, 2])
    forged = dataclasses.replace(job, kwargs={"alias": "elsewhere"})
    backend.driver.send([forged])
    backend.drain()
    record = TaskRecord.objects.get(pk=forged.id)
    assert record.status == "failed" and "'elsewhere'" in record.error
    with pytest.raises(SuspiciousOperation, match="'elsewhere'"):
        task_backends["default"].get_result(forged.id)


@django_task
def defined_outside_the_installed_apps():
    return "never"


def test_enqueue_refuses_a_task_the_workers_would_refuse(backend):
    with pytest.raises(InvalidTask, match="not inside an installed app"):
        defined_outside_the_installed_apps.enqueue()
    assert not TaskRecord.objects.exists()


def test_a_task_of_another_backend_is_refused_by_the_runner(settings, monkeypatch):
    from coati_queue.django_tasks import RefusedTaskPath, run_django_task

    settings.TASKS = {**settings.TASKS,
                      "other": {"BACKEND": "django.tasks.backends.dummy.DummyBackend"}}
    elsewhere = defs.add_numbers.using(backend="other")
    monkeypatch.setattr(defs, "add_numbers_elsewhere", elsewhere, raising=False)
    with pytest.raises(RefusedTaskPath, match="'other'"):
        run_django_task("tests.testapp.django_task_defs.add_numbers_elsewhere", [1, 2], {})
    assert run_django_task("tests.testapp.django_task_defs.add_numbers", [1, 2], {}) == 3
