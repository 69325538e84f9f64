"""The driver contract, run unchanged against every backend (immediate, Huey, Dramatiq).

Huey and Dramatiq jobs are run by real ``runworkers --burst`` subprocesses
(``backend.drain()``); the immediate backend runs them in the caller.
"""

from __future__ import annotations

import datetime
import uuid

import pytest
from django.db import transaction

from coati_queue import TaskNotRegistered
from coati_queue.models import TaskResult
from tests.testapp.models import Mark
from tests.testapp.tasks import add

pytestmark = pytest.mark.django_db(transaction=True)


def depth(driver, queue: str = "default") -> int:
    counts = driver.queue_depths()[queue]
    return counts["queued"] + counts["delayed"]


def result_of(driver, task_id: str) -> dict:
    result = driver.get_task_result(task_id)
    assert result is not None, f"no record for task {task_id}"
    return result


def test_enqueue_then_drain_completes_with_the_result(backend):
    task_id = backend.driver.enqueue("tests.add", 2, 3)
    assert uuid.UUID(task_id)
    if backend.queues_work:
        assert result_of(backend.driver, task_id)["status"] == "pending"
        assert depth(backend.driver) == 1
    backend.drain()
    result = result_of(backend.driver, task_id)
    assert result["status"] == "completed"
    assert result["result"] == 5
    assert result["attempts"] == 1
    assert result["task_name"] == "tests.add"
    assert result["backend"] == backend.name
    assert result["error"] is None
    assert depth(backend.driver) == 0


def test_get_task_result_of_an_unknown_id_is_none(backend):
    assert backend.driver.get_task_result(str(uuid.uuid4())) is None
    assert backend.driver.get_task_result("not-a-uuid") is None


def test_task_decorator_send_and_send_with_options(backend):
    plain = add.send(20, 22)
    high = add.send_with_options(args=(1,), kwargs={"b": 2}, queue="high")
    if backend.queues_work:
        assert backend.driver.queue_depths()["default"]["queued"] == 1
        assert backend.driver.queue_depths()["high"]["queued"] == 1
    backend.drain()
    plain_result, high_result = result_of(backend.driver, plain), result_of(backend.driver, high)
    assert (plain_result["status"], plain_result["result"], plain_result["queue"]) == (
        "completed", 42, "default")
    assert (high_result["status"], high_result["result"], high_result["queue"]) == (
        "completed", 3, "high")


def test_enqueue_many_and_bulk_results(backend):
    ids = backend.driver.enqueue_many("tests.add", [((i, i), {}) for i in range(6)])
    assert len(ids) == len(set(ids)) == 6
    assert TaskResult.objects.filter(pk__in=ids).count() == 6
    if backend.queues_work:
        before = backend.driver.get_bulk_results(ids)
        assert (before["total"], before["pending"], before["completed"]) == (6, 6, 0)
        assert before["progress_percentage"] == 0.0
        assert depth(backend.driver) == 6
    backend.drain()
    after = backend.driver.get_bulk_results(ids)
    assert (after["total"], after["completed"], after["failed"], after["pending"]) == (6, 6, 0, 0)
    assert after["progress_percentage"] == 100.0
    assert after["tasks"] == {task_id: "completed" for task_id in ids}
    assert [result_of(backend.driver, task_id)["result"] for task_id in ids] == [
        0, 2, 4, 6, 8, 10]


def test_bulk_results_counts_unknown_ids_as_pending(backend):
    known = backend.driver.enqueue("tests.noop")
    backend.drain()
    missing = str(uuid.uuid4())
    summary = backend.driver.get_bulk_results([known, missing])
    assert summary["tasks"] == {known: "completed", missing: "unknown"}
    assert (summary["completed"], summary["pending"], summary["progress_percentage"]) == (
        1, 1, 50.0)


def test_non_json_argument_is_refused_at_enqueue(backend):
    with pytest.raises(TypeError) as excinfo:
        backend.driver.enqueue("tests.add", 1, b=datetime.date(2024, 1, 1))
    assert "'b'" in str(excinfo.value)
    assert "tests.add" in str(excinfo.value)
    with pytest.raises(TypeError, match="Positional argument 0"):
        add.send(object(), 1)
    assert TaskResult.objects.count() == 0
    assert depth(backend.driver) == 0


def test_unknown_task_name_is_refused_with_a_suggestion(backend):
    with pytest.raises(TaskNotRegistered) as excinfo:
        backend.driver.enqueue("tests.ad", 1, 2)
    assert "tests.add" in str(excinfo.value)
    assert "tests.add" in excinfo.value.suggestions
    assert TaskResult.objects.count() == 0
    assert depth(backend.driver) == 0


def test_non_json_result_fails_clearly_without_retrying(backend):
    task_id = backend.driver.enqueue("tests.returns_object")
    backend.drain()
    result = result_of(backend.driver, task_id)
    assert result["status"] == "failed"
    assert "tests.returns_object" in result["error"]
    assert "not JSON-serializable" in result["error"]
    assert result["attempts"] == 1
    assert result["result"] is None


def test_retries_then_fails_with_error_and_traceback(backend):
    task_id = backend.driver.enqueue("tests.always_fails")
    backend.drain()
    result = result_of(backend.driver, task_id)
    assert result["status"] == "failed"
    assert result["attempts"] == 3  # the first attempt + max_retries=2
    assert "boom: always fails" in result["error"]
    assert "RuntimeError" in result["traceback"]
    assert "always_fails" in result["traceback"]
    assert result["finished_at"] is not None
    assert depth(backend.driver) == 0


def test_run_time_is_recorded_for_the_metrics_histogram(backend):
    task_id = backend.driver.enqueue("tests.sleep", 0.2)
    backend.drain()
    record = TaskResult.objects.get(pk=task_id)
    assert record.status == "completed"
    assert record.duration_seconds >= 0.2  # the task slept that long
    assert record.duration_seconds == pytest.approx(
        (record.finished_at - record.started_at).total_seconds(), abs=0.01)


def test_retry_until_success(backend):
    task_id = backend.driver.enqueue("tests.fails_then_succeeds", "flaky")
    backend.drain()
    result = result_of(backend.driver, task_id)
    assert result["status"] == "completed"
    assert result["result"] == 3
    assert result["attempts"] == 3
    assert Mark.objects.filter(label="flaky").count() == 3


def test_delayed_task_waits_then_runs(backend):
    task_id = backend.driver.enqueue("tests.add", 1, 1, delay=2)
    if backend.queues_work:
        assert result_of(backend.driver, task_id)["status"] == "pending"
        counts = backend.driver.queue_depths()["default"]
        assert (counts["queued"], counts["delayed"]) == (0, 1)
    backend.drain()
    result = result_of(backend.driver, task_id)
    assert result["status"] == "completed"
    assert result["result"] == 2
    if backend.queues_work:
        record = TaskResult.objects.get(pk=task_id)
        waited = (record.started_at - record.enqueued_at).total_seconds()
        assert waited >= 1.5, f"a 2 s delay ran after {waited:.2f} s"
        assert record.eta is not None


def test_rolled_back_transaction_sends_nothing(backend):
    class Abort(Exception):
        pass

    with pytest.raises(Abort):
        with transaction.atomic():
            backend.driver.enqueue("tests.mark", "rolled-back")
            add.send(1, 2)
            raise Abort
    assert TaskResult.objects.count() == 0
    assert depth(backend.driver) == 0
    backend.drain()
    assert not Mark.objects.filter(label="rolled-back").exists()


def test_committed_transaction_sends_after_commit(backend):
    with transaction.atomic():
        Mark.objects.create(label="same-transaction", started=0)
        task_id = backend.driver.enqueue("tests.sees_row", "same-transaction")
        # Not handed to the broker (nor run) before the commit.
        assert depth(backend.driver) == 0
        assert not TaskResult.objects.filter(pk=task_id, status="completed").exists()
    backend.drain()
    result = result_of(backend.driver, task_id)
    assert result["status"] == "completed"
    assert result["result"] is True


def test_get_stats_reports_queue_lengths(backend):
    driver = backend.driver
    driver.enqueue("tests.noop")
    driver.enqueue("tests.noop")
    driver.enqueue("tests.noop", queue="high")
    driver.enqueue("tests.noop", queue="low", delay=60)
    stats = driver.get_stats()
    assert {"driver", "backend", "registered_tasks", "queues", "pending_tasks"} <= set(stats)
    assert stats["backend"] == backend.name
    assert stats["driver"] == type(driver).__name__
    assert {"tests.add", "tests.mark", "tests.sleep"} <= set(stats["registered_tasks"])
    if backend.queues_work:
        assert stats["queues"] == {"high": 1, "default": 2, "low": 0}
        assert stats["delayed"]["low"] == 1
        assert stats["pending_tasks"] == 4
        assert stats["tracked"]["pending"] == 4
    else:
        assert stats["queues"] == {"high": 0, "default": 0, "low": 0}
        assert stats["pending_tasks"] == 0
        assert stats["tracked"]["completed"] == 4
    assert driver.purge() == (4 if backend.queues_work else 0)
    assert driver.get_stats()["pending_tasks"] == 0
