"""The relay and the reconciler: re-send from the task record what the broker lost.

Both run in every worker (``RECONCILE_INTERVAL``), are cheap when there is
nothing to do (an indexed query or two), and are safe when several run at once:
each re-send is won by one conditional UPDATE of the record's ``resends``
counter, and nothing is sent that the broker still holds.

* **Relay (outbox)**: records marked ``unsent`` (the broker refused the send
  after their transaction committed) are sent again.
* **Lost workers**: a ``processing`` record whose worker stopped heartbeating
  for ``WORKER_LOST_AFTER`` seconds. If the broker still holds its message
  (a Huey reservation, an unacked Dramatiq message), the broker gives it back
  and the claim counts the loss; if not, the record goes back to ``pending``
  with ``lost_count + 1`` and is re-sent (or failed at ``WORKER_LOST_LIMIT``).
* **Vanished messages**: a ``pending`` record older than ``RESEND_PENDING_AFTER``
  whose message the broker no longer has (Redis restarted without persistence,
  flushed, evicted; a sender killed between commit and send) is re-sent.
"""

from __future__ import annotations

import datetime
import logging
import threading
from dataclasses import dataclass
from typing import Any

from django.db.models import F, Q
from django.utils import timezone

from .claims import fail_lost
from .core.exceptions import BackendUnavailable, TaskNotRegistered
from .core.jobs import Job
from .core.tasks import registry
from .models import TaskResult, TaskStatus, WorkerHeartbeat

logger = logging.getLogger("coati_queue.reconcile")

#: Records looked at per pass and kind; the next pass takes the next ones.
PASS_LIMIT = 1000


@dataclass
class ReconcileReport:
    relayed: int = 0
    lost_reset: int = 0
    lost_failed: int = 0
    resent: int = 0

    def __bool__(self) -> bool:
        return bool(self.relayed or self.lost_reset or self.lost_failed or self.resent)


def job_from_record(record: TaskResult, attempt: int) -> Job:
    """The job a record describes, as attempt ``attempt``, marked as a re-send (so the
    worker claims the record before running it); options of today's task."""
    settings_default = _settings()
    try:
        options = registry.get(record.task_name).options
        min_backoff = options.min_backoff or settings_default.MIN_BACKOFF
        max_backoff = options.max_backoff or settings_default.MAX_BACKOFF
        time_limit, soft_time_limit = options.time_limits(settings_default)
    except TaskNotRegistered:  # the worker dead-letters it: still nothing lost
        min_backoff, max_backoff = settings_default.MIN_BACKOFF, settings_default.MAX_BACKOFF
        time_limit = settings_default.TIME_LIMIT
        soft_time_limit = settings_default.SOFT_TIME_LIMIT
    return Job(task=record.task_name, args=list(record.args or []),
               kwargs=dict(record.kwargs or {}), queue=record.queue, id=str(record.id),
               attempt=attempt, max_retries=record.max_retries, min_backoff=min_backoff,
               max_backoff=max_backoff, time_limit=time_limit,
               soft_time_limit=soft_time_limit,
               enqueued_at=record.enqueued_at.timestamp(),
               eta=record.eta.timestamp() if record.eta else None, batch_id=record.batch_id,
               delivery=record.resends + 2)


def _settings() -> Any:
    from .conf import get_settings

    return get_settings()


def _resend(driver: Any, record: TaskResult, attempt: int, **claim_filter: Any) -> bool:
    """Win the re-send by a conditional UPDATE, then send; give it back on failure."""
    won = TaskResult.objects.filter(pk=record.pk, resends=record.resends, **claim_filter).update(
        resends=F("resends") + 1, unsent=False)
    if not won:
        return False
    try:
        driver.send([job_from_record(record, attempt)])
    except BackendUnavailable:
        TaskResult.objects.filter(pk=record.pk, status=TaskStatus.PENDING).update(unsent=True)
        raise
    return True


def relay_unsent(driver: Any, limit: int = PASS_LIMIT) -> int:
    """Send the outbox: records whose send failed after their commit."""
    sent = 0
    records = (TaskResult.objects.filter(unsent=True, status=TaskStatus.PENDING)
               .order_by("enqueued_at")[:limit])
    for record in records:
        if _resend(driver, record, record.attempts + 1, unsent=True,
                   status=TaskStatus.PENDING):
            sent += 1
    if sent:
        logger.info("Relay: sent %d task(s) from the outbox.", sent)
    return sent


def lost_worker_ids(now: datetime.datetime, lost_after: float) -> set[str]:
    """Workers that stopped, or whose heartbeat is older than ``lost_after`` seconds."""
    cutoff = now - datetime.timedelta(seconds=lost_after)
    return set(WorkerHeartbeat.objects.filter(Q(stopped_at__isnull=False) | Q(last_seen__lt=cutoff))
               .values_list("worker_id", flat=True))


def recover_lost_tasks(driver: Any, now: datetime.datetime, report: ReconcileReport) -> None:
    settings = _settings()
    gone = lost_worker_ids(now, settings.WORKER_LOST_AFTER)
    live = set(WorkerHeartbeat.objects.exclude(worker_id__in=gone)
               .values_list("worker_id", flat=True))
    stale = now - datetime.timedelta(seconds=settings.WORKER_LOST_AFTER)
    # A worker with no heartbeat row at all (forgotten) counts as gone once its
    # claim is older than WORKER_LOST_AFTER.
    records = list(TaskResult.objects.filter(status=TaskStatus.PROCESSING)
                   .filter(Q(worker_id__in=gone) | (~Q(worker_id__in=live)
                                                     & Q(started_at__lt=stale)))
                   .order_by("started_at")[:PASS_LIMIT])
    if not records:
        return
    missing = driver.missing_jobs([(str(r.id), r.attempts, r.queue) for r in records])
    for record in records:
        if str(record.id) not in missing:
            continue  # the broker gives it back itself; the claim counts the loss
        lost = record.lost_count + 1
        if lost >= settings.WORKER_LOST_LIMIT:
            if TaskResult.objects.filter(pk=record.pk, status=TaskStatus.PROCESSING,
                                         worker_id=record.worker_id).update(lost_count=lost):
                fail_lost(record.pk, lost, settings.FAILURE_TTL)
                report.lost_failed += 1
            continue
        reset = TaskResult.objects.filter(
            pk=record.pk, status=TaskStatus.PROCESSING, worker_id=record.worker_id,
            attempts=record.attempts).update(
            status=TaskStatus.PENDING, lost_count=lost, worker_id="",
            attempts=max(record.attempts - 1, 0))
        if not reset:
            continue
        record.refresh_from_db()
        if _resend(driver, record, record.attempts + 1, status=TaskStatus.PENDING):
            report.lost_reset += 1
            logger.warning("Task %s (%s): its worker was lost; sent again (loss %d of %d).",
                           record.pk, record.task_name, lost, settings.WORKER_LOST_LIMIT)


def resend_vanished(driver: Any, now: datetime.datetime, report: ReconcileReport) -> None:
    settings = _settings()
    cutoff = now - datetime.timedelta(seconds=settings.RESEND_PENDING_AFTER)
    records = list(TaskResult.objects.filter(status=TaskStatus.PENDING, unsent=False,
                                             enqueued_at__lt=cutoff)
                   .filter(Q(eta__isnull=True) | Q(eta__lt=cutoff))
                   .order_by("enqueued_at")[:PASS_LIMIT])
    if not records:
        return
    missing = driver.missing_jobs([(str(r.id), r.attempts, r.queue) for r in records])
    missing -= _waiting_in_fallback(driver)
    for record in records:
        if str(record.id) in missing and _resend(driver, record, record.attempts + 1,
                                                  status=TaskStatus.PENDING):
            report.resent += 1
            logger.warning("Task %s (%s): its message was gone from the broker; sent again "
                           "from its record.", record.pk, record.task_name)


def _waiting_in_fallback(driver: Any) -> set[str]:
    """Ids on this host's Huey fallback: not lost, on their way to Redis."""
    from .fallback import fallback_job_ids

    return fallback_job_ids(driver)


def reconcile(driver: Any, now: datetime.datetime | None = None) -> ReconcileReport:
    """One pass of relay + lost workers + vanished messages."""
    now = now or timezone.now()
    report = ReconcileReport()
    if driver.runs_in_caller:
        return report
    report.relayed = relay_unsent(driver)
    recover_lost_tasks(driver, now, report)
    resend_vanished(driver, now, report)
    return report


class OutboxRelay:
    """The sending process's side of the outbox: after a send failed here, the next
    successful send of this process relays what waits (workers also relay)."""

    def __init__(self) -> None:
        self.pending = False
        self._lock = threading.Lock()

    def mark(self) -> None:
        self.pending = True

    def after_successful_send(self, driver: Any) -> None:
        if not self.pending or not self._lock.acquire(blocking=False):
            return
        try:
            self.pending = False
            relay_unsent(driver)
        except BackendUnavailable:
            self.pending = True
        finally:
            self._lock.release()
