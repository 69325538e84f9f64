"""Delivery guarantees, piece by piece: envelope validation, send limits, record claims,
the outbox and the reconciler, against a real redis-server, real files and real workers.

The end-to-end fault battery (SIGKILLs, Redis restarts, planted messages during a
payroll batch) is tests/test_faults.py; these tests pin each rule it relies on.
"""

from __future__ import annotations

import datetime
import json
import uuid

import pytest
import redis
from django.db import transaction
from django.utils import timezone

from coati_queue.claims import ClaimRefused, ClaimRequest, write_claim_group
from coati_queue.core.exceptions import BackendUnavailable, InvalidJob
from coati_queue.core.jobs import MAX_JSON_DEPTH, Job
from coati_queue.models import TaskResult, TaskStatus, WorkerHeartbeat
from coati_queue.reconcile import reconcile
from coati_queue.selection import get_queue_driver
from coati_queue.tracking import StateBuffer, record_from_job
from tests.conftest import free_port, redis_password, sigkill_runworkers
from tests.test_workers import worker_backend  # noqa: F401 - a fixture
from tests.testapp.models import Mark

def envelope(**fields) -> str:
    data = Job(task="tests.add", args=[1, 2]).to_dict()
    data.update(fields)
    return json.dumps(data)


# -- the envelope ----------------------------------------------------------------------------
@pytest.mark.parametrize("fields, named", [
    ({"max_retries": -1}, "max_retries"),
    ({"attempt": 0}, "attempt"),
    ({"attempt": "1"}, "attempt"),
    ({"min_backoff": 10 ** 12}, "min_backoff"),
    ({"batch_id": -5}, "batch_id"),
    ({"id": "../../etc/passwd"}, "id"),
    ({"task": ["os.system"]}, "task"),
    ({"kwargs": []}, "kwargs"),
    ({"v": 2}, "v"),
])
def test_an_envelope_with_a_bad_field_is_refused_naming_the_field(fields, named):
    with pytest.raises(InvalidJob, match=named):
        Job.decode(envelope(**fields))


def test_unknown_fields_and_deep_json_are_refused():
    with pytest.raises(InvalidJob, match="unknown field.*on_complete"):
        Job.decode(envelope(on_complete="builtins.print"))
    deep = "[" * 10_000 + "]" * 10_000
    with pytest.raises(InvalidJob, match="nested too deeply"):
        Job.decode('{"task": "tests.add", "id": "%s", "args": %s}' % (uuid.uuid4(), deep))
    nested: list = []
    for _ in range(MAX_JSON_DEPTH + 5):
        nested = [nested]
    with pytest.raises(InvalidJob, match="nest deeper"):
        Job.decode(envelope(args=[nested]))


@pytest.mark.django_db
def test_send_refuses_oversized_and_over_deep_arguments_naming_task_size_and_limit(queue_env):
    import tests.testapp.tasks as tasks

    queue_env(COATI_QUEUE_BACKEND="immediate")
    with pytest.raises(ValueError, match=r"'tests.add'.*bytes, over the 524,288-byte limit"):
        tasks.add.send("x" * 600_000, "y")
    nested: list = []
    for _ in range(MAX_JSON_DEPTH + 5):
        nested = [nested]
    with pytest.raises(ValueError, match="nest deeper"):
        tasks.add.send(nested, 1)
    assert not TaskResult.objects.exists()


# -- claims ----------------------------------------------------------------------------------
def claim_row(job: Job, worker: str = "w1") -> dict:
    return record_from_job(job, "huey", status=TaskStatus.PROCESSING, attempts=job.attempt,
                           started_at=timezone.now(), worker_id=worker)


@pytest.mark.django_db(transaction=True)  # the writer thread has a connection of its own
def test_a_record_is_claimed_once_and_a_lost_run_of_the_same_attempt_counts_as_lost():
    claimer = StateBuffer(interval=0.05)  # claims go through the process's tracking writer
    job = Job(task="tests.add", args=[1, 2])
    TaskResult.objects.create(id=job.id, task_name=job.task, backend="huey")
    assert claimer.claim(claim_row(job)) == 0  # pending -> processing
    # The same attempt delivered again: its first run was lost with its worker.
    assert claimer.claim(claim_row(job, "w2")) == 1
    record = TaskResult.objects.get(pk=job.id)
    assert (record.status, record.worker_id, record.lost_count) == ("processing", "w2", 1)
    # Finished: a late duplicate delivery does not run.
    TaskResult.objects.filter(pk=job.id).update(status=TaskStatus.COMPLETED)
    assert claimer.claim(claim_row(job, "w3")) is None
    # An older attempt never overtakes a newer one.
    retry = Job(task="tests.add", args=[1, 2], attempt=3)
    TaskResult.objects.create(id=retry.id, task_name=retry.task, backend="huey", attempts=2)
    assert claimer.claim(claim_row(Job(**{**retry.to_dict(), "attempt": 1}))) is None
    assert claimer.claim(claim_row(retry)) == 0


@pytest.mark.django_db(transaction=True)
def test_a_claim_of_a_missing_record_creates_it_and_a_poisoned_row_spares_the_others():
    job = Job(task="tests.add", args=[1, 2])
    assert StateBuffer(interval=0.05).claim(claim_row(job)) == 0
    assert TaskResult.objects.get(pk=job.id).status == TaskStatus.PROCESSING

    # Two claims written as one group; one names a batch that does not exist.
    good, bad = Job(task="tests.add"), Job(task="tests.add", batch_id=987654)
    group = [ClaimRequest(claim_row(good)), ClaimRequest(claim_row(bad))]
    write_claim_group(group)
    assert group[0].outcome() == 0
    assert isinstance(group[1].error, ClaimRefused)
    assert TaskResult.objects.filter(pk=good.id, status="processing").exists()
    assert not TaskResult.objects.filter(pk=bad.id).exists()


@pytest.mark.django_db(transaction=True)
def test_two_deliveries_of_one_task_in_one_claim_group_run_it_once():
    """Two worker threads claiming the same task at once (a redelivery racing the relay's
    re-send): one runs it, the other drops its copy, and nothing counts as lost. (On
    PostgreSQL one upsert may not touch a row twice: the group must still go through.)"""
    job, other = Job(task="tests.add", args=[1, 2]), Job(task="tests.add")
    TaskResult.objects.create(id=job.id, task_name=job.task, backend="huey")
    group = [ClaimRequest(claim_row(job)), ClaimRequest(claim_row(other)),
             ClaimRequest(claim_row(job, "w2"))]
    write_claim_group(group)
    assert [request.outcome() for request in group] == [0, 0, None]
    record = TaskResult.objects.get(pk=job.id)
    assert (record.status, record.worker_id, record.lost_count) == ("processing", "w1", 0)
    assert TaskResult.objects.filter(pk=other.id, status="processing").exists()


# -- the outbox ------------------------------------------------------------------------------
def dead_redis_url(live_url: str) -> str:
    """A URL with the session server's password and a port where nothing listens."""
    return f"redis://:{redis_password(live_url)}@127.0.0.1:{free_port()}/0"


@pytest.mark.django_db(transaction=True)
def test_redis_down_at_commit_keeps_the_commit_and_the_task_waits_in_the_outbox(
        queue_env, redis_url, run_workers):
    import tests.testapp.tasks as tasks

    queue_env(COATI_QUEUE_BACKEND="dramatiq", REDIS_URL=dead_redis_url(redis_url))
    with transaction.atomic():
        Mark.objects.create(label="committed", queue="outbox", started=0)
        task_id = tasks.sees_row.send("committed")  # no exception reaches the caller
    assert Mark.objects.filter(label="committed").exists()
    record = TaskResult.objects.get(pk=task_id)
    assert (record.status, record.unsent) == ("pending", True)

    # Redis answers again: a worker's relay sends it, and it runs once.
    queue_env(COATI_QUEUE_BACKEND="dramatiq", REDIS_URL=redis_url)
    report = reconcile(get_queue_driver("dramatiq"))
    assert report.relayed == 1
    completed = run_workers("dramatiq")
    assert completed.returncode == 0, completed.stderr
    record.refresh_from_db()
    assert (record.status, record.result, record.unsent, record.resends) == (
        "completed", True, False, 1)


@pytest.mark.django_db(transaction=True)
def test_outside_a_transaction_redis_down_raises_with_the_password_masked(queue_env, redis_url):
    import tests.testapp.tasks as tasks

    url = dead_redis_url(redis_url)
    queue_env(COATI_QUEUE_BACKEND="dramatiq", REDIS_URL=url)
    with pytest.raises(BackendUnavailable) as caught:
        tasks.add.send(1, 2)
    assert redis_password(url) not in str(caught.value)
    assert "***" in str(caught.value)
    assert not TaskResult.objects.exists()  # nothing stuck in "pending"


# -- the reconciler (on both worker backends: tests/test_workers.py's fixture) ----------------


def backdate(task_id: str, seconds: float) -> None:
    TaskResult.objects.filter(pk=task_id).update(
        enqueued_at=timezone.now() - datetime.timedelta(seconds=seconds))


def drop_every_message(driver) -> None:
    """What a Redis restart without persistence (or a wiped directory) does."""
    if driver.name == "dramatiq":
        redis.Redis.from_url(driver.redis_url).flushall()
    else:
        driver.purge()


@pytest.mark.django_db(transaction=True)
def test_a_pending_task_whose_message_vanished_is_sent_again_once(worker_backend, run_workers):
    import tests.testapp.tasks as tasks

    _, driver = worker_backend
    kept = tasks.add.send(1, 1)
    lost = tasks.add.send(2, 2)
    drop_every_message(driver)
    tasks_sent_again = tasks.add.send(3, 3)  # recent and still queued: left alone
    backdate(kept, 3600)
    backdate(lost, 3600)
    assert driver.missing_jobs([(kept, 0, "default"), (tasks_sent_again, 0, "default")]) == {kept}

    first, second = reconcile(driver), reconcile(driver)
    assert (first.resent, second.resent) == (2, 0)  # never twice: the broker has it now
    completed = run_workers(driver.name)
    assert completed.returncode == 0, completed.stderr
    results = {pk: (status, result) for pk, status, result in
               TaskResult.objects.values_list("pk", "status", "result")}
    assert {results[uuid.UUID(t)] for t in (kept, lost, tasks_sent_again)} == {
        ("completed", 2), ("completed", 4), ("completed", 6)}


@pytest.mark.django_db(transaction=True)
def test_a_task_of_a_lost_worker_is_sent_again_then_failed_at_the_limit(worker_backend,
                                                                         run_workers):
    import tests.testapp.tasks as tasks

    _, driver = worker_backend
    task_id = tasks.add.send(5, 5)
    drop_every_message(driver)  # its worker died with the message (no broker copy)
    long_ago = timezone.now() - datetime.timedelta(hours=1)
    WorkerHeartbeat.objects.create(worker_id="gone:1", hostname="gone", pid=1,
                                   backend=driver.name, last_seen=long_ago)
    TaskResult.objects.filter(pk=task_id).update(status=TaskStatus.PROCESSING, attempts=1,
                                                 worker_id="gone:1", started_at=long_ago)
    assert reconcile(driver).lost_reset == 1
    record = TaskResult.objects.get(pk=task_id)
    assert (record.status, record.lost_count, record.attempts) == ("pending", 1, 0)
    completed = run_workers(driver.name)
    assert completed.returncode == 0, completed.stderr
    record.refresh_from_db()
    assert (record.status, record.result, record.attempts) == ("completed", 10, 1)

    # At WORKER_LOST_LIMIT losses it is failed instead of run again.
    doomed = tasks.add.send(6, 6)
    drop_every_message(driver)
    TaskResult.objects.filter(pk=doomed).update(status=TaskStatus.PROCESSING, attempts=1,
                                                worker_id="gone:1", started_at=long_ago,
                                                lost_count=2)
    assert reconcile(driver).lost_failed == 1
    record = TaskResult.objects.get(pk=doomed)
    assert record.status == "failed" and "Worker lost 3 times" in record.error


@pytest.mark.django_db(transaction=True)
@pytest.mark.redis
def test_a_killed_dramatiq_workers_message_comes_back_marked_and_counts_the_loss(
        queue_env, redis_url, start_worker, run_workers):
    import time as clock

    from django.test import override_settings

    from tests.test_workers import wait_for

    # Redis considers a silent worker dead after 1 s (the default is 60 s).
    short = json.dumps({"REDIS_HEARTBEAT_TIMEOUT": 1.0, "HEARTBEAT_INTERVAL": 0.2})
    queue_env(COATI_QUEUE_BACKEND="dramatiq", REDIS_URL=redis_url)
    with override_settings(COATI_QUEUE={**_test_settings(), "REDIS_HEARTBEAT_TIMEOUT": 1.0}):
        driver = get_queue_driver("dramatiq")
        process = start_worker("dramatiq", env={"COATI_TEST_QUEUE_OVERRIDES": short})
        job_id = driver.enqueue("tests.lease_slow", "redis-lease", 120)
        # Its first run has begun (the Mark: "processing" is written on its own, and
        # may be visible before the task's first line ran).
        wait_for(lambda: Mark.objects.filter(label="redis-lease").exists(),
                 what="the task to start", process=process)
        wait_for(lambda: TaskResult.objects.filter(pk=job_id, status="processing").exists(),
                 what="its record to say processing", process=process)
        sigkill_runworkers(process)
        assert driver.missing_jobs([(job_id, 1, "default")]) == set()  # unacked, still there

        deadline = clock.monotonic() + 30
        while driver.maintain() == 0:  # given back once its heartbeat is 1 s old
            assert clock.monotonic() < deadline, "the dead worker's message never came back"
            clock.sleep(0.2)
        assert driver.maintain() == 0  # exactly once
        completed = run_workers("dramatiq", env={"COATI_TEST_QUEUE_OVERRIDES": short})
        assert completed.returncode == 0, completed.stderr
    record = TaskResult.objects.get(pk=job_id)
    assert (record.status, record.result, record.lost_count) == ("completed", 2, 1)
    assert Mark.objects.filter(label="redis-lease").count() == 2


def _test_settings() -> dict:
    from django.conf import settings

    return dict(settings.COATI_QUEUE)
