"""Task records in the ORM: the tracking middleware and the read side.

Write path, designed for thousands of tasks a second:

* enqueue: one INSERT per call (``enqueue_many``: one per 500 jobs), inside
  the caller's transaction, so a rolled-back enqueue leaves no record;
* execution: no query on the task's path. States (processing, completed,
  failed, retrying) go to a per-process buffer; a flusher thread writes the
  latest state of every buffered task as one ``INSERT .. ON CONFLICT DO
  UPDATE`` statement every ``TRACKING_FLUSH_INTERVAL`` seconds. The upsert
  never moves a finished record back or an older attempt over a newer one,
  so a task delivered twice cannot corrupt its record.
"""

from __future__ import annotations

import datetime
import logging
import threading
import time
import uuid
from typing import TYPE_CHECKING, Any, Iterable

from django.core.exceptions import ValidationError
from django.db import (DatabaseError, DataError, IntegrityError, connections, router,
                       transaction)
from django.db.models import Count
from django.utils import timezone

from .claims import ClaimRefused, ClaimRequest, fail_lost, write_claim_group
from .clock import from_epoch
from .core.exceptions import InvalidJob, SkipJob
from .core.execution import exception_path
from .core.jobs import Job
from .core.middleware import Middleware
from .models import FINISHED_TASK_STATES, PayrollBatch, TaskResult, TaskStatus
from .reconcile import OutboxRelay
from .sqlite import is_locked, retry_locked

if TYPE_CHECKING:
    from .conf import QueueSettings

logger = logging.getLogger("coati_queue.tracking")

UPSERT_FIELDS = ("id", "task_name", "queue", "backend", "status", "args", "kwargs", "result",
                 "error", "traceback", "exception_class", "attempts", "max_retries",
                 "enqueued_at", "eta",
                 "started_at", "finished_at", "duration_seconds", "expires_at", "worker_id",
                 "batch", "unsent", "lost_count", "resends")
UPDATED_ON_CONFLICT = ("status", "result", "error", "traceback", "exception_class", "attempts",
                       "finished_at", "duration_seconds", "expires_at", "worker_id")


def _when(epoch: float | None) -> datetime.datetime | None:
    return from_epoch(epoch) if epoch else None  # naive local time when USE_TZ is False


def record_from_job(job: Job, backend: str, **state: Any) -> dict[str, Any]:
    row = {
        "id": uuid.UUID(job.id), "task_name": job.task, "queue": job.queue, "backend": backend,
        "status": TaskStatus.PENDING, "args": job.args, "kwargs": job.kwargs, "result": None,
        "error": "", "traceback": "", "exception_class": "", "attempts": 0,
        "max_retries": job.max_retries,
        "enqueued_at": _when(job.enqueued_at), "eta": _when(job.eta), "started_at": None,
        "finished_at": None, "duration_seconds": None, "expires_at": None, "worker_id": "",
        "batch": job.batch_id, "unsent": False, "lost_count": 0, "resends": 0,
    }
    row.update(state)
    return row


#: Shortest time between two writes of buffered states by the writer thread.
COALESCE_STATES = 0.01
#: States kept in memory per process while the database refuses writes.
MAX_BUFFERED = 100_000


class StateBuffer:
    """The tracking writer of one process: claims and task states, one thread.

    Worker threads hand it claims (and wait for the answer) and outcomes (and go
    on); its thread writes all waiting claims in one statement, then all buffered
    states in one upsert, as soon as the previous write is done, on one
    long-lived connection: no task thread opens a database connection for
    tracking, and a process's tracking writes never compete with each other.
    """

    def __init__(self, interval: float):
        self.interval = interval
        self._rows: dict[uuid.UUID, dict[str, Any]] = {}
        self._claims: list[ClaimRequest] = []
        self._lock = threading.Lock()
        # Held while writing: a flush() returns only once rows taken by a concurrent
        # flush (the writer thread) are written too, so nothing is lost at exit.
        self._flush_lock = threading.Lock()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_write = 0.0

    def _ensure_thread(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._loop, name="coati-tracking",
                                            daemon=True)
            self._thread.start()

    def put(self, row: dict[str, Any]) -> None:
        with self._lock:
            self._rows[row["id"]] = row
            self._ensure_thread()
        # Written as soon as the previous write is done (states that arrive meanwhile
        # share the next statement): the shorter an outcome waits in memory, the fewer
        # finished tasks a SIGKILL leaves looking unfinished (and run again).
        self._wake.set()

    def claim(self, row: dict[str, Any]) -> int | None:
        """Claim a task record before running it (see ``coati_queue.claims``)."""
        request = ClaimRequest(row)
        with self._lock:
            self._claims.append(request)
            self._ensure_thread()
        self._wake.set()
        return request.outcome()

    def _loop(self) -> None:
        while True:
            self._wake.wait(self.interval)
            with self._lock:
                waiting = bool(self._claims)
            gap = COALESCE_STATES - (time.monotonic() - self._last_write)
            if gap > 0 and not waiting:
                # At most one states write per COALESCE_STATES: under load, states share
                # statements (a write per task would make worker processes queue for
                # SQLite's lock); when idle, a state is written at once.
                time.sleep(gap)
            self._wake.clear()
            with self._lock:
                claims, self._claims = self._claims, []
            try:
                if claims:
                    write_claim_group(claims)
                self.flush()
                self._last_write = time.monotonic()
            except DatabaseError as exc:
                if is_locked(exc):  # locked past LOCK_PATIENCE: nothing is lost, try again
                    logger.warning("Writing task states failed (%s); will retry", exc)
                else:
                    logger.exception("Writing task states failed; will retry")
                connections.close_all()  # a fresh connection next time

    def flush(self) -> int:
        with self._flush_lock:
            with self._lock:
                rows, self._rows = list(self._rows.values()), {}
            if not rows:
                return 0
            try:
                retry_locked(write_states, rows, what="Writing task states")
            except (IntegrityError, DataError):
                write_states_one_by_one(rows)  # one bad row must not hold back the rest
            except DatabaseError:
                with self._lock:  # keep them for the next flush, newer states win
                    for row in rows:
                        self._rows.setdefault(row["id"], row)
                    self._bound()
                raise
            return len(rows)

    def _bound(self) -> None:
        """While the database is down, keep at most ``MAX_BUFFERED`` states (the
        newest); the reconciler repairs records whose last state was dropped."""
        excess = len(self._rows) - MAX_BUFFERED
        if excess > 0:
            for key in list(self._rows)[:excess]:
                del self._rows[key]
            logger.error("Tracking buffer full: dropped the %d oldest task states", excess)


def write_states_one_by_one(rows: list[dict[str, Any]]) -> None:
    """Each row alone; a row the database still refuses is written without its batch
    link (the usual cause: a batch id that does not exist), else dropped and logged."""
    for row in rows:
        for attempt in (row, {**row, "batch": None}):
            try:
                retry_locked(write_states, [attempt], what="Writing a task state")
                break
            except (IntegrityError, DataError) as exc:
                refused = exc
        else:
            logger.error("Task state of %s refused by the database, dropped: %s", row["id"],
                         refused)


def write_states(rows: list[dict[str, Any]]) -> None:
    """Upsert rows; a finished record or a newer attempt is never overwritten."""
    using = router.db_for_write(TaskResult)
    connection = connections[using]
    if connection.vendor not in ("sqlite", "postgresql"):
        _write_states_portably(rows, using)
        return
    table = connection.ops.quote_name(TaskResult._meta.db_table)
    fields = [TaskResult._meta.get_field(name) for name in UPSERT_FIELDS]
    columns = ", ".join(connection.ops.quote_name(f.column) for f in fields)
    updates = ", ".join(f"{connection.ops.quote_name(TaskResult._meta.get_field(n).column)}"
                        f" = excluded.{connection.ops.quote_name(TaskResult._meta.get_field(n).column)}"
                        for n in UPDATED_ON_CONFLICT)
    started = connection.ops.quote_name("started_at")
    updates += f", {started} = COALESCE(excluded.{started}, {table}.{started})"
    finished = ", ".join(f"'{state}'" for state in (TaskStatus.COMPLETED, TaskStatus.CANCELLED))
    guard = (f"{table}.status NOT IN ({finished}) AND "
             f"excluded.attempts >= {table}.attempts")
    per_row = len(fields)
    chunk = max(1, min(500, (connection.features.max_query_params or 999) // per_row))
    rows = sorted(rows, key=lambda row: str(row["id"]))  # one lock order: no deadlock on PG
    with transaction.atomic(using=using):
        with connection.cursor() as cursor:
            for start in range(0, len(rows), chunk):
                part = rows[start:start + chunk]
                values = ", ".join(["(" + ", ".join(["%s"] * per_row) + ")"] * len(part))
                params = [f.get_db_prep_save(row[f.name], connection)
                          for row in part for f in fields]
                cursor.execute(f"INSERT INTO {table} ({columns}) VALUES {values} "
                               f"ON CONFLICT (id) DO UPDATE SET {updates} WHERE {guard}", params)


def _write_states_portably(rows: list[dict[str, Any]], using: str) -> None:
    with transaction.atomic(using=using):
        for row in rows:
            data = {k if k != "batch" else "batch_id": v for k, v in row.items()}
            updated = (TaskResult.objects.using(using).filter(pk=row["id"], attempts__lte=row["attempts"])
                       .exclude(status__in=[TaskStatus.COMPLETED, TaskStatus.CANCELLED])
                       .update(**{k: data[k] for k in UPDATED_ON_CONFLICT}))
            if not updated and not TaskResult.objects.using(using).filter(pk=row["id"]).exists():
                TaskResult.objects.using(using).create(**data)


class TrackingMiddleware(Middleware):
    """Writes every task's record; see the module docstring for the cost."""

    def __init__(self, settings: "QueueSettings"):
        self.settings = settings
        self.buffer = StateBuffer(settings.TRACKING_FLUSH_INTERVAL)
        self.relay = OutboxRelay()
        self.worker_id = ""
        self._started: dict[str, datetime.datetime] = {}

    def before_enqueue(self, driver: Any, jobs: list[Job]) -> None:
        # The same multi-row statement as the worker's flush: the ORM's bulk_create
        # cost more than half of enqueue_many (benchmarks/NOTES.rst).
        # Retried on a lock only outside the caller's transaction (see retry_locked).
        retry_locked(write_states, [record_from_job(job, driver.name) for job in jobs],
                     what="Recording sent tasks")

    def before_execute(self, driver: Any, job: Job) -> None:
        started = timezone.now()
        row = record_from_job(job, driver.name, status=TaskStatus.PROCESSING,
                              attempts=job.attempt, started_at=started, worker_id=self.worker_id)
        if job.batch_id is not None and not PayrollBatch.objects.filter(pk=job.batch_id).exists():
            # Checked here, not left to the database: a first delivery writes no claim,
            # and a forged batch id must not reach the batch's task or its counters.
            raise InvalidJob(f"message names batch {job.batch_id}, which does not exist")
        if driver.runs_in_caller or not job.redelivered:
            # A first delivery: the broker gave it to this worker alone, so its state is
            # buffered like the outcome (no query on the task's path).
            self._started[job.id] = started
            self.buffer.put(row)
            return
        try:
            lost_count = self.buffer.claim(row)
        except ClaimRefused as exc:
            raise InvalidJob(str(exc)) from None
        except DatabaseError:
            # The database stayed unavailable: run it anyway (at-least-once) rather than
            # drop it; its states are buffered and written when the database is back.
            logger.exception("Could not claim task record %s; running it unclaimed", job.id)
            self.buffer.put(row)
            lost_count = 0
        if lost_count is None:
            raise SkipJob("its record is already claimed, finished, or at a later attempt")
        if lost_count >= self.settings.WORKER_LOST_LIMIT:
            fail_lost(uuid.UUID(job.id), lost_count, self.settings.FAILURE_TTL)
            raise SkipJob(f"its worker was lost {lost_count} times; marked failed")
        self._started[job.id] = started  # one worker thread per job id at a time

    def after_execute(self, driver: Any, job: Job, *, result: Any = None,
                      exception: BaseException | None = None, retry_in_ms: int | None = None,
                      traceback: str = "") -> None:
        now = timezone.now()
        started = self._started.pop(job.id, None)
        ran = (now - started).total_seconds() if started else None
        if exception is None:
            state = {"status": TaskStatus.COMPLETED, "result": result, "finished_at": now,
                     "duration_seconds": ran,
                     "expires_at": now + datetime.timedelta(seconds=self.settings.RESULT_TTL)}
        elif retry_in_ms is not None:
            state = {"status": TaskStatus.PENDING, "error": str(exception) or repr(exception),
                     "traceback": traceback, "exception_class": exception_path(exception)}
        else:
            state = {"status": TaskStatus.FAILED, "error": str(exception) or repr(exception),
                     "traceback": traceback, "exception_class": exception_path(exception),
                     "finished_at": now, "duration_seconds": ran,
                     "expires_at": now + datetime.timedelta(seconds=self.settings.FAILURE_TTL)}
        self.buffer.put(record_from_job(job, driver.name, attempts=job.attempt,
                                        started_at=started, worker_id=self.worker_id, **state))
        if retry_in_ms is not None:
            self.buffer.flush()  # the next attempt may start on another worker

    def after_invalid_message(self, driver: Any, raw: Any, error: BaseException) -> None:
        """A ``DeadLetter`` a person can read and requeue, not a task record: the
        message has no trustworthy task id, and its record could not be retried."""
        from . import dead_letters

        # The Huey driver hands over the text of a queue file its serializer could not read.
        unreadable_file = (getattr(driver, "name", "") == "huey" and isinstance(raw, str)
                           and str(error).startswith("undecodable Huey message"))
        try:
            retry_locked(dead_letters.record, raw, str(error) or repr(error),
                         backend=getattr(driver, "name", ""),
                         source="huey-file" if unreadable_file else "worker",
                         seen_by=self.worker_id, what="Recording a dead letter")
        except DatabaseError:
            # Never into the worker: the message is consumed, so the log keeps what it was.
            logger.exception("Could not record a dead letter (%s); the message began: %r",
                             error, raw[:2000] if isinstance(raw, (str, bytes)) else type(raw))

    def after_enqueue(self, driver: Any, jobs: list[Job]) -> None:
        self.relay.after_successful_send(driver)

    def send_failed(self, driver: Any, jobs: list[Job], error: BaseException) -> None:
        # Autocommit, outside the caller's (committed) transaction: the outbox mark.
        unsent = TaskResult.objects.filter(pk__in=[uuid.UUID(job.id) for job in jobs],
                                           status=TaskStatus.PENDING)
        retry_locked(unsent.update, unsent=True, what="Marking unsent tasks")
        self.relay.mark()

    def flush(self, driver: Any) -> None:
        self.buffer.flush()

    def worker_started(self, driver: Any, worker: Any) -> None:
        self.worker_id = worker.worker_id

    def worker_stopped(self, driver: Any, worker: Any) -> None:
        self.buffer.flush()


# -- read side ------------------------------------------------------------
def task_result(task_id: str) -> dict[str, Any] | None:
    try:
        record = TaskResult.objects.get(pk=task_id)
    except (TaskResult.DoesNotExist, ValidationError, ValueError, TypeError):
        return None  # ValidationError: not a UUID
    return record.as_result_dict()


def bulk_results(task_ids: Iterable[str]) -> dict[str, Any]:
    ids = [str(task_id) for task_id in task_ids]
    statuses = {str(pk): status for pk, status in
                TaskResult.objects.filter(pk__in=ids).values_list("pk", "status")}
    tasks = {task_id: statuses.get(task_id, "unknown") for task_id in ids}
    count = lambda *states: sum(1 for s in tasks.values() if s in states)  # noqa: E731
    finished = count(*FINISHED_TASK_STATES)
    return {
        "total": len(ids),
        "completed": count(TaskStatus.COMPLETED),
        "failed": count(TaskStatus.FAILED),
        "pending": count(TaskStatus.PENDING, "unknown"),
        "processing": count(TaskStatus.PROCESSING),
        "progress_percentage": round(100.0 * finished / len(ids), 1) if ids else 100.0,
        "tasks": tasks,
    }


def status_counts(queue: str | None = None) -> dict[str, int]:
    qs = TaskResult.objects.all()
    if queue:
        qs = qs.filter(queue=queue)
    counts = {status: 0 for status in TaskStatus.values}
    counts.update(dict(qs.values_list("status").annotate(n=Count("id")).order_by()))
    return counts


#: Heartbeats of workers gone (stopped or lost) this long are forgotten by the cleanup.
FORGET_WORKERS_AFTER = datetime.timedelta(days=1)


def delete_expired(now: datetime.datetime | None = None) -> int:
    """Drop finished records past their TTL (worker upkeep, every ``CLEANUP_INTERVAL``).

    Also forgets workers not seen for ``FORGET_WORKERS_AFTER``: every crashed or
    killed worker would otherwise stay on the overview as "lost" for ever.
    """
    from .models import WorkerHeartbeat
    from .tallies import delete_task_records

    now = now or timezone.now()
    WorkerHeartbeat.objects.filter(last_seen__lt=now - FORGET_WORKERS_AFTER).delete()
    return delete_task_records(
        TaskResult.objects.expired(now).finished())
