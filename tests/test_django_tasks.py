"""Django's own tasks framework (``django.tasks``, Django 6+) on coati_queue's backend.

Runs under ``make test-next`` (Python 3.12, Django 6.x); on Django 5.2 the
framework does not exist and the module is skipped. Every backend of the
contract suite: the Django task runs on real workers and its result is read
back from the task record, as another process would.
"""

from __future__ import annotations

import datetime
import os
import sys

import pytest

pytest.importorskip("django.tasks", reason="django.tasks exists from Django 6.0")

from django.tasks import TaskResultStatus, task_backends  # noqa: E402
from django.tasks import task as django_task  # noqa: E402
from django.tasks.exceptions import InvalidTask, TaskResultDoesNotExist  # noqa: E402
from django.tasks.signals import task_enqueued  # noqa: E402
from django.utils import timezone  # noqa: E402

from coati_queue.models import TaskResult as TaskRecord  # noqa: E402
from tests.testapp import django_task_defs as defs  # noqa: E402

pytestmark = pytest.mark.django_db(transaction=True)


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
    if backend.queues_work:
        assert result.status == TaskResultStatus.READY
    backend.drain()
    result.refresh()
    assert result.status == TaskResultStatus.SUCCESSFUL
    assert result.return_value == 5
    assert result.attempts == 1 and result.errors == []
    assert result.started_at <= result.finished_at
    again = defs.add_numbers.get_result(result.id)
    assert (again.args, again.kwargs, again.return_value) == ([2, 3], {}, 5)


def test_a_failing_django_task_fails_once_with_its_exception_class(backend):
    result = defs.break_rule.enqueue("emp_7")
    backend.drain()
    result.refresh()
    assert result.status == TaskResultStatus.FAILED
    assert result.attempts == 1  # Django's semantics: no automatic retries
    (error,) = result.errors
    assert error.exception_class is defs.RuleBroken
    assert "rule broke for emp_7" in error.traceback
    with pytest.raises(ValueError, match="Task failed"):
        result.return_value


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
    if not backend.queues_work:
        pytest.skip("the immediate backend runs at once, like Celery's eager mode")
    run_after = timezone.now() + datetime.timedelta(seconds=1.5)
    result = defs.add_numbers.using(run_after=run_after).enqueue(1, 1)
    backend.drain()  # a burst worker waits for delayed jobs
    result.refresh()
    assert result.status == TaskResultStatus.SUCCESSFUL
    assert result.started_at >= run_after


def test_what_the_backend_refuses(backend):
    with pytest.raises(InvalidTask, match="'nightly' is not one of"):
        defs.add_numbers.using(queue_name="nightly").enqueue(1, 2)
    with pytest.raises(InvalidTask, match="priority"):
        defs.add_numbers.using(priority=10).enqueue(1, 2)
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
    touched = tmp_path / "touched"
    planted = {
        "coati_planted_mod.run": "not inside an installed app",
        "os.system": "not inside an installed app",
        "builtins.print": "not inside an installed app",
        "tests.testapp.tasks.add": "not a Django task",     # a coati task, not django.tasks
        "tests.testapp.django_task_defs.os": "cannot be imported",
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
        assert "RefusedTaskPath" in record.traceback, record.traceback
        assert expected in record.error, (job.args[0], record.error)
    assert not imported.exists() and not called.exists() and not touched.exists()
    assert "coati_planted_mod" not in sys.modules
    # The refused records cannot be read back as Django results either (no import there).
    with pytest.raises(InvalidTask, match="not inside an installed app"):
        task_backends["default"].get_result(jobs[0].id)
    assert not imported.exists()


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
    with pytest.raises(RefusedTaskPath, match="'other' backend"):
        run_django_task("tests.testapp.django_task_defs.add_numbers_elsewhere", [1, 2], {})
    assert run_django_task("tests.testapp.django_task_defs.add_numbers", [1, 2], {}) == 3
