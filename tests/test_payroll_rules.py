"""The example payroll against hand-computed Nicaraguan payslips.

Every expected figure is derived in the comments from the default rule set
loaded by the data migration (INSS 7 % / 21.5 % / 22.5 %, INATEC 2 %, monthly
INSS ceiling 191,969.39, annual IR table of Ley 822), so a wrong rate, rounding
or proration shows up as a wrong cent.
"""

from __future__ import annotations

import datetime
import io
from decimal import Decimal

import pytest
from django.core.management import CommandError, call_command
from django.utils import timezone

from coati_queue.core.exceptions import CoatiQueueError
from coati_queue.models import PayrollBatch, PayrollItem
from example_project.payroll import services
from example_project.payroll.calculation import annual_income_tax, days_worked
from example_project.payroll.models import (
    Company, Employee, PayrollLine, PayrollRuleSet, Periodicity, Planilla,
)
from example_project.payroll.rules import rules_for_period

D = datetime.date
JAN_1, JAN_15, JAN_16, JAN_31 = D(2024, 1, 1), D(2024, 1, 15), D(2024, 1, 16), D(2024, 1, 31)
LONG_AGO = D(2020, 3, 1)


@pytest.fixture(autouse=True)
def fresh_caches():
    """Rule sets and head counts are cached per process; rollbacks send no signal."""
    services.clear_caches()
    yield
    services.clear_caches()


@pytest.fixture
def company(db) -> Company:
    return Company.objects.create(name="Pulpería La Esquina S.A.", ruc="J0310000000001")


def make_planilla(company: Company, code: str = "planilla_test",
                  periodicity: str = Periodicity.BIWEEKLY) -> Planilla:
    return Planilla.objects.create(code=code, name=code, company=company, periodicity=periodicity)


def make_employee(planilla: Planilla, code: str, salary: str, hired: datetime.date = LONG_AGO,
                  terminated: datetime.date | None = None, active: bool = True) -> Employee:
    return Employee.objects.create(
        code=code, planilla=planilla, first_name="Ana", last_name="López",
        monthly_salary=Decimal(salary), hire_date=hired, termination_date=terminated,
        active=active,
    )


def payslip(employee: Employee, start: datetime.date, end: datetime.date) -> dict:
    return services.calculate_and_store(employee.code, employee.planilla.code, start, end)


# -- hand-computed payslips -----------------------------------------------------------------

@pytest.mark.django_db
def test_biweekly_20000_full_fortnight(company):
    employee = make_employee(make_planilla(company), "emp_000001", "20000.00")
    # gross = 20,000 / 2                                   = 10,000.00
    # INSS laboral = 7 % × 10,000                          =    700.00
    # taxable 9,300 × 24 = 223,200 a year
    #   IR = 15,000 + 20 % × (223,200 − 200,000) = 19,640 → / 24 = 818.333 → 818.33
    # net = 10,000 − 700 − 818.33                          =  8,481.67
    # employer: 21.5 % × 10,000 = 2,150.00; INATEC 2 % = 200.00; cost = 12,350.00
    assert payslip(employee, JAN_1, JAN_15) == {
        "empleado_id": "emp_000001",
        "salario_bruto": "10000.00",
        "inss_laboral": "700.00",
        "ir": "818.33",
        "total_deducciones": "1518.33",
        "salario_neto": "8481.67",
        "inss_patronal": "2150.00",
        "inatec": "200.00",
        "costo_empleador": "12350.00",
        "dias": 15,
    }


@pytest.mark.django_db
def test_monthly_salary_above_the_inss_ceiling(company):
    planilla = make_planilla(company, "planilla_mensual", Periodicity.MONTHLY)
    employee = make_employee(planilla, "emp_000002", "250000.00")
    # gross = 250,000.00 (full month); INSS base capped at 191,969.39
    # INSS laboral = 7 % × 191,969.39 = 13,437.8573        → 13,437.86
    # taxable 236,562.14 × 12 = 2,838,745.68 a year
    #   IR = 82,500 + 30 % × 2,338,745.68 = 784,123.704 → / 12 = 65,343.642 → 65,343.64
    # deductions = 78,781.50; net = 171,218.50
    # employer INSS = 21.5 % × 191,969.39 = 41,273.41885   → 41,273.42
    # INATEC = 2 % × 250,000 (not capped) = 5,000.00; cost = 296,273.42
    result = payslip(employee, JAN_1, JAN_31)
    assert result["salario_bruto"] == "250000.00"
    assert result["inss_laboral"] == "13437.86"
    assert result["ir"] == "65343.64"
    assert result["total_deducciones"] == "78781.50"
    assert result["salario_neto"] == "171218.50"
    assert result["inss_patronal"] == "41273.42"
    assert result["inatec"] == "5000.00"
    assert result["costo_empleador"] == "296273.42"
    assert result["dias"] == 30


@pytest.mark.django_db
def test_biweekly_ceiling_is_half_the_monthly_one(company):
    employee = make_employee(make_planilla(company), "emp_000003", "250000.00")
    # gross = 125,000.00; biweekly ceiling = 191,969.39 / 2 = 95,984.695
    # INSS laboral = 7 % × 95,984.695 = 6,718.92865        → 6,718.93
    # employer INSS = 21.5 % × 95,984.695 = 20,636.709425  → 20,636.71
    result = payslip(employee, JAN_1, JAN_15)
    assert (result["inss_laboral"], result["inss_patronal"]) == ("6718.93", "20636.71")


@pytest.mark.django_db
def test_high_salary_in_the_30_percent_bracket(company):
    employee = make_employee(make_planilla(company), "emp_000004", "60000.00")
    # gross = 30,000.00; INSS = 2,100.00 (below the ceiling)
    # taxable 27,900 × 24 = 669,600 a year
    #   IR = 82,500 + 30 % × 169,600 = 133,380 → / 24 = 5,557.50
    # net = 30,000 − 2,100 − 5,557.50 = 22,342.50
    # employer 6,450.00 + INATEC 600.00 → cost 37,050.00
    result = payslip(employee, JAN_1, JAN_15)
    assert result["ir"] == "5557.50"
    assert result["salario_neto"] == "22342.50"
    assert result["costo_empleador"] == "37050.00"


@pytest.mark.django_db
def test_low_salary_barely_above_the_exempt_bracket(company):
    employee = make_employee(make_planilla(company), "emp_000005", "9000.00")
    # gross 4,500.00; INSS 315.00; taxable 4,185 × 24 = 100,440
    #   IR = 15 % × 440 = 66 → / 24 = 2.75; net = 4,500 − 315 − 2.75 = 4,182.25
    result = payslip(employee, JAN_1, JAN_15)
    assert (result["ir"], result["salario_neto"]) == ("2.75", "4182.25")


@pytest.mark.django_db
def test_hired_mid_fortnight_is_prorated(company):
    employee = make_employee(make_planilla(company), "emp_000006", "30000.00",
                             hired=D(2024, 1, 8))
    # days worked: 8..15 January = 8; gross = 30,000 × 8 / 30 = 8,000.00
    # INSS = 560.00; taxable 7,440 × 24 = 178,560
    #   IR = 15 % × 78,560 = 11,784 → / 24 = 491.00; net = 8,000 − 560 − 491 = 6,949.00
    # employer 21.5 % = 1,720.00; INATEC 160.00; cost 9,880.00
    result = payslip(employee, JAN_1, JAN_15)
    assert result["dias"] == 8
    assert result["salario_bruto"] == "8000.00"
    assert result["inss_laboral"] == "560.00"
    assert result["ir"] == "491.00"
    assert result["salario_neto"] == "6949.00"
    assert result["costo_empleador"] == "9880.00"


@pytest.mark.django_db
def test_employer_rate_is_22_5_percent_from_50_employees(company):
    planilla = make_planilla(company)
    Employee.objects.bulk_create([
        Employee(code=f"emp_{n:06d}", planilla=planilla, first_name="X", last_name="Y",
                 monthly_salary=Decimal("20000.00"), hire_date=LONG_AGO)
        for n in range(1, 50)
    ] + [
        # Neither counts: inactive, and terminated before the period.
        Employee(code="emp_inactive", planilla=planilla, first_name="X", last_name="Y",
                 monthly_salary=Decimal("20000.00"), hire_date=LONG_AGO, active=False),
        Employee(code="emp_gone", planilla=planilla, first_name="X", last_name="Y",
                 monthly_salary=Decimal("20000.00"), hire_date=LONG_AGO,
                 termination_date=D(2023, 12, 31)),
    ])
    services.clear_caches()  # bulk_create sends no post_save
    # 49 active employees: 21.5 % × 10,000 = 2,150.00
    assert payslip(Employee.objects.get(code="emp_000001"), JAN_1, JAN_15)["inss_patronal"] == \
        "2150.00"
    # The 50th (on another planilla of the same company) makes it a large employer:
    # 22.5 % × 10,000 = 2,250.00; cost = 10,000 + 2,250 + 200 = 12,450.00
    make_employee(make_planilla(company, "planilla_otra"), "emp_000050", "20000.00")
    result = payslip(Employee.objects.get(code="emp_000001"), JAN_1, JAN_15)
    assert (result["inss_patronal"], result["costo_empleador"]) == ("2250.00", "12450.00")


@pytest.mark.django_db
def test_head_count_override_decides_the_employer_rate(company):
    company.employer_size_override = 120
    company.save()
    employee = make_employee(make_planilla(company), "emp_000007", "20000.00")
    assert payslip(employee, JAN_1, JAN_15)["inss_patronal"] == "2250.00"


@pytest.mark.django_db
def test_rule_changes_are_picked_up(company):
    employee = make_employee(make_planilla(company), "emp_000008", "20000.00")
    assert payslip(employee, JAN_1, JAN_15)["inss_laboral"] == "700.00"  # now cached
    ruleset = PayrollRuleSet.objects.get()
    ruleset.inss_laboral_rate = Decimal("0.0625")
    ruleset.save()  # post_save clears the cache
    assert payslip(employee, JAN_1, JAN_15)["inss_laboral"] == "625.00"


# -- pure rules -----------------------------------------------------------------------------

@pytest.mark.parametrize("start, end, periodicity, hired, terminated, expected", [
    (JAN_1, JAN_15, "biweekly", LONG_AGO, None, 15),
    (JAN_16, JAN_31, "biweekly", LONG_AGO, None, 15),            # 16 calendar days, pays 15
    (D(2024, 2, 1), D(2024, 2, 29), "monthly", LONG_AGO, None, 30),  # February: full month
    (JAN_16, JAN_31, "biweekly", D(2024, 1, 20), None, 12),      # 20..31
    (JAN_16, JAN_31, "biweekly", D(2024, 1, 16), None, 15),      # whole period
    (JAN_1, JAN_31, "monthly", LONG_AGO, D(2024, 1, 10), 10),    # 1..10
    (JAN_1, JAN_15, "biweekly", LONG_AGO, D(2023, 12, 31), 0),   # gone before the period
    (JAN_1, JAN_15, "biweekly", D(2024, 1, 16), None, 0),        # hired after it
])
def test_days_worked_on_the_commercial_month(start, end, periodicity, hired, terminated,
                                             expected):
    assert days_worked(start, end, periodicity, hired, terminated) == expected


@pytest.mark.django_db
@pytest.mark.parametrize("annual, tax", [
    ("0", "0"), ("100000", "0"), ("150000", "7500"), ("200000", "15000"),
    ("350000", "45000"), ("500000", "82500"), ("600000", "112500"),
])
def test_migrated_ir_table_is_continuous(annual, tax):
    rules = rules_for_period(JAN_1, JAN_31)
    assert annual_income_tax(Decimal(annual), rules.brackets) == Decimal(tax)


# -- hooks ----------------------------------------------------------------------------------

@pytest.mark.django_db
def test_active_employee_ids_selects_who_is_paid(company, django_assert_num_queries):
    planilla = make_planilla(company)
    make_employee(planilla, "emp_c", "20000", hired=D(2024, 1, 10))          # hired in period
    make_employee(planilla, "emp_a", "20000")                                # long-standing
    make_employee(planilla, "emp_b", "20000", hired=D(2024, 1, 16))          # hired after
    make_employee(planilla, "emp_d", "20000", terminated=D(2023, 12, 31))    # left before
    make_employee(planilla, "emp_e", "20000", terminated=JAN_1)              # left on day 1
    make_employee(planilla, "emp_f", "20000", active=False)                  # inactive
    make_employee(make_planilla(company, "planilla_otra"), "emp_g", "20000")  # other planilla
    with django_assert_num_queries(1):
        assert services.active_employee_ids("planilla_test", JAN_1, JAN_15) == [
            "emp_a", "emp_c", "emp_e"]


@pytest.mark.django_db
def test_active_employee_ids_unknown_or_empty_planilla(company):
    make_planilla(company, "planilla_vacia")
    assert services.active_employee_ids("planilla_vacia", JAN_1, JAN_15) == []
    with pytest.raises(LookupError, match="Planilla not found: nope"):
        services.active_employee_ids("nope", JAN_1, JAN_15)


@pytest.mark.django_db
def test_calculate_and_store_is_idempotent(company):
    employee = make_employee(make_planilla(company), "emp_000009", "20000.00")
    first = payslip(employee, JAN_1, JAN_15)
    assert payslip(employee, JAN_1, JAN_15) == first
    assert PayrollLine.objects.filter(employee=employee).count() == 1

    batch = PayrollBatch.objects.create(planilla_id="planilla_test", periodo_inicio=JAN_1,
                                        periodo_fin=JAN_15)
    for _ in range(2):
        services.calculate_and_store("emp_000009", "planilla_test", JAN_1, JAN_15,
                                     batch_id=batch.pk, usuario="admin")
    line = PayrollLine.objects.get(batch=batch)
    assert (line.net, line.calculated_by) == (Decimal("8481.67"), "admin")
    assert PayrollLine.objects.filter(employee=employee).count() == 2  # standalone + batch


@pytest.mark.django_db
def test_calculate_and_store_costs_one_read_and_one_write(company, django_assert_num_queries):
    employee = make_employee(make_planilla(company), "emp_000010", "20000.00")
    batch = PayrollBatch.objects.create(planilla_id="planilla_test", periodo_inicio=JAN_1,
                                        periodo_fin=JAN_15)
    payslip(employee, JAN_1, JAN_15)  # warms the rule and head count caches
    with django_assert_num_queries(2):
        services.calculate_and_store("emp_000010", "planilla_test", JAN_1, JAN_15,
                                     batch_id=batch.pk)


@pytest.mark.django_db
def test_calculate_and_store_rejects_unknown_and_inactive(company):
    planilla = make_planilla(company)
    make_employee(planilla, "emp_off", "20000", active=False)
    make_employee(make_planilla(company, "planilla_otra"), "emp_elsewhere", "20000")
    with pytest.raises(LookupError, match="Employee not found: emp_ghost"):
        services.calculate_and_store("emp_ghost", "planilla_test", JAN_1, JAN_15)
    with pytest.raises(LookupError, match="Employee not found: emp_elsewhere"):
        services.calculate_and_store("emp_elsewhere", "planilla_test", JAN_1, JAN_15)
    with pytest.raises(LookupError, match="Employee inactive: emp_off"):
        services.calculate_and_store("emp_off", "planilla_test", JAN_1, JAN_15)
    assert not PayrollLine.objects.exists()


@pytest.mark.django_db
def test_calculate_many_reads_once_and_reports_errors(company, django_assert_max_num_queries):
    planilla = make_planilla(company)
    make_employee(planilla, "emp_1", "20000.00")
    make_employee(planilla, "emp_2", "30000.00", hired=D(2024, 1, 8))
    make_employee(planilla, "emp_off", "20000", active=False)
    batch = PayrollBatch.objects.create(planilla_id="planilla_test", periodo_inicio=JAN_1,
                                        periodo_fin=JAN_15)
    ids = ["emp_1", "emp_2", "emp_off", "emp_ghost"]
    results, errors = services.calculate_many(ids, "planilla_test", JAN_1, JAN_15,
                                              batch_id=batch.pk)
    assert results["emp_1"]["salario_neto"] == "8481.67"
    assert results["emp_2"]["salario_neto"] == "6949.00"
    assert {employee: str(exc) for employee, exc in errors.items()} == {
        "emp_off": "Employee inactive: emp_off", "emp_ghost": "Employee not found: emp_ghost"}
    assert errors["emp_off"].__traceback__ is not None  # the item keeps where it was raised
    with django_assert_max_num_queries(2):  # caches warm: one SELECT, one upsert
        services.calculate_many(ids, "planilla_test", JAN_1, JAN_15, batch_id=batch.pk)
    assert PayrollLine.objects.filter(batch=batch).count() == 2


# -- management commands --------------------------------------------------------------------

@pytest.mark.django_db
def test_seed_demo_is_repeatable_and_resettable():
    def seed() -> list[tuple]:
        call_command("seed_demo", employees=200, seed=7, reset=True, stdout=io.StringIO())
        return list(Employee.objects.order_by("code").values_list(
            "code", "monthly_salary", "hire_date", "termination_date", "active"))

    first = seed()
    assert len(first) == 200 and first == seed()
    salaries = [row[1] for row in first]
    assert min(salaries) >= Decimal("9000") and max(salaries) <= Decimal("250000")
    assert Planilla.objects.get(code="planilla_demo").periodicity == Periodicity.BIWEEKLY


def finished_batch(company: Company, failed_employee: str | None = None) -> PayrollBatch:
    """A batch as coati_queue leaves it: one line computed, maybe one item failed."""
    employee = make_employee(make_planilla(company), "emp_000011", "20000.00")
    now = timezone.now()
    batch = PayrollBatch.objects.create(
        planilla_id="planilla_test", periodo_inicio=JAN_1, periodo_fin=JAN_15,
        status="completed_with_errors" if failed_employee else "completed",
        total=2 if failed_employee else 1, succeeded=1, failed=1 if failed_employee else 0,
        started_at=now, finished_at=now)
    payslip(employee, JAN_1, JAN_15)
    services.calculate_and_store(employee.code, "planilla_test", JAN_1, JAN_15, batch.pk)
    PayrollItem.objects.create(batch=batch, employee_id=employee.code, status="succeeded")
    if failed_employee:
        PayrollItem.objects.create(batch=batch, employee_id=failed_employee, status="failed",
                                   error=f"Employee not found: {failed_employee}")
    return batch


def run_payroll(monkeypatch, batch: PayrollBatch, *extra: str,
                out: io.StringIO | None = None) -> str:
    """The command with coati_queue's start replaced: it returns ``batch``, already done."""
    monkeypatch.setattr("coati_queue.payroll.start_payroll_batch",
                        lambda *args, **kwargs: batch)
    out = out or io.StringIO()
    call_command("run_payroll", "--planilla", "planilla_test", "--desde", "2024-01-01",
                 "--hasta", "2024-01-15", *extra, stdout=out)
    return out.getvalue()


@pytest.mark.django_db
def test_run_payroll_prints_the_batch_and_totals(company, monkeypatch):
    batch = finished_batch(company)
    assert f"Payroll batch {batch.pk} started" in run_payroll(monkeypatch, batch)
    output = run_payroll(monkeypatch, batch, "--wait", "--poll", "0.01")
    assert "10,000.00" in output and "8,481.67" in output and "12,350.00" in output


@pytest.mark.django_db
def test_run_payroll_wait_exits_1_and_lists_failures(company, monkeypatch):
    batch = finished_batch(company, failed_employee="emp_ghost")
    out = io.StringIO()
    with pytest.raises(SystemExit) as exit_info:
        run_payroll(monkeypatch, batch, "--wait", out=out)
    assert exit_info.value.code == 1
    assert "emp_ghost" in out.getvalue() and "Employee not found" in out.getvalue()


@pytest.mark.django_db
def test_run_payroll_turns_queue_errors_into_command_errors(monkeypatch):
    def refuse(*args, **kwargs):
        raise CoatiQueueError("A payroll batch for planilla_test is already running.")

    monkeypatch.setattr("coati_queue.payroll.start_payroll_batch", refuse)
    with pytest.raises(CommandError, match="already running"):
        call_command("run_payroll", planilla="planilla_test", desde=JAN_1, hasta=JAN_15)
