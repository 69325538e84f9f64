"""Payroll batches end to end: real workers, exactly-once outcomes, retries, cancel, callbacks.

The two 1,000-employee tests run the example project's payroll through real
``runworkers`` subprocesses (2 processes x 8 threads) on Huey (file storage)
and on Dramatiq (a real redis-server) and compare every line with a
synchronous reference computed straight from ``example_project.payroll.calculation``.
Everything else uses small planillas and, where workers are not the point,
the immediate backend.
"""

from __future__ import annotations

import datetime
import io
from decimal import Decimal
from importlib import import_module
from types import SimpleNamespace

import pytest
from django.apps import apps as django_apps
from django.contrib.auth.models import Permission, User
from django.core.management import call_command
from django.db import connection
from django.db.models import Count

from coati_queue.core.jobs import Job
from coati_queue.models import BatchStatus, ItemStatus, PayrollBatch, TaskResult, TaskStatus
from coati_queue.payroll import (CALLBACK_KINDS, DuplicateBatch, InvalidPeriod, PayrollError,
                                 calculate_employee_payroll_task, calculate_payroll_chunk,
                                 create_batch, fire_callbacks, process_payroll_parallel_task,
                                 start_payroll_batch)
from coati_queue.selection import get_queue_driver
from example_project.payroll import services
from example_project.payroll.calculation import AMOUNT_FIELDS, calculate_line
from example_project.payroll.models import Company, Employee, PayrollLine, Planilla
from example_project.payroll.rules import employer_rate, rules_for_period
from tests.testapp.models import Mark

from .conftest import describe_failure

START, END = "2024-01-01", "2024-01-15"
START_DATE, END_DATE = datetime.date(2024, 1, 1), datetime.date(2024, 1, 15)
CHUNK_TASK = "coati.payroll.calculate_chunk"
TASK_CALLBACKS = {"on_complete": "tests.payroll_on_complete",
                  "on_success": "tests.payroll_on_success",
                  "on_failure": "tests.payroll_on_failure"}
WORKER_ARGS = ("--processes", "2", "--threads", "8")


# -- fixtures and helpers -------------------------------------------------------------------
@pytest.fixture(autouse=True)
def payroll_rules(request):
    """The default rule set (a transactional test's flush deletes the migration's rows)."""
    services.clear_caches()
    if request.node.get_closest_marker("django_db"):
        request.getfixturevalue("_django_db_marker")  # the database is set up first
        migration = import_module("example_project.payroll.migrations.0002_default_rules")
        migration.load_default_rules(django_apps, SimpleNamespace(connection=connection))
    yield
    services.clear_caches()


@pytest.fixture
def immediate(queue_env):
    """Tasks run in the caller (QUEUE_ENABLED=0), still tracked."""
    queue_env(QUEUE_ENABLED="0")
    assert get_queue_driver().name == "immediate"
    return get_queue_driver()


@pytest.fixture
def huey(queue_env, huey_path, run_workers):
    queue_env(COATI_QUEUE_BACKEND="huey", COATI_QUEUE_PATH=huey_path)
    driver = get_queue_driver()
    assert driver.name == "huey"
    return SimpleNamespace(name="huey", driver=driver, drain=_drainer("huey", run_workers))


@pytest.fixture
def dramatiq(queue_env, redis_url, run_workers):
    queue_env(COATI_QUEUE_BACKEND="dramatiq", REDIS_URL=redis_url)
    driver = get_queue_driver()
    assert driver.name == "dramatiq"
    return SimpleNamespace(name="dramatiq", driver=driver, drain=_drainer("dramatiq", run_workers))


def _drainer(name, run_workers):
    def drain(*args: str, timeout: float = 120) -> None:
        completed = run_workers(name, *args, timeout=timeout)
        assert completed.returncode == 0, describe_failure(completed)

    return drain


def make_planilla(code: str, employees: int, *, company: str | None = None,
                  salary=lambda i: Decimal(12_000 + 1_375 * i)) -> Planilla:
    """A biweekly planilla of ``employees`` active employees ``<code>_e000``..."""
    owner = Company.objects.create(name=company or f"Company {code}")
    planilla = Planilla.objects.create(code=code, name=code, company=owner)
    Employee.objects.bulk_create([
        Employee(code=f"{code}_e{i:03d}", planilla=planilla, first_name="Ana",
                 last_name=f"López {i}", monthly_salary=salary(i),
                 hire_date=datetime.date(2020, 3, 1))
        for i in range(employees)
    ])
    services.clear_caches()
    return planilla


def seed(code: str, employees: int, seed_value: int) -> list[str]:
    """``seed_demo`` (inactive, terminated and new hires included); the ids to pay."""
    call_command("seed_demo", employees=employees, seed=seed_value, planilla=code,
                 company=f"Company {code}", stdout=io.StringIO())
    services.clear_caches()
    return services.active_employee_ids(code, START_DATE, END_DATE)


def reference_figures(planilla_code: str, employee_ids: list[str]) -> dict[str, dict]:
    """Every employee's figures computed synchronously by the pure calculation functions."""
    planilla = Planilla.objects.select_related("company").get(code=planilla_code)
    rules = rules_for_period(START_DATE, END_DATE)
    rate = employer_rate(rules, planilla.company_id, planilla.company.employer_size_override,
                         START_DATE, END_DATE)
    figures = {}
    for employee in Employee.objects.filter(planilla=planilla, code__in=employee_ids):
        figures[employee.code] = calculate_line(
            monthly_salary=employee.monthly_salary, periodicity=planilla.periodicity,
            period_start=START_DATE, period_end=END_DATE, hire_date=employee.hire_date,
            termination_date=employee.termination_date, rules=rules, employer_rate=rate)
    return figures


def line_figures(batch: PayrollBatch) -> dict[str, dict]:
    rows = PayrollLine.objects.filter(batch=batch).values("employee__code", "days_worked",
                                                           *AMOUNT_FIELDS)
    return {row.pop("employee__code"): row for row in rows}


def totals(figures: dict[str, dict]) -> dict[str, Decimal]:
    return {name: sum((f[name] for f in figures.values()), Decimal("0"))
            for name in ("gross", "net", "total_deductions", "employer_cost")}


def marks(batch: PayrollBatch) -> dict[str, int]:
    return {kind: Mark.objects.filter(label=f"payroll:{kind}:{batch.pk}").count()
            for kind in CALLBACK_KINDS}


def counters(batch: PayrollBatch) -> tuple:
    batch.refresh_from_db()
    return batch.status, batch.total, batch.succeeded, batch.failed, batch.finished_at


def assert_one_line_per_employee(batch: PayrollBatch, employee_ids: list[str]) -> None:
    lines = PayrollLine.objects.filter(batch=batch)
    assert lines.count() == len(employee_ids)
    assert lines.values("employee").distinct().count() == len(employee_ids)
    assert set(lines.values_list("employee__code", flat=True)) == set(employee_ids)
    duplicated = lines.values("employee").annotate(n=Count("id")).filter(n__gt=1)
    assert not duplicated.exists()


def resend_chunks(driver, batch: PayrollBatch) -> list[TaskResult]:
    """Deliver every chunk message of the batch again, byte for byte the same job."""
    records = list(TaskResult.objects.filter(batch=batch, task_name=CHUNK_TASK))
    assert records
    driver.send([Job(task=r.task_name, args=r.args, kwargs=r.kwargs, id=str(r.id), queue=r.queue,
                     batch_id=r.batch_id, max_retries=r.max_retries) for r in records])
    return records


# -- 1,000 employees on real workers --------------------------------------------------------
@pytest.mark.redis
@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("backend_name", ["huey", "dramatiq"])
def test_thousand_employee_batch_on_real_workers(request, backend_name):
    backend = request.getfixturevalue(backend_name)
    code = f"e2e_{backend_name}"
    employee_ids = seed(code, 1000, seed_value=2024)
    assert 900 < len(employee_ids) < 1000  # seed_demo leaves out inactive and departed people
    expected = reference_figures(code, employee_ids)

    batch = start_payroll_batch(code, START, END, usuario="tester", **TASK_CALLBACKS)
    assert batch.status == BatchStatus.PENDING
    backend.drain(*WORKER_ARGS)

    batch.refresh_from_db()
    n = len(employee_ids)
    assert batch.status == BatchStatus.COMPLETED, batch.progress()
    assert (batch.total, batch.succeeded, batch.failed) == (n, n, 0)
    assert_one_line_per_employee(batch, employee_ids)
    assert batch.items.count() == n
    assert not batch.items.exclude(status=ItemStatus.SUCCEEDED).exists()
    assert not batch.items.exclude(attempts=1).exists()  # each employee computed once
    # Line by line and in total, the workers agree with the synchronous computation.
    stored = line_figures(batch)
    assert stored == {code_: {"days_worked": f["days_worked"],
                              **{name: f[name] for name in AMOUNT_FIELDS}}
                      for code_, f in expected.items()}
    assert totals(stored) == totals(expected)
    assert totals(expected)["net"] > 0
    # Callbacks fired exactly once, however many chunks finished together.
    assert marks(batch) == {"complete": 1, "success": 1, "failure": 0}
    chunks = TaskResult.objects.filter(batch=batch, task_name=CHUNK_TASK)
    assert chunks.count() == -(-n // 100)  # CHUNK_SIZE 100
    assert set(chunks.values_list("status", "backend")) == {(TaskStatus.COMPLETED, backend_name)}
    assert not chunks.filter(worker_id="").exists()  # run by the worker subprocesses

    # The same chunk messages delivered again: nothing is written or counted twice.
    before = counters(batch)
    last_write = max(PayrollLine.objects.filter(batch=batch).values_list("updated_at", flat=True))
    records = resend_chunks(backend.driver, batch)
    assert backend.driver.queue_depths()["default"]["queued"] == len(records)
    backend.drain(*WORKER_ARGS)
    assert backend.driver.queue_depths()["default"]["queued"] == 0  # consumed
    assert counters(batch) == before
    assert_one_line_per_employee(batch, employee_ids)
    assert max(PayrollLine.objects.filter(batch=batch)
               .values_list("updated_at", flat=True)) == last_write
    assert not batch.items.exclude(attempts=1).exists()
    assert marks(batch) == {"complete": 1, "success": 1, "failure": 0}


# -- failed employees, fixed data, retry_failed ---------------------------------------------
@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("bulk_hook", [True, False],
                         ids=["calculate_many", "calculate_employee"])
def test_invalid_employees_fail_then_retry_failed_completes(immediate, settings, bulk_hook):
    if not bulk_hook:  # the per-employee hook path, without CALCULATE_MANY
        payroll = dict(settings.COATI_QUEUE["PAYROLL"])
        del payroll["CALCULATE_MANY"]
        settings.COATI_QUEUE = {**settings.COATI_QUEUE, "PAYROLL": payroll}
    planilla = make_planilla("pl_retry", 20)
    invalid = ["pl_retry_e003", "pl_retry_e010", "pl_retry_e017"]
    # Bulk writes skip model validators: a negative salary reaches the calculation.
    Employee.objects.filter(code__in=invalid).update(monthly_salary=Decimal("-1.00"))
    employee_ids = services.active_employee_ids(planilla.code, START_DATE, END_DATE)
    assert len(employee_ids) == 20 and set(invalid) <= set(employee_ids)

    batch = start_payroll_batch(planilla.code, START, END, **TASK_CALLBACKS)
    batch.refresh_from_db()
    assert batch.status == BatchStatus.COMPLETED_WITH_ERRORS
    assert (batch.total, batch.succeeded, batch.failed) == (20, 17, 3)
    failed = {item.employee_id: item for item in batch.items.filter(status=ItemStatus.FAILED)}
    assert set(failed) == set(invalid)
    for employee, item in failed.items():
        assert item.error.startswith(f"Invalid salary for {employee}"), item.error
        # Where the host's rule raised it, for the operator opening the failed item.
        assert item.traceback.startswith("Traceback (most recent call last):"), item.traceback
        assert "example_project/payroll/services.py" in item.traceback
        assert item.traceback.rstrip().endswith(f"ValueError: {item.error}"), item.traceback
        assert item.attempts == 1 and item.tasks.count() == 1
    assert PayrollLine.objects.filter(batch=batch).count() == 17
    assert marks(batch) == {"complete": 1, "success": 0, "failure": 1}

    Employee.objects.filter(code__in=invalid).update(monthly_salary=Decimal("15000.00"))
    assert batch.retry_failed() == 3
    batch.refresh_from_db()
    assert batch.status == BatchStatus.COMPLETED
    assert (batch.total, batch.succeeded, batch.failed) == (20, 20, 0)
    assert_one_line_per_employee(batch, employee_ids)
    for item in batch.items.all():
        assert item.status == ItemStatus.SUCCEEDED and item.error == item.traceback == ""
        attempts = 2 if item.employee_id in invalid else 1
        assert item.attempts == attempts, item
        assert item.tasks.count() == attempts, item
        assert item.tasks.filter(task_name=CHUNK_TASK).count() == attempts
    for employee in invalid:
        line = PayrollLine.objects.get(batch=batch, employee__code=employee)
        assert line.gross == Decimal("7500.00")
    # Sidekiq semantics: complete and failure fired on the first pass only; success now.
    assert marks(batch) == {"complete": 1, "success": 1, "failure": 1}
    assert batch.retry_failed() == 0  # nothing left to retry


# -- the same calculation delivered twice ---------------------------------------------------
@pytest.mark.django_db(transaction=True)
def test_chunk_redelivered_after_completion_changes_nothing(immediate):
    make_planilla("pl_dup", 30)
    batch = start_payroll_batch("pl_dup", START, END)
    before = counters(batch)
    assert before[:4] == (BatchStatus.COMPLETED, 30, 30, 0)
    records = resend_chunks(immediate, batch)
    for record in records:
        record.refresh_from_db()
        assert record.status == TaskStatus.COMPLETED
    assert counters(batch) == before
    assert PayrollLine.objects.filter(batch=batch).count() == 30
    assert not batch.items.exclude(attempts=1).exists()


@pytest.mark.django_db(transaction=True)
def test_employee_task_sent_twice_for_a_succeeded_employee(immediate):
    make_planilla("pl_twice", 20)
    batch = start_payroll_batch("pl_twice", START, END)
    before = counters(batch)
    assert before[:4] == (BatchStatus.COMPLETED, 20, 20, 0)
    line = PayrollLine.objects.get(batch=batch, employee__code="pl_twice_e005")

    ids = [calculate_employee_payroll_task.send(
        empleado_id="pl_twice_e005", planilla_id="pl_twice", periodo_inicio=START,
        periodo_fin=END, batch_id=batch.pk) for _ in range(2)]

    for task_id in ids:
        result = immediate.get_task_result(task_id)
        assert result["status"] == TaskStatus.COMPLETED
        assert result["result"]["salario_neto"] == f"{line.net:.2f}"
    assert counters(batch) == before
    assert PayrollLine.objects.filter(batch=batch, employee__code="pl_twice_e005").count() == 1
    assert PayrollLine.objects.filter(batch=batch).count() == 20
    assert PayrollLine.objects.get(pk=line.pk).updated_at == line.updated_at
    assert batch.items.get(employee_id="pl_twice_e005").attempts == 1


# -- refusals -------------------------------------------------------------------------------
@pytest.mark.django_db(transaction=True)
def test_duplicate_batch_is_refused_and_names_the_running_one(huey):
    make_planilla("pl_once", 5)
    first = start_payroll_batch("pl_once", START, END)  # no worker: stays pending
    with pytest.raises(DuplicateBatch) as caught:
        start_payroll_batch("pl_once", START, END)
    assert caught.value.batch.pk == first.pk
    assert f"#{first.pk}" in str(caught.value)
    with pytest.raises(DuplicateBatch):
        create_batch("pl_once", datetime.date(2024, 1, 1), "2024-01-15")
    assert PayrollBatch.objects.count() == 1
    # Another period, or the same one once the first has ended, is fine.
    assert start_payroll_batch("pl_once", "2024-01-16", "2024-01-31").pk != first.pk
    assert first.cancel()
    assert start_payroll_batch("pl_once", START, END).pk != first.pk


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("inicio, fin, message", [
    ("2024-13-01", "2024-01-15", "periodo_inicio must be an ISO date"),
    ("2024-01-01", "15/01/2024", "periodo_fin must be an ISO date"),
    ("2024-01-16", "2024-01-15", "is after periodo_fin"),
])
def test_invalid_period_refused_at_send_time(immediate, inicio, fin, message):
    with pytest.raises(InvalidPeriod, match=message):
        process_payroll_parallel_task.send(planilla_id="x", periodo_inicio=inicio,
                                           periodo_fin=fin)
    with pytest.raises(InvalidPeriod, match=message):
        calculate_employee_payroll_task.send(empleado_id="e", planilla_id="x",
                                             periodo_inicio=inicio, periodo_fin=fin)
    with pytest.raises(InvalidPeriod, match=message):
        start_payroll_batch("x", inicio, fin)
    assert not TaskResult.objects.exists()  # nothing was enqueued
    assert not PayrollBatch.objects.exists()


@pytest.mark.django_db(transaction=True)
def test_unknown_planilla_fails_the_batch(immediate):
    batch = start_payroll_batch("no_such_planilla", START, END, **TASK_CALLBACKS)
    batch.refresh_from_db()
    assert batch.status == BatchStatus.FAILED
    assert batch.error.startswith("Planilla not found"), batch.error
    assert "no_such_planilla" in batch.error
    assert batch.total == 0 and not batch.items.exists()
    assert batch.progress()["error"] == batch.error
    assert marks(batch) == {"complete": 1, "success": 0, "failure": 1}


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("kind", ["on_complete", "on_success", "on_failure"])
@pytest.mark.parametrize("target", [
    "no.such.callback",
    "tests.testapp.tasks.payroll_plain_complete",  # importable, but not a registered task
    "os.system",
])
def test_callback_that_is_not_a_registered_task_is_refused_at_start(immediate, kind, target):
    with pytest.raises(PayrollError, match="not a registered task") as caught:
        start_payroll_batch("x", START, END, **{kind: target})
    assert repr(target) in str(caught.value)
    assert kind in str(caught.value)
    assert not PayrollBatch.objects.exists()
    assert not TaskResult.objects.exists()


# -- cancel ---------------------------------------------------------------------------------
@pytest.mark.django_db(transaction=True)
def test_cancel_stops_pending_items_before_workers_run(huey):
    make_planilla("pl_cancel", 25)
    batch = start_payroll_batch("pl_cancel", START, END)
    # Fan out here (the queued fan-out message finds the batch no longer pending):
    # items exist and their chunk messages wait in Huey for a worker.
    process_payroll_parallel_task(planilla_id="pl_cancel", periodo_inicio=START,
                                  periodo_fin=END, batch_id=batch.pk)
    batch.refresh_from_db()
    assert batch.status == BatchStatus.RUNNING and batch.total == 25
    assert batch.items.filter(status=ItemStatus.PENDING).count() == 25
    assert huey.driver.queue_depths()["default"]["queued"] >= 2

    assert batch.cancel() is True
    assert batch.status == BatchStatus.CANCELLED and batch.finished_at is not None
    assert batch.items.filter(status=ItemStatus.CANCELLED).count() == 25
    assert batch.cancel() is False  # once

    huey.drain()
    batch.refresh_from_db()
    assert batch.status == BatchStatus.CANCELLED
    assert (batch.succeeded, batch.failed) == (0, 0)
    assert not PayrollLine.objects.filter(batch=batch).exists()
    assert batch.items.filter(status=ItemStatus.CANCELLED).count() == 25
    assert not batch.items.exclude(attempts=0).exists()
    chunks = TaskResult.objects.filter(batch=batch, task_name=CHUNK_TASK)
    assert chunks.count() >= 1
    assert set(chunks.values_list("status", flat=True)) == {TaskStatus.COMPLETED}
    assert huey.driver.queue_depths()["default"]["queued"] == 0


@pytest.mark.django_db(transaction=True)
def test_failed_items_of_a_cancelled_batch_cannot_be_retried(huey):
    """Retrying would set the batch running again with cancelled items that never run:
    it would never finish and would block the period for good."""
    make_planilla("pl_cancel_retry", 10)
    Employee.objects.filter(code="pl_cancel_retry_e001").update(monthly_salary=Decimal("-1"))
    batch = start_payroll_batch("pl_cancel_retry", START, END)
    process_payroll_parallel_task(planilla_id="pl_cancel_retry", periodo_inicio=START,
                                  periodo_fin=END, batch_id=batch.pk)
    first_three = list(batch.items.order_by("pk").values_list("pk", flat=True)[:3])
    calculate_payroll_chunk(batch.pk, first_three)  # part of the batch ran, e001 failed
    assert counters(batch)[:4] == (BatchStatus.RUNNING, 10, 2, 1)
    assert batch.cancel()

    Employee.objects.filter(code="pl_cancel_retry_e001").update(monthly_salary=Decimal("9000"))
    with pytest.raises(PayrollError, match="cancelled"):
        batch.retry_failed()
    assert counters(batch)[:4] == (BatchStatus.CANCELLED, 10, 2, 1)
    assert batch.items.get(employee_id="pl_cancel_retry_e001").status == ItemStatus.FAILED
    assert batch.items.filter(status=ItemStatus.CANCELLED).count() == 7
    assert start_payroll_batch("pl_cancel_retry", START, END).pk != batch.pk


# -- callbacks ------------------------------------------------------------------------------
@pytest.mark.django_db(transaction=True)
def test_callbacks_fire_exactly_once(immediate, settings):
    settings.COATI_QUEUE = {**settings.COATI_QUEUE,
                            "PAYROLL": {**settings.COATI_QUEUE["PAYROLL"], "CHUNK_SIZE": 7}}
    make_planilla("pl_callbacks", 30)
    batch = start_payroll_batch("pl_callbacks", START, END, **TASK_CALLBACKS)
    batch.refresh_from_db()
    assert batch.status == BatchStatus.COMPLETED
    assert TaskResult.objects.filter(batch=batch, task_name=CHUNK_TASK).count() == 5
    assert marks(batch) == {"complete": 1, "success": 1, "failure": 0}
    assert batch.complete_fired_at and batch.success_fired_at and not batch.failure_fired_at
    # A finished batch asked to finish again (a late chunk) fires nothing more.
    assert fire_callbacks(batch) == []
    assert not batch.finish_if_done()
    assert marks(batch) == {"complete": 1, "success": 1, "failure": 0}


# -- progress -------------------------------------------------------------------------------
def _batch_with_counters(planilla: str = "pl_progress", **fields) -> PayrollBatch:
    batch = create_batch(planilla, START, END)
    PayrollBatch.objects.filter(pk=batch.pk).update(**fields)
    batch.refresh_from_db()
    return batch


@pytest.mark.django_db
def test_progress_is_arithmetic_on_counters_without_queries(django_assert_num_queries):
    from django.utils import timezone

    batch = _batch_with_counters(status=BatchStatus.RUNNING, total=200, succeeded=50, failed=10,
                                 started_at=timezone.now() - datetime.timedelta(seconds=60))
    with django_assert_num_queries(0):
        progress = batch.progress()
    assert progress["total"] == 200
    assert progress["completed"] == 50
    assert progress["failed"] == 10
    assert progress["pending"] == 140
    assert progress["progress_percentage"] == 30.0
    assert progress["rate_per_second"] == 1.0
    assert progress["eta_seconds"] == 140.0

    PayrollBatch.objects.filter(pk=batch.pk).update(
        status=BatchStatus.COMPLETED_WITH_ERRORS, succeeded=190,
        finished_at=batch.started_at + datetime.timedelta(seconds=100))
    batch.refresh_from_db()
    with django_assert_num_queries(0):
        progress = batch.progress()
    assert (progress["pending"], progress["progress_percentage"]) == (0, 100.0)
    assert (progress["rate_per_second"], progress["eta_seconds"]) == (2.0, 0.0)


@pytest.mark.django_db
def test_progress_of_an_empty_or_unstarted_batch():
    batch = _batch_with_counters()
    progress = batch.progress()
    assert (progress["total"], progress["pending"], progress["progress_percentage"]) == (0, 0, 0.0)
    assert progress["rate_per_second"] is None and progress["eta_seconds"] is None
    batch = _batch_with_counters("pl_progress_done", status=BatchStatus.COMPLETED)
    assert batch.progress()["progress_percentage"] == 100.0


@pytest.mark.django_db
def test_progress_endpoint_requires_login_and_view_permission(client):
    batch = _batch_with_counters(status=BatchStatus.RUNNING, total=10, succeeded=4, failed=1)
    url = f"/queue/batches/{batch.pk}/progress/"

    response = client.get(url)
    assert response.status_code == 302
    assert "login" in response["Location"]

    user = User.objects.create_user("clerk", password="pw")
    client.force_login(user)
    assert client.get(url).status_code == 403

    user.user_permissions.add(Permission.objects.get(
        codename="view_payrollbatch", content_type__app_label="coati_queue"))
    client.force_login(User.objects.get(pk=user.pk))  # fresh permission cache
    response = client.get(url)
    assert response.status_code == 200
    assert response["Content-Type"].startswith("application/json")
    data = response.json()
    for key in ("total", "completed", "failed", "pending", "progress_percentage",
                "rate_per_second", "eta_seconds"):
        assert key in data, key
    assert (data["total"], data["completed"], data["failed"], data["pending"]) == (10, 4, 1, 5)
    assert data["progress_percentage"] == 50.0
    assert client.get(f"/queue/batches/{batch.pk + 999}/progress/").status_code == 404


# -- origin-design API ----------------------------------------------------------------------
@pytest.mark.django_db(transaction=True)
def test_calculate_employee_task_returns_the_stored_net(immediate):
    make_planilla("pl_origin", 3)
    task_id = calculate_employee_payroll_task.send(
        empleado_id="pl_origin_e001", planilla_id="pl_origin", periodo_inicio=START,
        periodo_fin=END, usuario="admin")
    result = get_queue_driver().get_task_result(task_id)
    assert result["status"] == TaskStatus.COMPLETED, result
    line = PayrollLine.objects.get(employee__code="pl_origin_e001", batch=None)
    assert result["result"]["salario_neto"] == f"{line.net:.2f}"
    assert Decimal(result["result"]["salario_neto"]) == line.net
    assert line.calculated_by == "admin"
    assert (line.period_start, line.period_end) == (START_DATE, END_DATE)
    # Sent again: the standalone line is rewritten, never duplicated.
    calculate_employee_payroll_task.send(empleado_id="pl_origin_e001", planilla_id="pl_origin",
                                         periodo_inicio=START, periodo_fin=END, usuario="admin")
    assert PayrollLine.objects.filter(employee__code="pl_origin_e001").count() == 1


@pytest.mark.django_db(transaction=True)
def test_calculate_employee_task_unknown_employee_fails(immediate):
    make_planilla("pl_origin", 1)
    task_id = calculate_employee_payroll_task.send(
        empleado_id="ghost", planilla_id="pl_origin", periodo_inicio=START, periodo_fin=END)
    result = get_queue_driver().get_task_result(task_id)
    assert result["status"] == TaskStatus.FAILED
    assert "Employee not found: ghost" in result["error"]
    assert not PayrollLine.objects.exists()
