"""Payroll under at-least-once delivery: leases on items, reconcile, callbacks by name only.

A chunk task may run twice (redelivered, re-sent from its record) or again after
the worker that claimed its items died; a planted message may carry anything.
Whatever happens, each employee gets one payroll line and is counted once, and
nothing named in a message is imported. Workers are real ``runworkers``
processes on Huey (file storage) where a user would have them; the fan-out is
done in the test process so the chunks wait in Huey for the faults to be set up.
"""

from __future__ import annotations

import datetime
import logging
import threading
import time
import uuid
from typing import Any, Callable

import pytest
from django.db import connections
from django.utils import timezone

from coati_queue import payroll, payroll_recovery
from coati_queue.core.jobs import Job
from coati_queue.core.middleware import current_job
from coati_queue.models import (BatchStatus, ItemStatus, PayrollBatch, PayrollItem, TaskResult,
                                TaskStatus)
from coati_queue.payroll import (PayrollError, calculate_payroll_chunk, claim_items, compute,
                                 create_batch, fire_callbacks, process_payroll_parallel,
                                 process_payroll_parallel_task,
                                 record_item_outcomes, start_payroll_batch)
from coati_queue.payroll_recovery import reconcile_batches
from example_project.payroll import services
from example_project.payroll.models import PayrollLine

from .conftest import REPO_ROOT, describe_failure
from .test_payroll import (END, START, TASK_CALLBACKS, assert_one_line_per_employee, counters,
                           huey, immediate, make_planilla, marks, payroll_rules)

__all__ = ["huey", "immediate", "payroll_rules"]  # fixtures used here, defined there

CHUNK_TASK = "coati.payroll.calculate_chunk"
CALLBACK_TASKS = set(TASK_CALLBACKS.values())

pytestmark = pytest.mark.django_db(transaction=True)


# -- helpers --------------------------------------------------------------------------------
def configure(settings: Any, *, chunk_size: int = 10, ttl: float | None = None,
              **payroll_hooks: Any) -> None:
    """COATI_QUEUE of the test process: smaller chunks, a shorter lease if asked."""
    queue = dict(settings.COATI_QUEUE)
    queue["PAYROLL"] = {**queue["PAYROLL"], "CHUNK_SIZE": chunk_size, **payroll_hooks}
    if ttl is not None:
        queue["BATCH_CLAIM_TTL"] = ttl
    settings.COATI_QUEUE = queue


def fanned_out(code: str, employees: int, **callbacks: str) -> PayrollBatch:
    """A running batch whose chunk messages wait in Huey (no worker has run yet)."""
    make_planilla(code, employees)
    batch = start_payroll_batch(code, START, END, **callbacks)
    process_payroll_parallel_task(planilla_id=code, periodo_inicio=START, periodo_fin=END,
                                  batch_id=batch.pk)
    batch.refresh_from_db()
    assert batch.status == BatchStatus.RUNNING and batch.total == employees
    return batch


def item_ids(batch: PayrollBatch, **filters: Any) -> list[int]:
    return list(batch.items.filter(**filters).order_by("pk").values_list("pk", flat=True))


def chunk_records(batch: PayrollBatch, **filters: Any):
    return TaskResult.objects.filter(batch=batch, task_name=CHUNK_TASK, **filters)


def job_of(record: TaskResult) -> Job:
    """The job a chunk record describes: what a redelivery of it would carry."""
    return Job(task=record.task_name, args=record.args, kwargs=record.kwargs, id=str(record.id),
               queue=record.queue, batch_id=record.batch_id, max_retries=record.max_retries)


def callback_records(batch: PayrollBatch) -> dict[str, int]:
    return {name: TaskResult.objects.filter(task_name=name, kwargs={"batch_id": batch.pk})
            .count() for name in sorted(CALLBACK_TASKS)}


def assert_complete(batch: PayrollBatch, employees: int) -> None:
    status, total, succeeded, failed, _ = counters(batch)
    assert (status, total, succeeded, failed) == (BatchStatus.COMPLETED, employees, employees, 0)
    codes = list(batch.items.values_list("employee_id", flat=True))
    assert_one_line_per_employee(batch, codes)
    assert not batch.items.exclude(status=ItemStatus.SUCCEEDED).exists()


def run_in_threads(*calls: Callable[[], Any]) -> list[Any]:
    """Run the calls at the same moment, one thread (and DB connection) each."""
    barrier = threading.Barrier(len(calls))
    results: list[Any] = [None] * len(calls)
    errors: list[BaseException] = []

    def run(index: int, call: Callable[[], Any]) -> None:
        try:
            barrier.wait(timeout=30)
            results[index] = call()
        except BaseException as exc:  # re-raised in the test's thread below
            errors.append(exc)
        finally:
            connections.close_all()

    threads = [threading.Thread(target=run, args=(i, c)) for i, c in enumerate(calls)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    if errors:
        raise errors[0]
    return results


# -- a chunk delivered twice ----------------------------------------------------------------
def test_chunk_sent_twice_runs_on_real_workers_and_counts_each_employee_once(
        huey, settings):
    """Every chunk is enqueued again as another task with the same item ids, and once
    more as the same job byte for byte, before any worker runs: 8 threads run the copies
    side by side."""
    configure(settings, chunk_size=10)
    batch = fanned_out("pl_twice_sent", 60, **TASK_CALLBACKS)
    records = list(chunk_records(batch))
    assert len(records) == 6
    calls = [((), record.kwargs) for record in records]
    payroll.calculate_payroll_chunk_task.send_many(calls, batch_id=batch.pk)
    huey.driver.send([job_of(record) for record in records])
    # 3 x 6 chunks, and the fan-out message (moot: the batch is already running).
    assert huey.driver.queue_depths()["default"]["queued"] == 18 + 1

    huey.drain("--threads", "8")

    assert_complete(batch, 60)
    assert PayrollLine.objects.filter(batch=batch).count() == batch.succeeded == 60
    assert marks(batch) == {"complete": 1, "success": 1, "failure": 0}
    # Every employee was computed by exactly one of the copies that claimed it.
    assert not batch.items.filter(attempts=0).exists()
    assert huey.driver.queue_depths()["default"]["queued"] == 0


def test_same_job_run_twice_side_by_side_records_each_outcome_once(huey, settings):
    """A redelivery of a job whose first run is still going (or died after computing):
    both runs hold the same claim (the job id); only the first write counts."""
    configure(settings, chunk_size=10)
    batch = fanned_out("pl_same_job", 20)
    record = chunk_records(batch).order_by("enqueued_at").first()
    ids = record.kwargs["item_ids"]
    token = current_job.set(job_of(record))
    try:
        claim = uuid.UUID(str(record.id))
        first = claim_items(batch, ids, claim)
        again = claim_items(batch, ids, claim)  # the redelivery takes its own items back
        assert first == again and len(first) == 10
        employees = [employee for _, employee in first]
        first_outcome = compute(batch, employees)
        again_outcome = compute(batch, employees)
        assert record_item_outcomes(batch, again, claim, *again_outcome) == (10, 0)
        assert record_item_outcomes(batch, first, claim, *first_outcome) == (0, 0)
        # A third delivery after both: nothing is claimable, nothing is written.
        assert calculate_payroll_chunk(batch.pk, ids) == {
            "batch_id": batch.pk, "succeeded": 0, "failed": 0, "skipped": 10}
    finally:
        current_job.reset(token)
    batch.refresh_from_db()
    assert (batch.succeeded, batch.failed) == (10, 0)
    assert PayrollLine.objects.filter(batch=batch).count() == 10
    assert set(batch.items.filter(pk__in=ids).values_list("attempts", flat=True)) == {2}
    assert set(batch.items.filter(pk__in=ids).values_list("status", flat=True)) == {
        ItemStatus.SUCCEEDED}


# -- leases ---------------------------------------------------------------------------------
def test_a_dead_claim_is_taken_over_and_a_live_one_is_not(huey, settings):
    configure(settings, chunk_size=10)
    batch = fanned_out("pl_dead_claim", 20, **TASK_CALLBACKS)
    first_chunk = item_ids(batch)[:10]
    dead, live = first_chunk[:5], first_chunk[5:]
    now = timezone.now()
    PayrollItem.objects.filter(pk__in=dead).update(
        status=ItemStatus.PROCESSING, claimed_by=uuid.uuid4(),
        claim_expires_at=now - datetime.timedelta(minutes=1))
    live_owner = uuid.uuid4()
    PayrollItem.objects.filter(pk__in=live).update(
        status=ItemStatus.PROCESSING, claimed_by=live_owner,
        claim_expires_at=now + datetime.timedelta(hours=1))

    outcome = calculate_payroll_chunk(batch.pk, first_chunk)

    assert outcome == {"batch_id": batch.pk, "succeeded": 5, "failed": 0, "skipped": 5}
    assert set(batch.items.filter(pk__in=dead).values_list("status", flat=True)) == {
        ItemStatus.SUCCEEDED}
    assert set(batch.items.filter(pk__in=live).values_list("status", "claimed_by")) == {
        (ItemStatus.PROCESSING, live_owner)}
    assert not PayrollLine.objects.filter(
        batch=batch, employee__code__in=batch.items.filter(pk__in=live)
        .values_list("employee_id", flat=True)).exists()
    assert counters(batch)[:4] == (BatchStatus.RUNNING, 20, 5, 0)
    # Nothing to recover yet: the live claim holds, the other chunk's record is pending.
    assert reconcile_batches()["chunks"] == 0

    # An hour later the live claim has expired too, and no task will run for it: the
    # reconciler gives its items to a new chunk; a real worker runs every message.
    later = now + datetime.timedelta(hours=2)
    report = reconcile_batches(now=later)
    assert (report["expired"], report["orphaned"], report["chunks"]) == (5, 0, 1)
    huey.drain()
    assert_complete(batch, 20)
    assert marks(batch) == {"complete": 1, "success": 1, "failure": 0}


def test_a_lease_expires_after_batch_claim_ttl(huey, settings):
    """A worker claims a chunk and dies: another chunk gets nothing until the lease
    (BATCH_CLAIM_TTL, here 2 s) has run out, then everything."""
    configure(settings, chunk_size=10, ttl=2.0)
    batch = fanned_out("pl_lease", 10)
    ids = item_ids(batch)
    died = uuid.uuid4()
    before = timezone.now()
    assert len(claim_items(batch, ids, died)) == 10  # ... and its worker was SIGKILLed
    expires = set(batch.items.values_list("claim_expires_at", flat=True))
    assert len(expires) == 1
    expiry = expires.pop()
    assert before + datetime.timedelta(seconds=2) <= expiry <= timezone.now() + \
        datetime.timedelta(seconds=2)

    assert calculate_payroll_chunk(batch.pk, ids)["skipped"] == 10
    assert timezone.now() < expiry  # (the refusal above happened inside the lease)
    assert not PayrollLine.objects.filter(batch=batch).exists()
    time.sleep(max((expiry - timezone.now()).total_seconds(), 0) + 0.05)
    assert calculate_payroll_chunk(batch.pk, ids)["succeeded"] == 10
    # The dead worker's write, had it come back, would find the claim gone.
    assert record_item_outcomes(batch, [(ids[0], "x")], died, {"x": {}}, {}) == (0, 0)
    assert_complete(batch, 10)
    assert set(batch.items.values_list("attempts", flat=True)) == {2}


def slow_calculate_and_store(employee_id: str, *args: Any, **kwargs: Any) -> dict:
    """CALCULATE_EMPLOYEE that takes 0.3 s and notes whether the lease still held."""
    item = PayrollItem.objects.get(batch_id=kwargs["batch_id"], employee_id=employee_id)
    slow_calculate_and_store.leases.append(item.claim_expires_at > timezone.now())
    time.sleep(0.3)
    return services.calculate_and_store(employee_id, *args, **kwargs)


slow_calculate_and_store.leases = []


def test_a_long_chunk_renews_its_lease(huey, settings):
    """Per-employee path: 6 x 0.3 s = 1.8 s of work under a 0.9 s lease (renewed
    every 0.3 s); without renewal the lease would lapse at the fourth employee."""
    payroll_hooks = dict(settings.COATI_QUEUE["PAYROLL"])
    del payroll_hooks["CALCULATE_MANY"]
    settings.COATI_QUEUE = {**settings.COATI_QUEUE, "PAYROLL": payroll_hooks}
    configure(settings, chunk_size=10, ttl=0.9,
              CALCULATE_EMPLOYEE=f"{__name__}.slow_calculate_and_store")
    batch = fanned_out("pl_renew", 6)
    slow_calculate_and_store.leases = []
    assert calculate_payroll_chunk(batch.pk, item_ids(batch))["succeeded"] == 6
    assert slow_calculate_and_store.leases == [True] * 6
    assert_complete(batch, 6)


# -- reconcile ------------------------------------------------------------------------------
def lose_chunks(huey: Any, batch: PayrollBatch, keep_first: bool = True) -> list[int]:
    """The first chunk runs; the others' messages are lost and their records end failed,
    as when their worker was lost WORKER_LOST_LIMIT times. Returns the stranded items."""
    records = list(chunk_records(batch).order_by("enqueued_at"))
    if keep_first:
        token = current_job.set(job_of(records[0]))
        try:
            calculate_payroll_chunk(**records[0].kwargs)
        finally:
            current_job.reset(token)
        TaskResult.objects.filter(pk=records[0].pk).update(status=TaskStatus.COMPLETED)
        records = records[1:]
    assert huey.driver.purge() > 0
    TaskResult.objects.filter(pk__in=[r.pk for r in records]).update(
        status=TaskStatus.FAILED, error="Worker lost 3 times while running this task")
    stranded = item_ids(batch, status=ItemStatus.PENDING)
    assert stranded and huey.driver.queue_depths()["default"]["queued"] == 0
    return stranded


def assert_each_item_in_one_live_chunk(batch: PayrollBatch, expected: list[int]) -> None:
    listed = [pk for kwargs in chunk_records(batch, status=TaskStatus.PENDING)
              .values_list("kwargs", flat=True) for pk in kwargs["item_ids"]]
    assert sorted(listed) == sorted(expected)  # all of them, none twice


def test_reconcile_reenqueues_stranded_items_once_when_two_run_at_once(huey, settings):
    configure(settings, chunk_size=10)
    batch = fanned_out("pl_stranded", 60, **TASK_CALLBACKS)
    stranded = lose_chunks(huey, batch)
    assert len(stranded) == 50

    reports = run_in_threads(reconcile_batches, reconcile_batches)

    assert sum(r["orphaned"] for r in reports) == 50
    assert sum(r["chunks"] for r in reports) == 5
    assert_each_item_in_one_live_chunk(batch, stranded)
    assert huey.driver.queue_depths()["default"]["queued"] == 5
    # Reserved for their chunk: the job id is stamped on its items, still pending.
    for record in chunk_records(batch, status=TaskStatus.PENDING):
        assert set(batch.items.filter(pk__in=record.kwargs["item_ids"])
                   .values_list("status", "claimed_by")) == {(ItemStatus.PENDING, record.pk)}
    assert reconcile_batches()["chunks"] == 0  # they are live now

    huey.drain("--threads", "4")
    assert_complete(batch, 60)
    assert marks(batch) == {"complete": 1, "success": 1, "failure": 0}
    assert set(batch.items.values_list("attempts", flat=True)) == {1}


def test_a_reconciler_that_read_stale_rows_enqueues_nothing(huey, settings, monkeypatch):
    """Reconciler A reads the stranded items; B re-enqueues them all before A writes.
    A's compare-and-swap then wins nothing, so it enqueues nothing."""
    configure(settings, chunk_size=10)
    batch = fanned_out("pl_stale", 30)
    stranded = lose_chunks(huey, batch, keep_first=False)
    original = payroll_recovery._items_of_live_chunks
    other: dict[str, Any] = {}

    def read_then_let_b_run(batch_: PayrollBatch) -> set[int]:
        live = original(batch_)  # A's view, taken before B runs
        if threading.current_thread() is threading.main_thread() and not other:
            other["report"] = run_in_threads(reconcile_batches)[0]  # B, unpatched view
        return live

    monkeypatch.setattr(payroll_recovery, "_items_of_live_chunks", read_then_let_b_run)
    report_a = reconcile_batches()

    assert other["report"]["chunks"] == 3 and other["report"]["orphaned"] == 30
    assert report_a["chunks"] == 0 and report_a["orphaned"] == 0
    assert_each_item_in_one_live_chunk(batch, stranded)
    assert huey.driver.queue_depths()["default"]["queued"] == 3


def test_reconcile_leaves_a_live_claimers_items_to_its_own_redelivery(huey, settings):
    """The lease ran out, but the claiming task's record is still processing: the
    delivery reconciler will re-send that job and it takes its items back as its own."""
    configure(settings, chunk_size=10, ttl=0.2)
    batch = fanned_out("pl_live_claimer", 10)
    record = chunk_records(batch).get()
    TaskResult.objects.filter(pk=record.pk).update(status=TaskStatus.PROCESSING)
    assert len(claim_items(batch, record.kwargs["item_ids"], record.pk)) == 10
    time.sleep(0.3)

    assert reconcile_batches()["chunks"] == 0
    token = current_job.set(job_of(record))
    try:
        assert calculate_payroll_chunk(**record.kwargs)["succeeded"] == 10
    finally:
        current_job.reset(token)
    assert_complete(batch, 10)
    assert chunk_records(batch).count() == 1


def test_reconcile_finishes_a_batch_whose_last_chunk_died_before_finishing(huey, settings):
    configure(settings, chunk_size=10)
    batch = fanned_out("pl_unfinished", 20, **TASK_CALLBACKS)
    for record in chunk_records(batch):  # counted, then the worker died
        claim = uuid.UUID(str(record.pk))
        items = claim_items(batch, record.kwargs["item_ids"], claim, record=False)
        record_item_outcomes(batch, items, claim,
                             *compute(batch, [employee for _, employee in items]))
    assert counters(batch)[:4] == (BatchStatus.RUNNING, 20, 20, 0)

    reports = run_in_threads(reconcile_batches, reconcile_batches, reconcile_batches)

    assert sorted(r["finished"] for r in reports) == [0, 0, 1]
    assert sum(r["chunks"] for r in reports) == 0
    assert_complete(batch, 20)
    # Each callback task was enqueued once, in the transaction that finished the batch.
    assert callback_records(batch) == {"tests.payroll_on_complete": 1,
                                       "tests.payroll_on_failure": 0,
                                       "tests.payroll_on_success": 1}
    assert reconcile_batches()["batches"] == 0


# -- callbacks come from the batch row, by registered name only -----------------------------
def test_planted_fanout_message_with_callbacks_is_refused_without_importing(
        huey, run_workers, tmp_path):
    imported = tmp_path / "imported"
    (tmp_path / "coati_planted_callback.py").write_text(
        f"open({str(imported)!r}, 'w').close()\ndef hook(batch_id):\n    pass\n")
    make_planilla("pl_planted", 5)
    waiting = create_batch("pl_planted", "2024-02-01", "2024-02-15")  # pending, not fanned out
    planted = [
        Job(task="process_payroll_parallel", queue="default", kwargs={
            "planilla_id": "pl_planted", "periodo_inicio": START, "periodo_fin": END,
            "on_complete": "builtins.print"}),
        Job(task="process_payroll_parallel", queue="default", kwargs={
            "planilla_id": "pl_planted", "periodo_inicio": "2024-02-01",
            "periodo_fin": "2024-02-15", "batch_id": waiting.pk,
            "on_success": "coati_planted_callback.hook", "on_failure": "os._exit"}),
    ]
    huey.driver.send(planted)

    completed = run_workers("huey", env={
        "PYTHONPATH": f"{REPO_ROOT}:{tmp_path}"})  # importable, were anything to import it

    assert completed.returncode == 0, describe_failure(completed)
    first, second = (TaskResult.objects.get(pk=job.id) for job in planted)
    assert first.status == second.status == TaskStatus.FAILED
    assert "unexpected keyword argument 'on_complete'" in first.error, first.error
    assert "TypeError" in first.traceback
    assert "unexpected keyword argument 'on_" in second.error, second.error
    assert not imported.exists()
    # No batch from the first; the waiting batch was not fanned out and has no callback.
    assert list(PayrollBatch.objects.values_list("pk", flat=True)) == [waiting.pk]
    waiting.refresh_from_db()
    assert waiting.status == BatchStatus.PENDING
    assert (waiting.on_complete, waiting.on_success, waiting.on_failure) == ("", "", "")
    assert not waiting.items.exists()


def test_fanout_send_refuses_callback_arguments_at_once(immediate):
    with pytest.raises(TypeError, match="on_complete"):
        process_payroll_parallel_task.send(planilla_id="x", periodo_inicio=START,
                                           periodo_fin=END, on_complete="builtins.print")
    assert not TaskResult.objects.exists() and not PayrollBatch.objects.exists()


@pytest.mark.parametrize("kind", ["on_complete", "on_success", "on_failure"])
def test_create_batch_refuses_a_dotted_path_callback(kind):
    with pytest.raises(PayrollError, match=r"'os\.system' is not a registered task"):
        create_batch("pl_refuse", START, END, **{kind: "os.system"})
    assert not PayrollBatch.objects.exists()
    batch = create_batch("pl_refuse", START, END, **{kind: TASK_CALLBACKS[kind]})
    assert getattr(batch, kind) == TASK_CALLBACKS[kind]


def test_a_batch_row_naming_a_dotted_path_fires_nothing(immediate, tmp_path, monkeypatch,
                                                         caplog):
    """A row written before this rule, or directly in the database: logged, not imported."""
    imported = tmp_path / "imported"
    (tmp_path / "coati_planted_row.py").write_text(
        f"open({str(imported)!r}, 'w').close()\ndef hook(batch_id):\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    batch = create_batch("pl_row", START, END)
    PayrollBatch.objects.filter(pk=batch.pk).update(
        status=BatchStatus.COMPLETED, on_complete="coati_planted_row.hook",
        on_success="builtins.print")
    batch.refresh_from_db()
    with caplog.at_level(logging.ERROR, logger="coati_queue.payroll"):
        assert fire_callbacks(batch) == []
    assert "'coati_planted_row.hook' is not a registered task" in caplog.text
    assert not imported.exists()
    batch.refresh_from_db()
    assert batch.complete_fired_at is None and batch.success_fired_at is None


# -- the origin-design fan-out under redelivery ---------------------------------------------
def test_origin_design_fanout_still_works_and_a_redelivery_adds_no_batch(immediate):
    make_planilla("pl_origin_send", 12)
    task_id = process_payroll_parallel_task.send(planilla_id="pl_origin_send",
                                                 periodo_inicio=START, periodo_fin=END,
                                                 usuario="admin")
    record = TaskResult.objects.get(pk=task_id)
    assert record.status == TaskStatus.COMPLETED, record.error
    batch = PayrollBatch.objects.get()
    assert record.batch_id == batch.pk  # the fan-out's record links its batch
    assert_complete(batch, 12)
    assert batch.requested_by_name == "admin"

    # The same message run again (its worker died after the commit, before the ack).
    token = current_job.set(job_of(record))
    try:
        again = process_payroll_parallel(**record.kwargs)
    finally:
        current_job.reset(token)
    assert again == {"batch_id": batch.pk, "status": BatchStatus.COMPLETED, "total": 12}
    assert PayrollBatch.objects.count() == 1
    assert PayrollLine.objects.filter(batch=batch).count() == 12
