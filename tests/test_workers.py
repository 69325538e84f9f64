"""Real ``runworkers`` processes: queue priority, dead letters, graceful SIGTERM, heartbeats."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import dramatiq
import pytest
from django.db import connection

from coati_queue.core.jobs import Job
from coati_queue.models import DeadLetter, TaskResult, WorkerHeartbeat
from coati_queue.selection import get_queue_driver
from tests.conftest import describe_failure, worker_pids
from tests.testapp.models import Mark

pytestmark = pytest.mark.django_db(transaction=True)

WORKER_BACKENDS = ("huey", "dramatiq")


@pytest.fixture(params=WORKER_BACKENDS)
def worker_backend(request, queue_env, huey_path):
    """huey or dramatiq, selected through the environment; returns (name, driver)."""
    if request.param == "huey":
        queue_env(COATI_QUEUE_BACKEND="huey", COATI_QUEUE_PATH=huey_path)
    else:
        queue_env(COATI_QUEUE_BACKEND="dramatiq", REDIS_URL=request.getfixturevalue("redis_url"))
    driver = get_queue_driver(request.param)
    assert driver.name == request.param
    return request.param, driver


def wait_for(condition, timeout: float = 30, what: str = "condition", process=None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        if process is not None and process.poll() is not None:
            output = process.stdout.read() if process.stdout else ""
            pytest.fail(f"worker exited {process.returncode} while waiting for {what}:\n{output}")
        time.sleep(0.05)
    pytest.fail(f"timed out after {timeout} s waiting for {what}")


def test_high_queue_is_consumed_before_default_before_low(worker_backend, run_workers):
    name, driver = worker_backend
    # Dramatiq orders by priority only the messages a worker has prefetched
    # (2 x threads per queue); Huey orders the whole backlog.
    per_queue = 4 if name == "huey" else 2
    # Sent lowest priority first, so FIFO order would be the opposite of priority order.
    for queue in ("low", "default", "high"):
        driver.enqueue_many("tests.mark", [((f"{queue}-{i}", queue), {}) for i in range(per_queue)],
                            queue=queue)
    assert {q: d["queued"] for q, d in driver.queue_depths().items()} == {
        "high": per_queue, "default": per_queue, "low": per_queue}

    completed = run_workers(name, "--threads", "1")
    assert completed.returncode == 0, describe_failure(completed)

    order = list(Mark.objects.order_by("started", "id").values_list("queue", flat=True))
    assert order == ["high"] * per_queue + ["default"] * per_queue + ["low"] * per_queue
    # Within a queue, first in first out.
    assert list(Mark.objects.filter(queue="low").order_by("started", "id")
                .values_list("label", flat=True)) == [f"low-{i}" for i in range(per_queue)]


def test_worker_consumes_only_the_queues_it_is_given(worker_backend, run_workers):
    name, driver = worker_backend
    high = driver.enqueue("tests.add", 1, 1, queue="high")
    low = driver.enqueue("tests.add", 2, 2, queue="low")
    completed = run_workers(name, "--queues", "high")
    assert completed.returncode == 0, describe_failure(completed)
    assert driver.get_task_result(high)["status"] == "completed"
    assert driver.get_task_result(low)["status"] == "pending"
    assert driver.queue_depths()["low"]["queued"] == 1


def write_garbage(name: str, driver) -> None:
    """An undecodable message, written straight into the broker as another client could."""
    if name == "huey":
        storage = driver.huey.storage
        priority = driver.settings.queue_priority("default")
        file_name = "%04x-%012x-%010x-%d" % (storage.MAX_PRIORITY - priority,
                                             int(time.time() * 1000), 0, 424242)
        with open(os.path.join(driver.path, "queue", file_name), "wb") as handle:
            handle.write(b"this is not JSON {")
    else:
        driver.broker.enqueue(dramatiq.Message(
            queue_name="default", actor_name="coati.default",
            args=("this is not a job envelope",), kwargs={}, options={}))


def test_dead_letters_are_recorded_and_the_worker_carries_on(worker_backend, run_workers):
    name, driver = worker_backend
    write_garbage(name, driver)
    # A well-formed envelope naming a task nobody registered (e.g. sent by a newer release).
    unknown = Job(task="tests.no_such_task", args=[1], queue="default", max_retries=3)
    driver.send([unknown])
    time.sleep(0.01)  # Huey orders files by millisecond: the valid task comes last
    valid = driver.enqueue("tests.add", 20, 1)

    completed = run_workers(name)
    assert completed.returncode == 0, describe_failure(completed)

    # A dead letter (tests/test_dead_letters.py), not a failed task record.
    undecodable = DeadLetter.objects.exclude(task_name="tests.no_such_task")
    assert undecodable.count() == 1, list(DeadLetter.objects.values("task_name", "reason"))
    letter = undecodable.get()
    # Huey cannot even parse its own message; Dramatiq's is fine but its argument is no job.
    expected = "undecodable Huey message" if name == "huey" else "message is not valid JSON"
    assert expected in letter.reason
    assert letter.backend == name
    assert "this is not" in letter.payload
    assert not TaskResult.objects.filter(error__startswith="Undecodable").exists()

    # An unknown task is a dead letter too: requeueable once a release registers it.
    missing = DeadLetter.objects.get(task_id=unknown.id)
    assert missing.task_name == "tests.no_such_task"
    assert "is registered" in missing.reason
    assert not TaskResult.objects.filter(pk=unknown.id).exists()  # never run, not retried

    assert driver.get_task_result(valid)["status"] == "completed"
    assert driver.get_task_result(valid)["result"] == 21
    assert driver.get_stats()["pending_tasks"] == 0


def test_sigterm_lets_the_in_flight_task_finish(worker_backend, start_worker):
    name, driver = worker_backend
    process = start_worker(name, threads=2)
    task_id = driver.enqueue("tests.sleep", 2)
    wait_for(lambda: TaskResult.objects.filter(pk=task_id, status="processing").exists(),
             what="the task to be processing", process=process)

    process.send_signal(signal.SIGTERM)
    try:
        output, _ = process.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        pytest.fail("the worker did not exit within 30 s of SIGTERM")
    assert process.returncode == 0, output
    record = TaskResult.objects.get(pk=task_id)
    assert record.status == "completed", output
    assert record.result == 2
    assert record.attempts == 1
    assert driver.get_stats()["pending_tasks"] == 0  # not given back to run twice


def test_running_worker_publishes_a_heartbeat(worker_backend, start_worker):
    name, driver = worker_backend
    process = start_worker(name, "--queues", "high,default", threads=2)
    beat = wait_for(lambda: WorkerHeartbeat.objects.filter(
        pid__in=worker_pids(process.pid)).first(), what="a heartbeat", process=process)
    lost_after = driver.settings.WORKER_LOST_AFTER
    assert beat.is_alive(lost_after)
    assert beat.backend == name
    assert beat.queues == ["high", "default"]
    assert beat.threads == 2

    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=30)
    assert process.returncode == 0, output
    beat.refresh_from_db()
    assert beat.stopped_at is not None
    assert not beat.is_alive(lost_after)


def test_running_worker_deletes_expired_records_and_keeps_their_counts(worker_backend,
                                                                         start_worker):
    import datetime

    from django.utils import timezone

    from coati_queue.tallies import retired_totals

    name, _ = worker_backend
    past = timezone.now() - datetime.timedelta(seconds=1)
    expired = [TaskResult.objects.create(task_name="tests.add", backend=name, status=status,
                                         expires_at=past)
               for status in ("completed", "completed", "failed")]
    running = TaskResult.objects.create(task_name="tests.add", backend=name, status="processing",
                                        expires_at=past)  # never deleted while unfinished
    kept = TaskResult.objects.create(task_name="tests.add", backend=name, status="completed",
                                     expires_at=timezone.now() + datetime.timedelta(days=1))
    process = start_worker(name, threads=1, env={"COATI_QUEUE_CLEANUP_INTERVAL": "0.3"})
    wait_for(lambda: not TaskResult.objects.filter(pk__in=[r.pk for r in expired]).exists(),
             what="the expired records to be deleted", process=process)
    assert set(TaskResult.objects.values_list("pk", flat=True)) == {running.pk, kept.pk}
    retired = retired_totals()["tests.add"]
    assert (retired["enqueued"], retired["succeeded"], retired["failed"]) == (3, 2, 1)
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=30)
    assert process.returncode == 0, output
    assert "Deleted 3 expired task records." in output


def test_huey_messages_on_disk_are_json_envelopes(queue_env, huey_path, run_workers):
    queue_env(COATI_QUEUE_BACKEND="huey", COATI_QUEUE_PATH=huey_path)
    driver = get_queue_driver()
    task_id = driver.enqueue("tests.db_vendor")
    (file_name,) = os.listdir(os.path.join(huey_path, "queue"))
    with open(os.path.join(huey_path, "queue", file_name), "rb") as handle:
        message = json.loads(handle.read())  # JSON, never pickle
    envelope = message["huey"]["args"][0]
    assert (envelope["id"], envelope["task"], envelope["queue"]) == (task_id, "tests.db_vendor",
                                                                     "default")

    completed = run_workers("huey")
    assert completed.returncode == 0, describe_failure(completed)
    # The worker subprocess wrote to the test process's database.
    assert driver.get_task_result(task_id)["result"] == connection.vendor
    assert not os.listdir(os.path.join(huey_path, "queue"))
