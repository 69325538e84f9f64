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
import uuid
from typing import TYPE_CHECKING, Any, Iterable

from django.core.exceptions import ValidationError
from django.db import DatabaseError, connections, router, transaction
from django.db.models import Count
from django.utils import timezone

from .core.jobs import Job, peek_job_fields
from .core.middleware import Middleware
from .models import FINISHED_TASK_STATES, TaskResult, TaskStatus

if TYPE_CHECKING:
    from .conf import QueueSettings

logger = logging.getLogger("coati_queue.tracking")

UPSERT_FIELDS = ("id", "task_name", "queue", "backend", "status", "args", "kwargs", "result",
                 "error", "traceback", "attempts", "max_retries", "enqueued_at", "eta",
                 "started_at", "finished_at", "duration_seconds", "expires_at", "worker_id",
                 "batch")
UPDATED_ON_CONFLICT = ("status", "result", "error", "traceback", "attempts", "finished_at",
                       "duration_seconds", "expires_at", "worker_id")


def _when(epoch: float | None) -> datetime.datetime | None:
    return datetime.datetime.fromtimestamp(epoch, datetime.timezone.utc) if epoch else None


def record_from_job(job: Job, backend: str, **state: Any) -> dict[str, Any]:
    row = {
        "id": uuid.UUID(job.id), "task_name": job.task, "queue": job.queue, "backend": backend,
        "status": TaskStatus.PENDING, "args": job.args, "kwargs": job.kwargs, "result": None,
        "error": "", "traceback": "", "attempts": 0, "max_retries": job.max_retries,
        "enqueued_at": _when(job.enqueued_at), "eta": _when(job.eta), "started_at": None,
        "finished_at": None, "duration_seconds": None, "expires_at": None, "worker_id": "",
        "batch": job.batch_id,
    }
    row.update(state)
    return row


class StateBuffer:
    """Latest state per task id, written in bulk by one flusher thread per process."""

    def __init__(self, interval: float):
        self.interval = interval
        self._rows: dict[uuid.UUID, dict[str, Any]] = {}
        self._lock = threading.Lock()
        # Held while writing: a flush() returns only once rows taken by a concurrent
        # flush (the flusher thread) are written too, so nothing is lost at exit.
        self._flush_lock = threading.Lock()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None

    def put(self, row: dict[str, Any]) -> None:
        with self._lock:
            self._rows[row["id"]] = row
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._loop, name="coati-tracking",
                                                daemon=True)
                self._thread.start()

    def _loop(self) -> None:
        while True:
            self._wake.wait(self.interval)
            self._wake.clear()
            try:
                self.flush()
            except DatabaseError:
                logger.exception("Writing task states failed; will retry")
            finally:
                connections.close_all()

    def flush(self) -> int:
        with self._flush_lock:
            with self._lock:
                rows, self._rows = list(self._rows.values()), {}
            if not rows:
                return 0
            try:
                write_states(rows)
            except DatabaseError:
                with self._lock:  # keep them for the next flush, newer states win
                    for row in rows:
                        self._rows.setdefault(row["id"], row)
                raise
            return len(rows)


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
        self.worker_id = ""
        self._started: dict[str, datetime.datetime] = {}

    def before_enqueue(self, driver: Any, jobs: list[Job]) -> None:
        # The same multi-row statement as the worker's flush: the ORM's bulk_create
        # cost more than half of enqueue_many (benchmarks/NOTES.rst).
        write_states([record_from_job(job, driver.name) for job in jobs])

    def before_execute(self, driver: Any, job: Job) -> None:
        started = timezone.now()
        self._started[job.id] = started  # one worker thread per job id at a time
        self.buffer.put(record_from_job(job, driver.name, status=TaskStatus.PROCESSING,
                                        attempts=job.attempt, started_at=started,
                                        worker_id=self.worker_id))

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
                     "traceback": traceback}
        else:
            state = {"status": TaskStatus.FAILED, "error": str(exception) or repr(exception),
                     "traceback": traceback, "finished_at": now, "duration_seconds": ran,
                     "expires_at": now + datetime.timedelta(seconds=self.settings.FAILURE_TTL)}
        self.buffer.put(record_from_job(job, driver.name, attempts=job.attempt,
                                        started_at=started, worker_id=self.worker_id, **state))
        if retry_in_ms is not None:
            self.buffer.flush()  # the next attempt may start on another worker

    def after_invalid_message(self, driver: Any, raw: Any, error: BaseException) -> None:
        peek = peek_job_fields(raw)
        try:
            task_id = uuid.UUID(peek.get("id", ""))
        except ValueError:
            task_id = uuid.uuid4()
        text = raw if isinstance(raw, str) else repr(raw)
        now = timezone.now()
        TaskResult.objects.update_or_create(id=task_id, defaults={
            "task_name": peek.get("task") or "<undecodable>", "queue": peek.get("queue", ""),
            "backend": driver.name, "status": TaskStatus.FAILED, "kwargs": {"raw": text[:10_000]},
            "error": f"Undecodable message: {error}", "finished_at": now, "worker_id": self.worker_id,
            "expires_at": now + datetime.timedelta(seconds=self.settings.FAILURE_TTL),
        })

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
    """Drop finished records past their TTL (``manage.py queuestats --cleanup``, workers).

    Also forgets workers not seen for ``FORGET_WORKERS_AFTER``: every crashed or
    killed worker would otherwise stay on the overview as "lost" for ever.
    """
    from .models import WorkerHeartbeat
    from .tallies import delete_task_records

    now = now or timezone.now()
    WorkerHeartbeat.objects.filter(last_seen__lt=now - FORGET_WORKERS_AFTER).delete()
    return delete_task_records(
        TaskResult.objects.expired(now).filter(status__in=FINISHED_TASK_STATES))
