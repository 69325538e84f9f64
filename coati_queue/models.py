"""ORM records: every task, every payroll batch and its items, and worker heartbeats.

Records are the single source of truth for status on every backend, so the
same answer comes back from any process. Hot-path writes are done in bulk by
``coati_queue.tracking``; the methods here are the transitions used by the
API, admin actions and payroll orchestration.
"""

from __future__ import annotations

import uuid
from datetime import timedelta
from typing import Any

from django.conf import settings
from django.db import models
from django.db.models import F, Q
from django.utils import timezone
from django.utils.translation import gettext_lazy as _


class TaskStatus(models.TextChoices):
    PENDING = "pending", _("Pending")
    PROCESSING = "processing", _("Processing")
    COMPLETED = "completed", _("Completed")
    FAILED = "failed", _("Failed")
    CANCELLED = "cancelled", _("Cancelled")


FINISHED_TASK_STATES = (TaskStatus.COMPLETED, TaskStatus.FAILED, TaskStatus.CANCELLED)


class TaskResultQuerySet(models.QuerySet):
    def failed(self):
        return self.filter(status=TaskStatus.FAILED)

    def finished(self):
        return self.filter(status__in=FINISHED_TASK_STATES)

    def expired(self, now=None):
        return self.filter(expires_at__lte=now or timezone.now())


class TaskResult(models.Model):
    """One task as the queue saw it; one row per task id (retries update it)."""

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    task_name = models.CharField(_("task"), max_length=200, db_index=True)
    queue = models.CharField(_("queue"), max_length=64, default="default")
    backend = models.CharField(_("backend"), max_length=16)
    status = models.CharField(_("status"), max_length=16, choices=TaskStatus.choices,
                              default=TaskStatus.PENDING)
    args = models.JSONField(_("arguments"), default=list, blank=True)
    kwargs = models.JSONField(_("keyword arguments"), default=dict, blank=True)
    result = models.JSONField(_("result"), null=True, blank=True)
    error = models.TextField(_("error"), blank=True, default="")
    traceback = models.TextField(_("traceback"), blank=True, default="")
    # The failure's class as ``module.QualName``, stored (not parsed back from the
    # traceback, whose last line may be a message line or an add_note() note).
    exception_class = models.CharField(_("exception class"), max_length=255, blank=True,
                                       default="")
    attempts = models.PositiveIntegerField(_("attempts"), default=0)
    max_retries = models.PositiveIntegerField(_("max retries"), default=0)
    enqueued_at = models.DateTimeField(_("enqueued at"), default=timezone.now, db_index=True)
    eta = models.DateTimeField(_("scheduled for"), null=True, blank=True)
    started_at = models.DateTimeField(_("started at"), null=True, blank=True)
    finished_at = models.DateTimeField(_("finished at"), null=True, blank=True, db_index=True)
    # Stored, not derived: the metrics histogram compares it in SQL over every record.
    duration_seconds = models.FloatField(_("run time (s)"), null=True, blank=True)
    expires_at = models.DateTimeField(_("expires at"), null=True, blank=True, db_index=True)
    worker_id = models.CharField(_("worker"), max_length=128, blank=True, default="")
    batch = models.ForeignKey("PayrollBatch", null=True, blank=True, on_delete=models.SET_NULL,
                              related_name="tasks", verbose_name=_("batch"))
    retry_of = models.ForeignKey("self", null=True, blank=True, on_delete=models.SET_NULL,
                                 related_name="retries", verbose_name=_("retry of"))
    # Delivery bookkeeping (README "Delivery guarantees"): the record is the outbox row
    # and the source the reconciler re-sends from.
    unsent = models.BooleanField(
        _("waiting to be sent"), default=False, db_index=True,
        help_text=_("The broker refused the send after commit; the relay sends it again."))
    lost_count = models.PositiveIntegerField(
        _("worker lost"), default=0,
        help_text=_("How many times the worker running this task died before it finished."))
    resends = models.PositiveIntegerField(
        _("re-sent"), default=0,
        help_text=_("How many times the relay or the reconciler sent it again from this record."))

    objects = TaskResultQuerySet.as_manager()

    class Meta:
        verbose_name = _("task record")
        verbose_name_plural = _("task records")
        ordering = ["-enqueued_at"]
        indexes = [
            models.Index(fields=["status", "task_name"], name="coati_task_status_name"),
            models.Index(fields=["queue", "status"], name="coati_task_queue_status"),
        ]

    def __str__(self) -> str:
        return f"{self.task_name} {self.id} ({self.status})"

    @property
    def duration(self) -> timedelta | None:
        if self.started_at and self.finished_at:
            return self.finished_at - self.started_at
        return None

    @property
    def is_finished(self) -> bool:
        return self.status in FINISHED_TASK_STATES

    def as_result_dict(self) -> dict[str, Any]:
        """The public ``get_task_result`` shape."""
        return {
            "id": str(self.id),
            "task_id": str(self.id),
            "task_name": self.task_name,
            "status": self.status,
            "result": self.result,
            "error": self.error or None,
            "traceback": self.traceback or None,
            "attempts": self.attempts,
            "queue": self.queue,
            "backend": self.backend,
            "enqueued_at": self.enqueued_at.isoformat() if self.enqueued_at else None,
            "started_at": self.started_at.isoformat() if self.started_at else None,
            "finished_at": self.finished_at.isoformat() if self.finished_at else None,
            "worker_id": self.worker_id or None,
            "batch_id": self.batch_id,
        }


class TaskTally(models.Model):
    """What deleted task records had counted, so metrics counters never go down.

    Written only by ``tallies.delete_task_records``; one row per (task, key),
    where key is a counter ("succeeded", "duration_sum", "le_0.5", ...).
    """

    task_name = models.CharField(_("task"), max_length=200)
    key = models.CharField(_("counter"), max_length=32)
    value = models.FloatField(_("value"), default=0.0)

    class Meta:
        verbose_name = _("task tally")
        verbose_name_plural = _("task tallies")
        constraints = [models.UniqueConstraint(fields=["task_name", "key"],
                                               name="coati_one_tally_per_task_key")]

    def __str__(self) -> str:
        return f"{self.task_name} {self.key}={self.value:g}"


class BatchStatus(models.TextChoices):
    PENDING = "pending", _("Pending")
    RUNNING = "running", _("Running")
    COMPLETED = "completed", _("Completed")
    COMPLETED_WITH_ERRORS = "completed_with_errors", _("Completed with errors")
    FAILED = "failed", _("Failed")
    CANCELLED = "cancelled", _("Cancelled")


ACTIVE_BATCH_STATES = (BatchStatus.PENDING, BatchStatus.RUNNING)


class PayrollBatchQuerySet(models.QuerySet):
    def active(self):
        return self.filter(status__in=ACTIVE_BATCH_STATES)

    def running(self):
        return self.filter(status=BatchStatus.RUNNING)


class PayrollBatch(models.Model):
    """One payroll run of a planilla for a period, fanned out per employee."""

    planilla_id = models.CharField(_("planilla"), max_length=64, db_index=True)
    periodo_inicio = models.DateField(_("period start"))
    periodo_fin = models.DateField(_("period end"))
    requested_by = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True,
                                     on_delete=models.SET_NULL, related_name="+",
                                     verbose_name=_("requested by"))
    requested_by_name = models.CharField(_("requested by (name)"), max_length=150, blank=True,
                                         default="")
    status = models.CharField(_("status"), max_length=24, choices=BatchStatus.choices,
                              default=BatchStatus.PENDING, db_index=True)
    total = models.PositiveIntegerField(_("total"), default=0)
    succeeded = models.PositiveIntegerField(_("succeeded"), default=0)
    failed = models.PositiveIntegerField(_("failed"), default=0)
    error = models.TextField(_("error"), blank=True, default="")
    on_complete = models.CharField(_("on complete"), max_length=200, blank=True, default="")
    on_success = models.CharField(_("on success"), max_length=200, blank=True, default="")
    on_failure = models.CharField(_("on failure"), max_length=200, blank=True, default="")
    complete_fired_at = models.DateTimeField(_("on complete fired at"), null=True, blank=True)
    success_fired_at = models.DateTimeField(_("on success fired at"), null=True, blank=True)
    failure_fired_at = models.DateTimeField(_("on failure fired at"), null=True, blank=True)
    created_at = models.DateTimeField(_("created at"), default=timezone.now, db_index=True)
    started_at = models.DateTimeField(_("started at"), null=True, blank=True)
    finished_at = models.DateTimeField(_("finished at"), null=True, blank=True)

    objects = PayrollBatchQuerySet.as_manager()

    class Meta:
        verbose_name = _("payroll batch")
        verbose_name_plural = _("payroll batches")
        ordering = ["-created_at"]
        constraints = [
            models.UniqueConstraint(
                fields=["planilla_id", "periodo_inicio", "periodo_fin"],
                condition=Q(status__in=["pending", "running"]),
                name="coati_one_active_batch_per_period",
            ),
        ]

    def __str__(self) -> str:
        # No status here: page titles would go stale while the live panel moves on.
        return f"#{self.pk} {self.planilla_id} {self.periodo_inicio}..{self.periodo_fin}"

    @property
    def is_finished(self) -> bool:
        return self.status not in ACTIVE_BATCH_STATES

    @property
    def processed(self) -> int:
        return self.succeeded + self.failed

    def progress(self) -> dict[str, Any]:
        """Counters only: constant cost whatever the size of the batch."""
        processed = self.succeeded + self.failed
        pct = round(100.0 * processed / self.total, 1) if self.total else (
            100.0 if self.is_finished else 0.0)
        rate = eta = None
        if self.started_at and processed:
            end = self.finished_at or timezone.now()
            elapsed = max((end - self.started_at).total_seconds(), 1e-3)
            rate = round(processed / elapsed, 1)
            remaining = max(self.total - processed, 0)
            eta = 0.0 if self.is_finished else round(remaining / rate, 1) if rate else None
        return {
            "id": self.pk,
            "status": self.status,
            "total": self.total,
            "completed": self.succeeded,
            "failed": self.failed,
            "pending": max(self.total - processed, 0),
            "progress_percentage": pct,
            "rate_per_second": rate,
            "eta_seconds": eta,
            "started_at": self.started_at.isoformat() if self.started_at else None,
            "finished_at": self.finished_at.isoformat() if self.finished_at else None,
            "error": self.error or None,
        }

    # -- transitions -------------------------------------------------------
    def _transition(self, from_states, to_state, **extra) -> bool:
        """Conditional UPDATE: only one process wins a transition."""
        changed = PayrollBatch.objects.filter(pk=self.pk, status__in=from_states).update(
            status=to_state, **extra)
        if changed:
            self.refresh_from_db()
        return bool(changed)

    def mark_running(self, total: int) -> bool:
        return self._transition([BatchStatus.PENDING], BatchStatus.RUNNING, total=total,
                                started_at=timezone.now())

    def mark_failed(self, error: str) -> bool:
        return self._transition(ACTIVE_BATCH_STATES, BatchStatus.FAILED, error=error,
                                finished_at=timezone.now())

    def record_outcomes(self, succeeded: int = 0, failed: int = 0) -> None:
        """Atomic counter update (no read-modify-write)."""
        if succeeded or failed:
            PayrollBatch.objects.filter(pk=self.pk).update(
                succeeded=F("succeeded") + succeeded, failed=F("failed") + failed)

    def finish_if_done(self) -> bool:
        """Move a running batch whose items are all processed to its end state, once."""
        now = timezone.now()
        done = Q(pk=self.pk, status=BatchStatus.RUNNING, total__lte=F("succeeded") + F("failed"))
        clean = PayrollBatch.objects.filter(done, failed=0).update(
            status=BatchStatus.COMPLETED, finished_at=now)
        dirty = 0 if clean else PayrollBatch.objects.filter(done, failed__gt=0).update(
            status=BatchStatus.COMPLETED_WITH_ERRORS, finished_at=now)
        if clean or dirty:
            self.refresh_from_db()
        return bool(clean or dirty)

    def claim_callback(self, kind: str) -> bool:
        """True exactly once per batch and kind (complete, success, failure)."""
        column = f"{kind}_fired_at"
        claimed = PayrollBatch.objects.filter(pk=self.pk, **{f"{column}__isnull": True}).update(
            **{column: timezone.now()})
        return bool(claimed)

    def retry_failed(self) -> int:
        """Re-enqueue only the failed items (their attempt history is kept)."""
        from .payroll_recovery import retry_failed_items

        return retry_failed_items(self)

    def cancel(self) -> bool:
        """Pending items never run; running ones finish; status ``cancelled``."""
        from .payroll import cancel_batch

        return cancel_batch(self)


class ItemStatus(models.TextChoices):
    PENDING = "pending", _("Pending")
    PROCESSING = "processing", _("Processing")
    SUCCEEDED = "succeeded", _("Succeeded")
    FAILED = "failed", _("Failed")
    CANCELLED = "cancelled", _("Cancelled")


class PayrollItem(models.Model):
    """One employee of a batch: exactly one per (batch, employee)."""

    batch = models.ForeignKey(PayrollBatch, on_delete=models.CASCADE, related_name="items",
                              verbose_name=_("batch"))
    employee_id = models.CharField(_("employee"), max_length=64)
    status = models.CharField(_("status"), max_length=16, choices=ItemStatus.choices,
                              default=ItemStatus.PENDING)
    attempts = models.PositiveIntegerField(_("attempts"), default=0)
    error = models.TextField(_("error"), blank=True, default="")
    traceback = models.TextField(_("traceback"), blank=True, default="")
    result = models.JSONField(_("result"), null=True, blank=True)
    claimed_by = models.UUIDField(_("claimed by task"), null=True, blank=True)
    # A claim is a lease: once it expires (its worker died), another chunk may take the item.
    claim_expires_at = models.DateTimeField(_("claim expires at"), null=True, blank=True)
    task = models.ForeignKey(TaskResult, null=True, blank=True, on_delete=models.SET_NULL,
                             related_name="+", verbose_name=_("last task"))
    tasks = models.ManyToManyField(TaskResult, blank=True, related_name="payroll_items",
                                   verbose_name=_("task records (all attempts)"))
    started_at = models.DateTimeField(_("started at"), null=True, blank=True)
    finished_at = models.DateTimeField(_("finished at"), null=True, blank=True)

    class Meta:
        verbose_name = _("payroll item")
        verbose_name_plural = _("payroll items")
        ordering = ["batch", "id"]
        constraints = [
            models.UniqueConstraint(fields=["batch", "employee_id"],
                                    name="coati_one_item_per_employee"),
        ]
        indexes = [models.Index(fields=["batch", "status"], name="coati_item_batch_status")]

    def __str__(self) -> str:
        return f"{self.employee_id} in batch {self.batch_id} ({self.status})"


class DeadLetter(models.Model):
    """A message no worker could run: undecodable, invalid, unknown task, too large.

    Kept with its raw payload (truncated to ``DEAD_LETTER_PAYLOAD_LIMIT``) so it can
    be read, requeued once fixed, or deleted; nothing about it is ever executed as is.
    """

    seen_at = models.DateTimeField(_("seen at"), default=timezone.now, db_index=True)
    backend = models.CharField(_("backend"), max_length=16)
    source = models.CharField(_("source"), max_length=32, default="worker",
                              help_text=_("Where it was found: a worker, Dramatiq's dead-letter "
                                          "set, a Huey file, the tracking writer."))
    queue = models.CharField(_("queue"), max_length=64, blank=True, default="")
    task_name = models.CharField(_("task"), max_length=200, blank=True, default="")
    task_id = models.CharField(_("task id"), max_length=64, blank=True, default="",
                               db_index=True)
    reason = models.TextField(_("reason"))
    payload = models.TextField(_("payload"), blank=True, default="")
    payload_size = models.PositiveIntegerField(_("payload size (bytes)"), default=0)
    truncated = models.BooleanField(_("payload truncated"), default=False)
    seen_by = models.CharField(_("seen by"), max_length=128, blank=True, default="")
    requeued_at = models.DateTimeField(_("requeued at"), null=True, blank=True)
    requeued_as = models.CharField(_("requeued as task"), max_length=64, blank=True, default="")

    class Meta:
        verbose_name = _("dead letter")
        verbose_name_plural = _("dead letters")
        ordering = ["-seen_at"]

    def __str__(self) -> str:
        return f"{self.task_name or '<undecodable>'} ({self.reason[:60]})"


class WorkerHeartbeat(models.Model):
    """A worker process seen alive; ``last_seen`` older than WORKER_LOST_AFTER = lost."""

    worker_id = models.CharField(_("worker"), max_length=128, primary_key=True)
    hostname = models.CharField(_("host"), max_length=255)
    pid = models.PositiveIntegerField(_("pid"))
    backend = models.CharField(_("backend"), max_length=16)
    queues = models.JSONField(_("queues"), default=list)
    threads = models.PositiveIntegerField(_("threads"), default=1)
    started_at = models.DateTimeField(_("started at"), default=timezone.now)
    last_seen = models.DateTimeField(_("last heartbeat"), default=timezone.now, db_index=True)
    processed = models.PositiveIntegerField(_("processed"), default=0)
    failed = models.PositiveIntegerField(_("failed"), default=0)
    stopped_at = models.DateTimeField(_("stopped at"), null=True, blank=True)
    # What it runs now, as of its last heartbeat: the longest-running task (so a stuck
    # one shows before its time limit hits) and how many tasks run in all.
    current_task_id = models.UUIDField(_("current task id"), null=True, blank=True)
    current_task_name = models.CharField(_("current task"), max_length=200, blank=True,
                                         default="")
    current_task_started_at = models.DateTimeField(_("current task started at"), null=True,
                                                   blank=True)
    running_tasks = models.PositiveIntegerField(_("tasks running"), default=0)

    class Meta:
        verbose_name = _("worker")
        verbose_name_plural = _("workers")
        ordering = ["-last_seen"]

    def __str__(self) -> str:
        return self.worker_id

    def is_alive(self, lost_after: float, now=None) -> bool:
        now = now or timezone.now()
        return self.stopped_at is None and (now - self.last_seen).total_seconds() <= lost_after

    def current_task_seconds(self, now=None) -> float | None:
        """How long the current task has been running, or None when idle."""
        if self.current_task_started_at is None:
            return None
        return max(((now or timezone.now()) - self.current_task_started_at).total_seconds(), 0.0)
