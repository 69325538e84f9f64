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
employee. An item is claimed by a conditional UPDATE and its outcome is
written only while the claim holds, so a chunk delivered twice writes and
counts each employee once; the line itself is unique per (batch, employee).
"""

from __future__ import annotations

import datetime
import logging
import traceback
import uuid
from typing import Any, Callable, Iterable

from django.db import DatabaseError, IntegrityError, transaction
from django.db.models import F, Q
from django.utils import timezone
from django.utils.module_loading import import_string
from django.utils.translation import gettext as _

from .conf import get_settings
from .core.exceptions import CoatiQueueError, TaskNotRegistered
from .core.middleware import get_current_job
from .core.tasks import Task, registry
from .models import BatchStatus, ItemStatus, PayrollBatch, PayrollItem

logger = logging.getLogger("coati_queue.payroll")

DEFAULT_CHUNK_SIZE = 100
CALLBACK_KINDS = ("complete", "success", "failure")


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


def _check_callback(target: str) -> None:
    if target and target not in registry:
        try:
            import_string(target)
        except ImportError:
            raise PayrollError(f"Callback {target!r} is neither a registered task nor an "
                               "importable dotted path.") from None


# -- starting -------------------------------------------------------------
def create_batch(planilla_id: str, periodo_inicio: Any, periodo_fin: Any, *, usuario: str = "",
                 requested_by: Any = None, on_complete: str = "", on_success: str = "",
                 on_failure: str = "") -> PayrollBatch:
    """Create the batch record, refusing a second active one for the same period."""
    start, end = parse_period(periodo_inicio, periodo_fin)
    for target in (on_complete, on_success, on_failure):
        _check_callback(target)
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
                on_complete=on_complete, on_success=on_success, on_failure=on_failure)
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
    from .monitoring import broker_errors
    from .redis_url import error_text

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
        reason = error_text(exc, get_settings().REDIS_URL)
        batch.mark_failed(f"Could not be queued: {reason}")
        raise PayrollError(
            _("Payroll batch #%(id)s could not be queued (%(reason)s). It was marked failed, "
              "so the period can be started again once the queue is back.")
            % {"id": batch.pk, "reason": reason}) from exc
    batch.refresh_from_db()  # the immediate backend has already run the fan-out
    return batch


def process_payroll_parallel(planilla_id: str, periodo_inicio: str, periodo_fin: str,
                             usuario: str = "", batch_id: int | None = None,
                             on_complete: str = "", on_success: str = "",
                             on_failure: str = "") -> dict[str, Any]:
    """Task body: list the active employees, create one item each, enqueue chunks."""
    if batch_id is None:
        batch = create_batch(planilla_id, periodo_inicio, periodo_fin, usuario=usuario,
                             on_complete=on_complete, on_success=on_success,
                             on_failure=on_failure)
    else:
        batch = PayrollBatch.objects.get(pk=batch_id)
    if batch.status != BatchStatus.PENDING:
        return {"batch_id": batch.pk, "status": batch.status, "total": batch.total}
    try:
        employee_ids = list(dict.fromkeys(str(e) for e in _hook("ACTIVE_EMPLOYEES")(
            batch.planilla_id, batch.periodo_inicio, batch.periodo_fin)))
    except LookupError as exc:
        message = str(exc).strip("'\"") or f"Planilla not found: {batch.planilla_id}"
        if not message.lower().startswith("planilla not found"):
            message = f"Planilla not found: {message}"
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
    if not employee_ids and batch.finish_if_done():
        fire_callbacks(batch)
    return {"batch_id": batch.pk, "status": BatchStatus.RUNNING, "total": len(employee_ids)}


def enqueue_chunks(batch: PayrollBatch, item_ids: list[int]) -> list[str]:
    """One chunk task per CHUNK_SIZE items, in one bulk enqueue (sent on commit)."""
    size = _chunk_size()
    calls = [((), {"batch_id": batch.pk, "item_ids": item_ids[i:i + size]})
             for i in range(0, len(item_ids), size)]
    return calculate_payroll_chunk_task.send_many(calls, batch_id=batch.pk)


# -- one chunk of employees -----------------------------------------------
def calculate_payroll_chunk(batch_id: int, item_ids: list[int]) -> dict[str, int]:
    """Task body: claim the items, compute them, record outcomes once."""
    job = get_current_job()
    claim = uuid.UUID(job.id) if job else uuid.uuid4()
    batch = PayrollBatch.objects.get(pk=batch_id)
    items = claim_items(batch, item_ids, claim)
    if not items:
        return {"batch_id": batch_id, "succeeded": 0, "failed": 0, "skipped": len(item_ids)}
    results, errors = compute(batch, [employee for _, employee in items])
    succeeded, failed = record_item_outcomes(batch, items, claim, results, errors)
    if batch.finish_if_done():
        fire_callbacks(batch)
    return {"batch_id": batch_id, "succeeded": succeeded, "failed": failed,
            "skipped": len(item_ids) - len(items)}


def claim_items(batch: PayrollBatch, item_ids: Iterable[int],
                claim: uuid.UUID) -> list[tuple[int, str]]:
    """Take the pending items (or ours again, on redelivery); returns (pk, employee)."""
    claimable = Q(status=ItemStatus.PENDING) | Q(status=ItemStatus.PROCESSING, claimed_by=claim)
    task_exists = get_current_job() is not None
    with transaction.atomic():
        if batch.status == BatchStatus.CANCELLED:
            return []
        PayrollItem.objects.filter(claimable, pk__in=item_ids, batch=batch).update(
            status=ItemStatus.PROCESSING, claimed_by=claim, started_at=timezone.now(),
            attempts=F("attempts") + 1, **({"task_id": claim} if task_exists else {}))
        items = list(PayrollItem.objects.filter(
            pk__in=item_ids, status=ItemStatus.PROCESSING, claimed_by=claim
        ).values_list("pk", "employee_id"))
        if task_exists and items:
            through = PayrollItem.tasks.through
            through.objects.bulk_create([through(payrollitem_id=pk, taskresult_id=claim)
                                         for pk, _ in items], ignore_conflicts=True)
    return items


def compute(batch: PayrollBatch, employee_ids: list[str]) -> tuple[dict, dict]:
    """Run the host's calculation; per-employee errors are data, DB errors retry the chunk."""
    args = (batch.planilla_id, batch.periodo_inicio, batch.periodo_fin)
    many = _hook("CALCULATE_MANY", required=False)
    if many is not None:
        return many(employee_ids, *args, batch_id=batch.pk, usuario=batch.requested_by_name)
    one = _hook("CALCULATE_EMPLOYEE")
    results, errors = {}, {}
    for employee in employee_ids:
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
    """Write outcomes of items still claimed by us; count only those (exactly once)."""
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
                pk=pk, batch=batch, employee_id=employee, finished_at=now,
                status=ItemStatus.SUCCEEDED if ok else ItemStatus.FAILED,
                result=results[employee] if ok else None, error=error, traceback=trace))
        # One INSERT .. ON CONFLICT(id) DO UPDATE: every row exists, so this is a
        # bulk update by primary key without bulk_update's per-row CASE expressions.
        PayrollItem.objects.bulk_create(
            updates, batch_size=500, update_conflicts=True, unique_fields=["id"],
            update_fields=["status", "error", "traceback", "result", "finished_at"])
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


# -- resume, cancel, callbacks --------------------------------------------
def retry_failed_items(batch: PayrollBatch) -> int:
    """Failed items back to pending and re-enqueued alone; the batch runs again."""
    with transaction.atomic():
        ids = list(batch.items.filter(status=ItemStatus.FAILED).values_list("pk", flat=True))
        if not ids:
            return 0
        moved = PayrollItem.objects.filter(pk__in=ids, status=ItemStatus.FAILED).update(
            status=ItemStatus.PENDING, claimed_by=None)
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
        enqueue_chunks(batch, ids)
    batch.refresh_from_db()
    return moved


def cancel_batch(batch: PayrollBatch) -> bool:
    with transaction.atomic():
        if not batch._transition([BatchStatus.PENDING, BatchStatus.RUNNING],
                                 BatchStatus.CANCELLED, finished_at=timezone.now()):
            return False
        batch.items.filter(status=ItemStatus.PENDING).update(status=ItemStatus.CANCELLED)
    fire_callbacks(batch)
    return True


def fire_callbacks(batch: PayrollBatch) -> list[str]:
    """Fire each configured callback that is due, exactly once per batch and kind."""
    due = {"complete": batch.on_complete,
           "success": batch.on_success if batch.status == BatchStatus.COMPLETED else "",
           "failure": batch.on_failure if batch.status in (
               BatchStatus.COMPLETED_WITH_ERRORS, BatchStatus.FAILED) else ""}
    fired = []
    for kind in CALLBACK_KINDS:
        target = due[kind]
        if target and batch.claim_callback(kind):
            _call(target, batch.pk)
            fired.append(kind)
    return fired


def _call(target: str, batch_id: int) -> None:
    try:
        registry.get(target).send(batch_id=batch_id)
    except TaskNotRegistered:
        import_string(target)(batch_id)


# -- registered tasks -----------------------------------------------------
class PayrollTask(Task):
    """A task whose ``send`` validates the period first, so a bad date fails at once."""

    def send_with_options(self, *, args: Iterable[Any] = (), kwargs: dict | None = None,
                          **options: Any) -> str:
        kwargs = dict(kwargs or {})
        if "periodo_inicio" in kwargs or "periodo_fin" in kwargs:
            parse_period(kwargs.get("periodo_inicio"), kwargs.get("periodo_fin"))
        return super().send_with_options(args=args, kwargs=kwargs, **options)


_transient = (DatabaseError,)
process_payroll_parallel_task = registry.register(
    process_payroll_parallel, "process_payroll_parallel", task_class=PayrollTask,
    max_retries=3, retry_on=_transient)
calculate_employee_payroll_task = registry.register(
    calculate_employee_payroll, "calculate_employee_payroll", task_class=PayrollTask,
    max_retries=3, retry_on=_transient)
calculate_payroll_chunk_task = registry.register(
    calculate_payroll_chunk, "coati.payroll.calculate_chunk", max_retries=5,
    min_backoff=500, max_backoff=30_000, retry_on=_transient)
