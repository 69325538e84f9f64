"""The payroll hooks coati_queue calls (see ``COATI_QUEUE["PAYROLL"]`` in settings).

* ``active_employee_ids``: who is paid in a period (the batch's fan-out list).
* ``calculate_and_store``: one employee, one period; safe to call again for the
  same employee (a retry overwrites its line, never duplicates it).
* ``calculate_many``: the same for a chunk of employees with one read and one write.

Unknown or inactive planillas/employees raise ``LookupError`` with a message
naming the id, which coati_queue records as the item's error.
"""

from __future__ import annotations

import datetime
from typing import Any, Iterable

from django.db.models import FilteredRelation, Q

from . import rules as rule_cache
from .calculation import LineFigures, amounts_as_strings, calculate_line
from .models import Employee, PayrollLine, Planilla

#: Columns rewritten when a line is computed again (everything but the key and created_at).
LINE_UPDATE_FIELDS = [
    "planilla", "period_start", "period_end", "days_worked",
    "gross", "inss_laboral", "ir", "total_deductions", "net",
    "inss_patronal", "inatec", "employer_cost",
    "ruleset_code", "calculated_by", "updated_at",
]

#: Result keys (Spanish, as the planilla's consumers expect them) of each figure.
RESULT_KEYS = {
    "gross": "salario_bruto",
    "inss_laboral": "inss_laboral",
    "ir": "ir",
    "total_deductions": "total_deducciones",
    "net": "salario_neto",
    "inss_patronal": "inss_patronal",
    "inatec": "inatec",
    "employer_cost": "costo_empleador",
}


def clear_caches() -> None:
    """Forget cached rule sets and head counts (call after changing them outside the ORM)."""
    rule_cache.clear_caches()


def clear_caches_on_change(sender: type, **kwargs: Any) -> None:
    """``post_save``/``post_delete`` receiver wired in ``PayrollConfig.ready``."""
    rule_cache.clear_caches()


def _to_date(value: datetime.date | str) -> datetime.date:
    """Accept dates or ISO strings: job arguments may have gone through JSON."""
    if isinstance(value, datetime.datetime):
        return value.date()
    if isinstance(value, datetime.date):
        return value
    return datetime.date.fromisoformat(str(value))


def active_employee_ids(planilla_id: str, periodo_inicio: datetime.date,
                        periodo_fin: datetime.date) -> list[str]:
    """Codes of the planilla's active employees employed on any day of the period.

    One query: a LEFT JOIN from the planilla to its filtered employees tells an
    unknown planilla (no row) from a planilla with nobody to pay (one NULL row).
    """
    start, end = _to_date(periodo_inicio), _to_date(periodo_fin)
    employed = Q(employees__active=True, employees__hire_date__lte=end) & (
        Q(employees__termination_date__isnull=True)
        | Q(employees__termination_date__gte=start)
    )
    codes = list(
        Planilla.objects.filter(code=planilla_id)
        .annotate(employed=FilteredRelation("employees", condition=employed))
        .order_by("employed__code")
        .values_list("employed__code", flat=True)
    )
    if not codes:
        raise LookupError(f"Planilla not found: {planilla_id}")
    return [code for code in codes if code is not None]


def _employees(planilla_id: str) -> Any:
    return Employee.objects.select_related("planilla__company").filter(planilla__code=planilla_id)


def _compute(employee: Employee, start: datetime.date, end: datetime.date, batch_id: int | None,
             usuario: str) -> tuple[PayrollLine, LineFigures]:
    """The employee's figures and the unsaved line holding them."""
    if not employee.active:
        raise LookupError(f"Employee inactive: {employee.code}")
    if employee.monthly_salary is None or employee.monthly_salary < 0:
        # The model's MinValueValidator is not a DB constraint (bulk writes skip it):
        # refuse to compute a negative payslip.
        raise ValueError(f"Invalid salary for {employee.code}: {employee.monthly_salary}")
    planilla = employee.planilla
    rules = rule_cache.rules_for_period(start, end)
    rate = rule_cache.employer_rate(rules, planilla.company_id,
                                    planilla.company.employer_size_override, start, end)
    figures = calculate_line(
        monthly_salary=employee.monthly_salary, periodicity=planilla.periodicity,
        period_start=start, period_end=end, hire_date=employee.hire_date,
        termination_date=employee.termination_date, rules=rules, employer_rate=rate,
    )
    if figures["days_worked"] == 0:
        raise LookupError(f"Employee not employed in the period: {employee.code}")
    line = PayrollLine(
        batch_id=batch_id, employee_id=employee.pk, planilla_id=planilla.pk,
        period_start=start, period_end=end, ruleset_code=rules.code,
        calculated_by=usuario or "", **figures,
    )
    return line, figures


def _result(employee_id: str, figures: LineFigures) -> dict[str, Any]:
    """The JSON-able result coati_queue stores on the item: amounts as exact strings."""
    amounts = amounts_as_strings(figures)
    result: dict[str, Any] = {"empleado_id": employee_id}
    result.update({RESULT_KEYS[name]: amounts[name] for name in RESULT_KEYS})
    result["dias"] = figures["days_worked"]
    return result


def _upsert_batch_lines(lines: list[PayrollLine]) -> None:
    """INSERT ... ON CONFLICT (batch, employee) DO UPDATE: one statement, retry-safe."""
    PayrollLine.objects.bulk_create(
        lines, batch_size=500, update_conflicts=True,
        unique_fields=["batch", "employee"], update_fields=LINE_UPDATE_FIELDS,
    )


def calculate_and_store(employee_id: str, planilla_id: str, periodo_inicio: datetime.date,
                        periodo_fin: datetime.date, batch_id: int | None = None,
                        usuario: str = "") -> dict:
    """Compute one employee's period and store it idempotently; return the figures.

    Inside a batch the line is keyed on (batch, employee); standalone (no batch)
    on (employee, period_start, period_end). Cost: one read, one write.
    """
    start, end = _to_date(periodo_inicio), _to_date(periodo_fin)
    try:
        employee = _employees(planilla_id).get(code=employee_id)
    except Employee.DoesNotExist:
        raise LookupError(f"Employee not found: {employee_id}") from None
    line, figures = _compute(employee, start, end, batch_id, usuario)
    if batch_id is not None:
        _upsert_batch_lines([line])
    else:
        # The standalone key is a partial unique index, which ON CONFLICT cannot target
        # portably, hence the read-then-write here.
        attnames = (PayrollLine._meta.get_field(name).attname for name in LINE_UPDATE_FIELDS
                    if name != "updated_at")
        defaults = {attname: getattr(line, attname) for attname in attnames}
        PayrollLine.objects.update_or_create(
            employee=employee, period_start=start, period_end=end, batch=None,
            defaults=defaults,
        )
    return _result(employee.code, figures)


def calculate_many(employee_ids: Iterable[str], planilla_id: str,
                   periodo_inicio: datetime.date, periodo_fin: datetime.date,
                   batch_id: int | None = None,
                   usuario: str = "") -> tuple[dict[str, dict], dict[str, Exception]]:
    """A chunk of employees: one read, one bulk upsert (per-line without a batch).

    Returns (results by employee id, exceptions by employee id); an employee that
    cannot be paid is reported in the errors, with the traceback that explains
    why, and does not stop the others.
    """
    ids = list(dict.fromkeys(str(employee_id) for employee_id in employee_ids))
    results: dict[str, dict] = {}
    errors: dict[str, Exception] = {}
    if batch_id is None:
        for employee_id in ids:
            try:
                results[employee_id] = calculate_and_store(
                    employee_id, planilla_id, periodo_inicio, periodo_fin, None, usuario)
            except LookupError as exc:
                errors[employee_id] = exc
        return results, errors

    start, end = _to_date(periodo_inicio), _to_date(periodo_fin)
    employees = {employee.code: employee
                 for employee in _employees(planilla_id).filter(code__in=ids)}
    lines: list[PayrollLine] = []
    for employee_id in ids:
        employee = employees.get(employee_id)
        if employee is None:
            errors[employee_id] = LookupError(f"Employee not found: {employee_id}")
            continue
        try:
            line, figures = _compute(employee, start, end, batch_id, usuario)
        except (LookupError, ValueError) as exc:  # this employee's data; the others go on
            errors[employee_id] = exc
            continue
        lines.append(line)
        results[employee_id] = _result(employee_id, figures)
    if lines:
        _upsert_batch_lines(lines)
    return results, errors
