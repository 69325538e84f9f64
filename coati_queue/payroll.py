"""Payroll batches: fan out per employee, exactly one effect each, resumable.

The host project supplies the payroll domain through ``COATI_QUEUE["PAYROLL"]``:

* ``ACTIVE_EMPLOYEES``: ``(planilla_id, inicio, fin) -> list[str]`` (raise
  ``LookupError`` for an unknown planilla);
* ``CALCULATE_EMPLOYEE``: ``(employee_id, planilla_id, inicio, fin, batch_id,
  usuario) -> dict`` with at least ``salario_neto``; it stores the line
  idempotently (unique per batch and employee) and raises ``LookupError``
  for an unknown or inactive employee;
* optional ``CALCULATE_MANY``: the same for a list of employees at once,
  returning ``(results_by_id, errors_by_id)``; used for chunks when present;
  an error is an exception (its traceback is kept on the item) or a message;
* optional ``CHUNK_SIZE`` (default 100).

Each employee has a ``PayrollItem``; workers receive them in chunks (one
task per ``CHUNK_SIZE`` items) so 10,000 employees are ~100 messages and a
few bulk writes each, while status, attempts, errors and retries stay per
employee.

Delivery is at least once (a chunk may run twice, or again after the worker
that first ran it died), so every effect goes through a claim:

* a claim is a lease: ``claimed_by`` (the chunk's job id) and
  ``claim_expires_at`` (now + ``BATCH_CLAIM_TTL``). A chunk takes items that are
  pending, its own (a redelivery of the same job), or whose lease expired
  (their worker died);
* an outcome is written, and counted, only while the item is still claimed by
  the writer, in one transaction with the counter update, so two runs of a
  chunk, or two chunks racing over an expired lease, count each employee once;
  the host's line is unique per (batch, employee) as well;
* ``payroll_recovery.reconcile_batches`` (called from every worker's reconciler)
  re-enqueues what no chunk will run any more and finishes batches whose last
  chunk died between counting and finishing.

Callbacks are names of registered tasks, checked when the batch is created and
again when they fire; nothing from a message or a batch row is ever imported.
"""

from __future__ import annotations

import datetime
import inspect
import logging
import time
import traceback
import uuid
from typing import Any, Callable, Iterable

from django.db import DatabaseError, IntegrityError, transaction
from django.db.models import F, Q
from django.utils import timezone
from django.utils.module_loading import import_string
from django.utils.translation import gettext as _

from .conf import get_settings
from .core.exceptions import CoatiQueueError
from .core.middleware import get_current_job
from .core.tasks import Task, registry
from .models import (BatchStatus, ItemStatus, PayrollBatch, PayrollItem, TaskResult,
                     TaskStatus)

logger = logging.getLogger("coati_queue.payroll")

DEFAULT_CHUNK_SIZE = 100
CALLBACK_KINDS = ("complete", "success", "failure")
#: A task record in one of these states may still run (and claim items).
LIVE_TASK_STATES = (TaskStatus.PENDING, TaskStatus.PROCESSING)


class PayrollError(CoatiQueueError):
    """A payroll batch cannot be started or changed; the message says why."""


class InvalidPeriod(PayrollError, ValueError):
    pass


class DuplicateBatch(PayrollError):
    def __init__(self, batch: PayrollBatch):
        super().__init__(
            _("A payroll batch for planilla %(planilla)s, period %(start)s to %(end)s, is "
              "already %(status)s: batch #%(id)s. Wait for it to end or cancel it first.")
            % {"planilla": batch.planilla_id, "start": batch.periodo_inicio,
               "end": batch.periodo_fin, "status": BatchStatus(batch.status).label.lower(),
               "id": batch.pk})
        self.batch = batch


class PayrollNotConfigured(PayrollError):
    pass


# -- configuration --------------------------------------------------------
def _hook(name: str, required: bool = True) -> Callable[..., Any] | None:
    """The host's function named in settings (trusted: never a path from a message or row)."""
    path = get_settings().PAYROLL.get(name)
    if not path:
        if required:
            raise PayrollNotConfigured(
                f"Set COATI_QUEUE['PAYROLL']['{name}'] to the dotted path of your project's "
                "function (see README, Payroll batches).")
        return None
    return import_string(path)


def _chunk_size() -> int:
    return max(1, int(get_settings().PAYROLL.get("CHUNK_SIZE", DEFAULT_CHUNK_SIZE)))


def parse_period(inicio: Any, fin: Any) -> tuple[datetime.date, datetime.date]:
    """ISO dates (or dates), start <= end; ``InvalidPeriod`` names the bad value."""
    def parse(value: Any, label: str) -> datetime.date:
        if isinstance(value, datetime.datetime):
            return value.date()
        if isinstance(value, datetime.date):
            return value
        try:
            return datetime.date.fromisoformat(str(value))
        except ValueError:
            raise InvalidPeriod(f"{label} must be an ISO date (YYYY-MM-DD), got {value!r}") from None

    start, end = parse(inicio, "periodo_inicio"), parse(fin, "periodo_fin")
    if start > end:
        raise InvalidPeriod(_("periodo_inicio %(start)s is after periodo_fin %(end)s")
                            % {"start": start, "end": end})
    return start, end


def _check_callback(kind: str, target: Any) -> None:
    """Only registered task names: a dotted path would let a batch row import anything."""
    if target in ("", None):
        return
    if not isinstance(target, str) or target not in registry:
        raise PayrollError(
            f"The on_{kind} callback {target!r} is not a registered task. Pass the name of a "
            "task registered with @coati_queue.task (it receives batch_id=...).")


# -- starting -------------------------------------------------------------
def create_batch(planilla_id: str, periodo_inicio: Any, periodo_fin: Any, *, usuario: str = "",
                 requested_by: Any = None, on_complete: str = "", on_success: str = "",
                 on_failure: str = "") -> PayrollBatch:
    """Create the batch record, refusing a second active one for the same period."""
    start, end = parse_period(periodo_inicio, periodo_fin)
    for kind, target in zip(CALLBACK_KINDS, (on_complete, on_success, on_failure)):
        _check_callback(kind, target)
    if requested_by is None and usuario:
        from django.contrib.auth import get_user_model

        requested_by = get_user_model()._default_manager.filter(
            **{get_user_model().USERNAME_FIELD: usuario}).first()
    try:
        with transaction.atomic():
            return PayrollBatch.objects.create(
                planilla_id=str(planilla_id), periodo_inicio=start, periodo_fin=end,
                requested_by=requested_by, requested_by_name=usuario or (
                    requested_by.get_username() if requested_by else ""),
                on_complete=on_complete or "", on_success=on_success or "",
                on_failure=on_failure or "")
    except IntegrityError:
        active = PayrollBatch.objects.active().filter(
            planilla_id=str(planilla_id), periodo_inicio=start, periodo_fin=end).first()
        if active is None:
            raise
        raise DuplicateBatch(active) from None


def start_payroll_batch(planilla_id: str, periodo_inicio: Any, periodo_fin: Any, *,
                        usuario: str = "", requested_by: Any = None, on_complete: str = "",
                        on_success: str = "", on_failure: str = "") -> PayrollBatch:
    """Create the batch now (errors raise here) and enqueue its fan-out."""
    from .redis_url import broker_errors, masked_broker_error

    batch = create_batch(planilla_id, periodo_inicio, periodo_fin, usuario=usuario,
                         requested_by=requested_by, on_complete=on_complete,
                         on_success=on_success, on_failure=on_failure)
    try:
        process_payroll_parallel_task.send_with_options(
            kwargs={"planilla_id": batch.planilla_id,
                    "periodo_inicio": str(batch.periodo_inicio),
                    "periodo_fin": str(batch.periodo_fin), "usuario": batch.requested_by_name,
                    "batch_id": batch.pk},
            batch_id=batch.pk)
    except broker_errors() as exc:
        # The batch row is committed (the fan-out must see it); left pending it would
        # block the period for ever. It never started, so no callback fires.
        reason = masked_broker_error(exc)
        batch.mark_failed(f"Could not be queued: {reason}")
        raise PayrollError(
            _("Payroll batch #%(id)s could not be queued (%(reason)s). It was marked failed, "
              "so the period can be started again once the queue is back.")
            % {"id": batch.pk, "reason": reason}) from exc
    batch.refresh_from_db()  # the immediate backend has already run the fan-out
    return batch


def process_payroll_parallel(planilla_id: str, periodo_inicio: str, periodo_fin: str,
                             usuario: str = "", batch_id: int | None = None) -> dict[str, Any]:
    """Task body: list the active employees, create one item each, enqueue chunks.

    It takes no callbacks: they come only from the batch row, which
    ``start_payroll_batch`` validated, so a planted message naming one fails
    with a TypeError before anything runs.
    """
    if batch_id is not None:
        return _fan_out(PayrollBatch.objects.get(pk=batch_id))
    # Origin-design call: the batch is created here, in one transaction with its fan-out
    # and with the link from this task's record to it. A worker dying half-way leaves
    # nothing; a delivery after our commit finds the link and creates no second batch.
    job_id = _current_job_uuid()
    with transaction.atomic():
        linked = (TaskResult.objects.filter(pk=job_id, batch__isnull=False)
                  .values_list("batch_id", flat=True).first() if job_id else None)
        if linked is not None:
            batch = PayrollBatch.objects.get(pk=linked)
        else:
            batch = create_batch(planilla_id, periodo_inicio, periodo_fin, usuario=usuario)
            if job_id is not None:
                TaskResult.objects.filter(pk=job_id).update(batch=batch)
        return _fan_out(batch)


def _fan_out(batch: PayrollBatch) -> dict[str, Any]:
    if batch.status != BatchStatus.PENDING:
        return {"batch_id": batch.pk, "status": batch.status, "total": batch.total}
    try:
        employee_ids = list(dict.fromkeys(str(e) for e in _hook("ACTIVE_EMPLOYEES")(
            batch.planilla_id, batch.periodo_inicio, batch.periodo_fin)))
    except LookupError as exc:
        message = str(exc).strip("'\"") or f"Planilla not found: {batch.planilla_id}"
        if not message.lower().startswith("planilla not found"):
            message = f"Planilla not found: {message}"
        with transaction.atomic():
            if batch.mark_failed(message):
                fire_callbacks(batch)
        return {"batch_id": batch.pk, "status": BatchStatus.FAILED, "error": message}
    with transaction.atomic():
        PayrollItem.objects.bulk_create(
            [PayrollItem(batch=batch, employee_id=e) for e in employee_ids], batch_size=1000,
            ignore_conflicts=True)
        if not batch.mark_running(len(employee_ids)):
            return {"batch_id": batch.pk, "status": batch.status, "total": batch.total}
        item_ids = list(batch.items.order_by("pk").values_list("pk", flat=True))
        enqueue_chunks(batch, item_ids)
    if not employee_ids:
        finish_and_notify(batch)
    return {"batch_id": batch.pk, "status": BatchStatus.RUNNING, "total": len(employee_ids)}


def enqueue_chunks(batch: PayrollBatch, item_ids: list[int]) -> list[str]:
    """One chunk task per CHUNK_SIZE items, in one bulk enqueue (sent on commit)."""
    size = _chunk_size()
    calls = [((), {"batch_id": batch.pk, "item_ids": item_ids[i:i + size]})
             for i in range(0, len(item_ids), size)]
    return calculate_payroll_chunk_task.send_many(calls, batch_id=batch.pk)


def _current_job_uuid() -> uuid.UUID | None:
    """The running job's id as a UUID (None outside a task or for a malformed id)."""
    job = get_current_job()
    if job is None:
        return None
    try:
        return uuid.UUID(str(job.id))
    except ValueError:
        return None


def _lease_end(now: datetime.datetime) -> datetime.datetime:
    return now + datetime.timedelta(seconds=get_settings().BATCH_CLAIM_TTL)


# -- one chunk of employees -----------------------------------------------
def calculate_payroll_chunk(batch_id: int, item_ids: list[int]) -> dict[str, int]:
    """Task body: claim the items, compute them, record outcomes once."""
    job_id = _current_job_uuid()
    claim = job_id or uuid.uuid4()
    batch = PayrollBatch.objects.get(pk=batch_id)
    items = claim_items(batch, item_ids, claim, record=job_id is not None)
    if items:
        pks = [pk for pk, _ in items]
        results, errors = compute(batch, [employee for _, employee in items],
                                  renew=lambda: renew_claims(pks, claim))
        succeeded, failed = record_item_outcomes(batch, items, claim, results, errors)
    else:
        succeeded = failed = 0
    # Also when nothing was ours: the run that counted the last items may have died
    # before finishing the batch (a redelivery then finishes it).
    finish_and_notify(batch)
    return {"batch_id": batch_id, "succeeded": succeeded, "failed": failed,
            "skipped": len(item_ids) - len(items)}


def _lease_expired(now: datetime.datetime) -> Q:
    # No expiry at all: claimed before leases existed; treated as expired (a lost claim
    # would otherwise hold its items for ever, and writes stay claim-checked anyway).
    return Q(status=ItemStatus.PROCESSING) & (Q(claim_expires_at__lt=now)
                                              | Q(claim_expires_at__isnull=True))


def claim_items(batch: PayrollBatch, item_ids: Iterable[int], claim: uuid.UUID, *,
                record: bool | None = None) -> list[tuple[int, str]]:
    """Lease the items this chunk may run; returns (pk, employee) of those now ours.

    Claimable: pending (whoever reserved it), ours already (this job delivered
    again), or processing under an expired lease (its worker died). The UPDATE
    is the check, so two chunks racing over the same items never both win one.
    ``record``: link the items to the task record ``claim`` (default: inside a task).
    """
    if record is None:
        record = _current_job_uuid() is not None
    now = timezone.now()
    claimable = (Q(status=ItemStatus.PENDING)
                 | Q(status=ItemStatus.PROCESSING, claimed_by=claim) | _lease_expired(now))
    item_ids = list(item_ids)
    with transaction.atomic():
        if PayrollBatch.objects.filter(pk=batch.pk, status=BatchStatus.CANCELLED).exists():
            return []
        PayrollItem.objects.filter(claimable, pk__in=item_ids, batch=batch).update(
            status=ItemStatus.PROCESSING, claimed_by=claim, claim_expires_at=_lease_end(now),
            started_at=now, attempts=F("attempts") + 1, **({"task_id": claim} if record else {}))
        items = list(PayrollItem.objects.filter(
            pk__in=item_ids, status=ItemStatus.PROCESSING, claimed_by=claim
        ).values_list("pk", "employee_id"))
        if record and items:
            through = PayrollItem.tasks.through
            through.objects.bulk_create([through(payrollitem_id=pk, taskresult_id=claim)
                                         for pk, _ in items], ignore_conflicts=True)
    return items


def renew_claims(item_pks: list[int], claim: uuid.UUID) -> int:
    """Extend our lease on items still ours, so a long chunk is not taken over while alive."""
    now = timezone.now()
    return PayrollItem.objects.filter(pk__in=item_pks, status=ItemStatus.PROCESSING,
                                      claimed_by=claim).update(claim_expires_at=_lease_end(now))


def compute(batch: PayrollBatch, employee_ids: list[str], *,
            renew: Callable[[], Any] | None = None) -> tuple[dict, dict]:
    """Run the host's calculation; per-employee errors are data, DB errors retry the chunk.

    ``renew`` is called between employees once a third of the lease has passed
    (the per-employee path; a ``CALCULATE_MANY`` call must fit in the lease).
    """
    args = (batch.planilla_id, batch.periodo_inicio, batch.periodo_fin)
    many = _hook("CALCULATE_MANY", required=False)
    if many is not None:
        return many(employee_ids, *args, batch_id=batch.pk, usuario=batch.requested_by_name)
    one = _hook("CALCULATE_EMPLOYEE")
    results, errors = {}, {}
    renew_every = get_settings().BATCH_CLAIM_TTL / 3
    renewed = time.monotonic()
    for employee in employee_ids:
        if renew is not None and time.monotonic() - renewed >= renew_every:
            renew()
            renewed = time.monotonic()
        try:
            results[employee] = one(employee, *args, batch_id=batch.pk,
                                    usuario=batch.requested_by_name)
        except DatabaseError:
            raise
        except Exception as exc:  # the host's rule error fails this employee only
            errors[employee] = exc
    return results, errors


def describe_error(error: BaseException | str) -> tuple[str, str]:
    """An employee's error as (message, traceback): hooks report exceptions or plain text."""
    if isinstance(error, BaseException):
        message = str(error).strip("'\"") or type(error).__name__
        return message, "".join(traceback.format_exception(error))
    return str(error), ""


def record_item_outcomes(batch: PayrollBatch, items: list[tuple[int, str]], claim: uuid.UUID,
                         results: dict, errors: dict) -> tuple[int, int]:
    """Write outcomes of items still claimed by us; count only those (exactly once).

    The check, the writes and the counters are one transaction (rows locked where
    the database can; SQLite's write lock is taken at BEGIN), so a second run of
    the chunk, or a chunk that took over an expired lease, finds the items no
    longer ``processing`` under its claim and writes nothing.
    """
    now = timezone.now()
    with transaction.atomic():
        still_ours = set(PayrollItem.objects.select_for_update().filter(
            pk__in=[pk for pk, _ in items], status=ItemStatus.PROCESSING, claimed_by=claim
        ).values_list("pk", flat=True))
        updates = []
        for pk, employee in items:
            if pk not in still_ours:
                continue
            ok = employee in results
            error, trace = ("", "") if ok else describe_error(
                errors.get(employee, "no result returned for this employee"))
            updates.append(PayrollItem(
                pk=pk, batch=batch, employee_id=employee, finished_at=now, claim_expires_at=None,
                status=ItemStatus.SUCCEEDED if ok else ItemStatus.FAILED,
                result=results[employee] if ok else None, error=error, traceback=trace))
        # One INSERT .. ON CONFLICT(id) DO UPDATE: every row exists, so this is a
        # bulk update by primary key without bulk_update's per-row CASE expressions.
        PayrollItem.objects.bulk_create(
            updates, batch_size=500, update_conflicts=True, unique_fields=["id"],
            update_fields=["status", "error", "traceback", "result", "finished_at",
                           "claim_expires_at"])
        succeeded = sum(1 for u in updates if u.status == ItemStatus.SUCCEEDED)
        failed = len(updates) - succeeded
        batch.record_outcomes(succeeded=succeeded, failed=failed)
    return succeeded, failed


# -- one employee (origin-design API) -------------------------------------
def calculate_employee_payroll(empleado_id: str, planilla_id: str, periodo_inicio: str,
                               periodo_fin: str, usuario: str = "",
                               batch_id: int | None = None) -> dict[str, Any]:
    """Task body: one employee; inside a batch it goes through the item's claim."""
    start, end = parse_period(periodo_inicio, periodo_fin)
    if batch_id is None:
        return _hook("CALCULATE_EMPLOYEE")(str(empleado_id), str(planilla_id), start, end,
                                           batch_id=None, usuario=usuario)
    item = PayrollItem.objects.select_related("batch").get(batch_id=batch_id,
                                                           employee_id=str(empleado_id))
    calculate_payroll_chunk(batch_id, [item.pk])
    item.refresh_from_db()
    if item.status == ItemStatus.FAILED:
        raise LookupError(item.error)
    return item.result


# -- finish, cancel, callbacks ---------------------------------------------
def finish_and_notify(batch: PayrollBatch) -> bool:
    """Finish a batch whose items are all processed, and send its callbacks, atomically.

    One transaction: the callback task records are created with the status change
    and sent on commit, so a crash leaves either neither or both (a record whose
    message was lost is re-sent by the delivery reconciler).
    """
    with transaction.atomic():
        if not batch.finish_if_done():
            return False
        fire_callbacks(batch)
    return True


def cancel_batch(batch: PayrollBatch) -> bool:
    with transaction.atomic():
        if not batch._transition([BatchStatus.PENDING, BatchStatus.RUNNING],
                                 BatchStatus.CANCELLED, finished_at=timezone.now()):
            return False
        batch.items.filter(status=ItemStatus.PENDING).update(status=ItemStatus.CANCELLED)
        fire_callbacks(batch)
    return True


def fire_callbacks(batch: PayrollBatch) -> list[str]:
    """Send each due callback task, exactly once per batch and kind.

    Only registered task names are sent (never imported): a batch row naming
    anything else, set before this rule or written directly, is logged and skipped.
    """
    due = {"complete": batch.on_complete,
           "success": batch.on_success if batch.status == BatchStatus.COMPLETED else "",
           "failure": batch.on_failure if batch.status in (
               BatchStatus.COMPLETED_WITH_ERRORS, BatchStatus.FAILED) else ""}
    fired = []
    for kind in CALLBACK_KINDS:
        target = due[kind]
        if not target:
            continue
        if target not in registry:
            logger.error("Payroll batch #%s: on_%s callback %r is not a registered task; "
                         "not sent.", batch.pk, kind, target)
            continue
        with transaction.atomic():  # the claim and the task record commit together
            if batch.claim_callback(kind):
                registry.get(target).send(batch_id=batch.pk)
                fired.append(kind)
    return fired


# -- registered tasks -----------------------------------------------------
class PayrollTask(Task):
    """A task whose ``send`` checks its arguments first, so a bad call fails at once."""

    def send_with_options(self, *, args: Iterable[Any] = (), kwargs: dict | None = None,
                          **options: Any) -> str:
        args, kwargs = list(args), dict(kwargs or {})
        if "periodo_inicio" in kwargs or "periodo_fin" in kwargs:
            parse_period(kwargs.get("periodo_inicio"), kwargs.get("periodo_fin"))
        # A worker would fail it with the same TypeError (e.g. on_complete=, which the
        # fan-out no longer takes): refused here, before anything is queued.
        inspect.signature(self.func).bind(*args, **kwargs)
        return super().send_with_options(args=args, kwargs=kwargs, **options)


CHUNK_TASK_NAME = "coati.payroll.calculate_chunk"
_transient = (DatabaseError,)
process_payroll_parallel_task = registry.register(
    process_payroll_parallel, "process_payroll_parallel", task_class=PayrollTask,
    max_retries=3, retry_on=_transient)
calculate_employee_payroll_task = registry.register(
    calculate_employee_payroll, "calculate_employee_payroll", task_class=PayrollTask,
    max_retries=3, retry_on=_transient)
calculate_payroll_chunk_task = registry.register(
    calculate_payroll_chunk, CHUNK_TASK_NAME, max_retries=5,
    min_backoff=500, max_backoff=30_000, retry_on=_transient)
