"""Payroll batches that stalled or failed: re-enqueue their items, each exactly once.

Split from ``payroll.py``: ``retry_failed_items`` (the admin's and the API's
"retry failed") and ``reconcile_batches`` (every worker's periodic recovery)
both reserve items for new chunk jobs with a compare-and-swap per item, so two
processes never enqueue the same item twice.
"""

from __future__ import annotations

import datetime
import logging
import uuid
from typing import Callable, Hashable

from django.db import IntegrityError, transaction
from django.db.models import F, Q
from django.utils import timezone
from django.utils.translation import gettext as _

from .core.jobs import Job, new_job_id
from .models import BatchStatus, ItemStatus, PayrollBatch, PayrollItem, TaskResult
from .payroll import (CHUNK_TASK_NAME, LIVE_TASK_STATES, DuplicateBatch, PayrollError,
                      _chunk_size, _lease_end, _lease_expired, calculate_payroll_chunk_task,
                      finish_and_notify)

logger = logging.getLogger("coati_queue.payroll")


def _reserve_and_build(batch: PayrollBatch, candidates: list[tuple[int, Hashable]],
                       condition: Callable[[Hashable], Q], now: datetime.datetime,
                       ) -> list[Job]:
    """Reserve candidate items for new chunk jobs, each item for at most one job.

    ``candidates`` are ``(pk, key)``; ``condition(key)`` is the state the item was
    read in. Each chunk's job id is stamped on its items (``claimed_by``, status
    ``pending``, a fresh lease) by an UPDATE conditioned on that state: a
    compare-and-swap, so of two processes that read the same items only the first
    wins them and the other builds no job for them. The job then takes its items
    as pending (or as its own on redelivery). Returns the jobs to dispatch.
    """
    from .selection import get_queue_driver

    driver = get_queue_driver()
    size = _chunk_size()
    candidates = sorted(candidates, key=lambda c: c[0])
    jobs = []
    for start in range(0, len(candidates), size):
        job_id = uuid.UUID(new_job_id())
        by_key: dict[Hashable, list[int]] = {}
        for pk, key in candidates[start:start + size]:
            by_key.setdefault(key, []).append(pk)
        won = 0
        for key, pks in by_key.items():
            won += PayrollItem.objects.filter(condition(key), pk__in=pks, batch=batch).update(
                status=ItemStatus.PENDING, claimed_by=job_id, claim_expires_at=_lease_end(now))
        if won:
            ids = list(PayrollItem.objects.filter(batch=batch, claimed_by=job_id,
                                                  status=ItemStatus.PENDING)
                       .order_by("pk").values_list("pk", flat=True))
            jobs.append(driver.build_job(
                calculate_payroll_chunk_task, [], {"batch_id": batch.pk, "item_ids": ids},
                batch_id=batch.pk, task_id=str(job_id)))
    return jobs


def _dispatch(jobs: list[Job]) -> None:
    from .selection import get_queue_driver

    get_queue_driver().dispatch(jobs)


def retry_failed_items(batch: PayrollBatch) -> int:
    """Failed items back to pending and re-enqueued alone; the batch runs again."""
    now = timezone.now()
    with transaction.atomic():
        failed = [(pk, None) for pk in
                  batch.items.filter(status=ItemStatus.FAILED).values_list("pk", flat=True)]
        if not failed:
            return 0
        jobs = _reserve_and_build(batch, failed, lambda _: Q(status=ItemStatus.FAILED), now)
        moved = sum(len(job.kwargs["item_ids"]) for job in jobs)
        try:
            with transaction.atomic():
                # A cancelled batch's cancelled items never run, so it could never finish:
                # it would stay running for ever and block the period (the UPDATE is the check).
                resumed = PayrollBatch.objects.filter(pk=batch.pk).exclude(
                    status=BatchStatus.CANCELLED).update(
                    failed=F("failed") - moved, status=BatchStatus.RUNNING, finished_at=None)
        except IntegrityError:
            other = PayrollBatch.objects.active().exclude(pk=batch.pk).filter(
                planilla_id=batch.planilla_id, periodo_inicio=batch.periodo_inicio,
                periodo_fin=batch.periodo_fin).first()
            raise DuplicateBatch(other or batch) from None
        if not resumed:
            raise PayrollError(_("Batch #%(id)s was cancelled; its failed items cannot be "
                                 "retried. Start a new batch for the period instead.")
                               % {"id": batch.pk})
        _dispatch(jobs)
    batch.refresh_from_db()
    return moved


def _items_of_live_chunks(batch: PayrollBatch) -> set[int]:
    """Items listed by a chunk task record that may still run (pending or processing)."""
    live: set[int] = set()
    for kwargs in TaskResult.objects.filter(
            batch=batch, task_name=CHUNK_TASK_NAME,
            status__in=LIVE_TASK_STATES).values_list("kwargs", flat=True):
        ids = kwargs.get("item_ids") if isinstance(kwargs, dict) else None
        if isinstance(ids, list):
            live.update(i for i in ids if isinstance(i, int))
    return live


def _expired_without_live_claimer(batch: PayrollBatch,
                                  now: datetime.datetime) -> list[tuple[int, Hashable]]:
    """Items under an expired lease whose claiming task will not run again.

    A claimer whose record is still pending or processing is left alone: the
    delivery reconciler re-sends that very job (its worker was lost) and it takes
    its own items back, so re-enqueueing them too would only duplicate the work.
    """
    rows = list(batch.items.filter(_lease_expired(now)).values_list("pk", "claimed_by"))
    if not rows:
        return []
    claimers = {claimed_by for _, claimed_by in rows if claimed_by is not None}
    alive = set(TaskResult.objects.filter(pk__in=claimers, status__in=LIVE_TASK_STATES)
                .values_list("pk", flat=True)) if claimers else set()
    return [(pk, ("lease", claimed_by)) for pk, claimed_by in rows if claimed_by not in alive]


def reconcile_batches(now: datetime.datetime | None = None) -> dict[str, int]:
    """Recover running batches that delivery failures left stalled; safe to run anywhere.

    For each running batch:

    * items ``processing`` under an expired lease whose claiming task will not run
      again (its record ended, e.g. failed after its worker was lost too often, or
      there is no record) and items ``pending`` that no pending or processing chunk
      record lists any more are re-enqueued as new chunks;
    * a batch whose counters reached its total but is still running (the last
      chunk died between counting and finishing) is finished, callbacks fired once.

    Several workers run this at once. The reads are plain; the re-enqueue is a
    compare-and-swap per item (see ``_reserve_and_build``): the item must still be
    in the state read (same status and ``claimed_by``; for a lease, still
    expired) and is then stamped with the new chunk's job id in the transaction
    that creates that chunk's task record. A reconciler that read stale rows wins
    nothing and enqueues nothing; the winner's record lists the items, so later
    passes see them as live. The job id as the stamp (rather than a batch-level
    timestamp) guards each item on its own, needs no extra column, and lets the
    new chunk take its items back as its own if it is delivered twice.
    """
    now = now or timezone.now()
    report = {"batches": 0, "expired": 0, "orphaned": 0, "chunks": 0, "finished": 0}
    for batch in PayrollBatch.objects.running():
        report["batches"] += 1
        expired = _expired_without_live_claimer(batch, now)
        pending = list(batch.items.filter(status=ItemStatus.PENDING)
                       .values_list("pk", "claimed_by"))
        orphaned: list[tuple[int, Hashable]] = []
        if pending:
            live = _items_of_live_chunks(batch)
            orphaned = [(pk, ("pending", claimed_by)) for pk, claimed_by in pending
                        if pk not in live]
        if expired or orphaned:
            def was(key: Hashable) -> Q:
                state, claimed_by = key
                same = (Q(claimed_by__isnull=True) if claimed_by is None
                        else Q(claimed_by=claimed_by))
                return same & (_lease_expired(now) if state == "lease"
                               else Q(status=ItemStatus.PENDING))

            with transaction.atomic():
                jobs = _reserve_and_build(batch, expired + orphaned, was, now)
                _dispatch(jobs)
            taken = {pk for job in jobs for pk in job.kwargs["item_ids"]}
            report["expired"] += sum(1 for pk, _ in expired if pk in taken)
            report["orphaned"] += sum(1 for pk, _ in orphaned if pk in taken)
            report["chunks"] += len(jobs)
            if jobs:
                logger.warning("Payroll batch #%s: re-enqueued %d stalled item(s) in %d "
                               "chunk(s)", batch.pk, len(taken), len(jobs))
        # The counters as read above: a batch finished by its last chunk since then is
        # left alone by finish_if_done's condition; a stale "not done" waits a pass.
        if batch.total <= batch.succeeded + batch.failed and finish_and_notify(batch):
            report["finished"] += 1
    return report
