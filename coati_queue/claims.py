"""Claiming a task record before a redelivery runs: the guard against running it twice.

A first delivery runs without a claim: the broker gave it to this worker alone.
A delivery that may repeat an earlier one (``Job.delivery > 1``: given back
after its worker died, or re-sent from the record by the relay or the
reconciler) runs only after a conditional write moved its record to
``processing`` for this worker. The record is claimable when it is

* ``pending`` (never started, a retry, or reset by the reconciler), or
* ``processing`` with the same attempt: the previous run of that attempt was lost
  with its worker. ``lost_count`` goes up by one; at ``WORKER_LOST_LIMIT`` the
  record is failed instead of run again, so a task that kills its process cannot
  crash-loop the fleet.

Anything else (already completed, failed, cancelled, or an older attempt) is a
duplicate delivery and is dropped. A record that does not exist (deleted by its
TTL, or a message from an older release) is created as claimed.

Cost: claims are written by the process's tracking writer thread (on its own
long-lived connection), every waiting claim in one ``INSERT .. ON CONFLICT DO
UPDATE .. RETURNING`` statement ("group commit"), so under load a process pays
one statement per handful of tasks, and no task thread opens a connection.
"""

from __future__ import annotations

import datetime
import logging
import threading
import time
import uuid
from typing import Any

from django.db import DatabaseError, IntegrityError, connections, router, transaction
from django.utils import timezone

from .models import TaskResult, TaskStatus
from .sqlite import is_locked, retry_locked

logger = logging.getLogger("coati_queue.tracking")

#: Retries of a claim write the database refused for another reason than a lock (a lock
#: is waited for by ``retry_locked``), with the delays between them.
CLAIM_RETRY_DELAYS = (0.01, 0.05, 0.2, 0.5, 1.0)


class ClaimRefused(Exception):
    """This row could not be claimed for a reason of its own (e.g. its batch id does not
    exist): the message is dead-lettered, the other claims of the group go ahead."""


class ClaimRequest:
    """One thread's claim, answered by the tracking writer thread."""

    __slots__ = ("row", "event", "lost_count", "error")

    def __init__(self, row: dict[str, Any]):
        self.row = row
        self.event = threading.Event()
        self.lost_count: int | None = None
        self.error: BaseException | None = None

    def outcome(self) -> int | None:
        """``lost_count`` when claimed, None when not claimable; raises its error."""
        self.event.wait()
        if self.error is not None:
            raise self.error
        return self.lost_count


def write_claim_group(group: list[ClaimRequest]) -> None:
    """Write every waiting claim in one statement and answer each request.

    A row the database refuses (e.g. a batch id that does not exist) fails alone:
    the group is then written row by row, and only that request gets ``ClaimRefused``.
    """
    # A second delivery of a task in the same group is a duplicate: it is not run (and
    # PostgreSQL refuses an INSERT .. ON CONFLICT that touches a row twice).
    firsts: dict[Any, ClaimRequest] = {}
    for request in group:
        firsts.setdefault(request.row["id"], request)
    unique = list(firsts.values())
    try:
        claimed = _write_with_retries(unique)
        for request in unique:
            request.lost_count = claimed.get(request.row["id"])
    except IntegrityError:
        for request in unique:
            try:
                request.lost_count = _write_with_retries([request]).get(request.row["id"])
            except IntegrityError as exc:
                request.error = ClaimRefused(f"the database refused its record: {exc}")
            except DatabaseError as exc:
                request.error = exc
    except Exception as exc:  # DatabaseError, or a value the driver cannot adapt
        for request in group:  # each waiting thread gets the error, none a silent skip
            request.error = exc
    finally:
        for request in group:
            request.event.set()


def _write_with_retries(group: list[ClaimRequest]) -> dict[uuid.UUID, int]:
    for delay in (*CLAIM_RETRY_DELAYS, None):
        try:
            return retry_locked(write_claims, [request.row for request in group],
                                what=f"Claiming {len(group)} task record(s)")
        except IntegrityError:
            raise
        except DatabaseError as exc:
            if delay is None or is_locked(exc):  # a lock was waited for already
                raise
            logger.warning("Claiming %d task record(s) failed; retrying in %.2f s",
                           len(group), delay, exc_info=True)
            time.sleep(delay)
    raise AssertionError("unreachable")


def write_claims(rows: list[dict[str, Any]]) -> dict[uuid.UUID, int]:
    """One conditional upsert for all rows; returns ``{id: lost_count}`` of those claimed."""
    using = router.db_for_write(TaskResult)
    connection = connections[using]
    if connection.vendor not in ("sqlite", "postgresql"):
        return _write_claims_portably(rows, using)
    quote = connection.ops.quote_name
    table = quote(TaskResult._meta.db_table)
    rows = sorted(rows, key=lambda row: str(row["id"]))  # one lock order: no deadlock on PG
    fields = [TaskResult._meta.get_field(name) for name in rows[0]]  # tracking.record_from_job
    columns = ", ".join(quote(f.column) for f in fields)
    status, attempts, lost = quote("status"), quote("attempts"), quote("lost_count")
    values = ", ".join(["(" + ", ".join(["%s"] * len(fields)) + ")"] * len(rows))
    params = [f.get_db_prep_save(row[f.name], connection) for row in rows for f in fields]
    sql = (
        f"INSERT INTO {table} ({columns}) VALUES {values} ON CONFLICT (id) DO UPDATE SET "
        f"{status} = excluded.{status}, "
        f"{lost} = {table}.{lost} + CASE WHEN {table}.{status} = %s THEN 1 ELSE 0 END, "
        f"{attempts} = excluded.{attempts}, "
        f"{quote('started_at')} = excluded.{quote('started_at')}, "
        f"{quote('worker_id')} = excluded.{quote('worker_id')}, "
        f"{quote('unsent')} = %s "
        f"WHERE ({table}.{status} = %s AND excluded.{attempts} >= {table}.{attempts}) "
        f"OR ({table}.{status} = %s AND excluded.{attempts} = {table}.{attempts}) "
        f"RETURNING {quote('id')}, {lost}")
    params += [TaskStatus.PROCESSING, False, TaskStatus.PENDING, TaskStatus.PROCESSING]
    id_field = TaskResult._meta.pk
    with transaction.atomic(using=using):
        with connection.cursor() as cursor:
            cursor.execute(sql, params)
            returned = cursor.fetchall()
    return {id_field.to_python(pk): count for pk, count in returned}


def _write_claims_portably(rows: list[dict[str, Any]], using: str) -> dict[uuid.UUID, int]:
    claimed = {}
    with transaction.atomic(using=using):
        for row in rows:
            records = TaskResult.objects.using(using).select_for_update().filter(pk=row["id"])
            record = records.first()
            if record is None:
                data = {("batch_id" if k == "batch" else k): v for k, v in row.items()}
                TaskResult.objects.using(using).create(**data)
                claimed[row["id"]] = 0
                continue
            lost_again = (record.status == TaskStatus.PROCESSING
                          and record.attempts == row["attempts"])
            fresh = record.status == TaskStatus.PENDING and row["attempts"] >= record.attempts
            if lost_again or fresh:
                record.lost_count += int(lost_again)
                record.status, record.attempts = TaskStatus.PROCESSING, row["attempts"]
                record.started_at, record.worker_id = row["started_at"], row["worker_id"]
                record.unsent = False
                record.save(update_fields=["status", "attempts", "started_at", "worker_id",
                                           "lost_count", "unsent"])
                claimed[row["id"]] = record.lost_count
    return claimed


def fail_lost(task_id: uuid.UUID, lost_count: int, failure_ttl: float) -> None:
    """A task whose workers died ``lost_count`` times ends failed, without running again."""
    now = timezone.now()
    record = TaskResult.objects.filter(pk=task_id, status=TaskStatus.PROCESSING)
    retry_locked(
        record.update, what=f"Failing task record {task_id}",
        status=TaskStatus.FAILED, finished_at=now,
        error=f"Worker lost {lost_count} times while running this task "
              "(COATI_QUEUE['WORKER_LOST_LIMIT']); not run again.",
        expires_at=now + datetime.timedelta(seconds=failure_ttl))
