"""Nicaraguan payroll arithmetic: pure functions, ``Decimal`` everywhere, no database.

Every amount is rounded to cents with ROUND_HALF_UP once, where it is
determined; later figures are built from the rounded ones, so a payslip always
adds up (net = gross − INSS − IR to the cent).

Conventions (one period = one payslip):

* Gross pay uses the 30-day commercial month (Código del Trabajo): a monthly
  planilla pays 30 days per period, a biweekly one 15 days, and one day is worth
  ``monthly_salary / 30`` whatever the calendar month.
* INSS (employee 7 %, employer 21.5 % / 22.5 %) is charged on the gross capped at
  the contribution ceiling for the period (the monthly ceiling, or half of it for
  a biweekly period). INATEC (2 %) is charged on the whole gross.
* IR (income tax) projects the period's taxable income (gross − employee INSS)
  to a year (×12 monthly, ×24 biweekly), applies the annual progressive table
  and divides the annual tax back by the same factor.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from decimal import ROUND_HALF_UP, Decimal
from typing import Iterable, TypedDict

CENT = Decimal("0.01")
ZERO = Decimal("0")
COMMERCIAL_MONTH_DAYS = 30

#: Days paid by one full period, on the 30-day commercial month.
PERIOD_DAYS: dict[str, int] = {"monthly": 30, "biweekly": 15}
#: Periods per year, to project a period's income to the annual IR table.
PERIODS_PER_YEAR: dict[str, int] = {"monthly": 12, "biweekly": 24}

#: The amount keys of a line, in payslip order (``days_worked`` is the only non-amount).
AMOUNT_FIELDS: tuple[str, ...] = (
    "gross", "inss_laboral", "ir", "total_deductions", "net",
    "inss_patronal", "inatec", "employer_cost",
)


def money(value: Decimal | int | str) -> Decimal:
    """Round to cents, half up (how payslips and INSS forms round)."""
    return Decimal(value).quantize(CENT, rounding=ROUND_HALF_UP)


@dataclass(frozen=True)
class TaxBracket:
    """One row of the annual IR table: ``base_tax + rate × (income − lower)``."""

    lower: Decimal
    upper: Decimal | None
    base_tax: Decimal
    rate: Decimal


@dataclass(frozen=True)
class Rules:
    """An immutable snapshot of one ``PayrollRuleSet`` and its brackets.

    Immutable so one instance can be cached per process and shared by threads.
    """

    code: str
    inss_laboral_rate: Decimal
    inss_ceiling_monthly: Decimal
    inss_patronal_rate: Decimal
    inss_patronal_rate_large: Decimal
    inss_patronal_large_threshold: int
    inatec_rate: Decimal
    brackets: tuple[TaxBracket, ...]

    def __post_init__(self) -> None:
        if not self.brackets:
            raise ValueError(f"Rule set {self.code} has no income tax brackets.")
        ordered = tuple(sorted(self.brackets, key=lambda bracket: bracket.lower))
        object.__setattr__(self, "brackets", ordered)

    def employer_rate(self, head_count: int) -> Decimal:
        """Employer INSS rate for a company with ``head_count`` active employees."""
        if head_count >= self.inss_patronal_large_threshold:
            return self.inss_patronal_rate_large
        return self.inss_patronal_rate


class LineFigures(TypedDict):
    """The computed figures of one employee for one period."""

    days_worked: int
    gross: Decimal
    inss_laboral: Decimal
    ir: Decimal
    total_deductions: Decimal
    net: Decimal
    inss_patronal: Decimal
    inatec: Decimal
    employer_cost: Decimal


def period_days(periodicity: str) -> int:
    try:
        return PERIOD_DAYS[periodicity]
    except KeyError:
        raise ValueError(f"Unknown periodicity {periodicity!r}; expected one of "
                         f"{', '.join(PERIOD_DAYS)}.") from None


def days_worked(period_start: datetime.date, period_end: datetime.date, periodicity: str,
                hire_date: datetime.date,
                termination_date: datetime.date | None = None) -> int:
    """Days to pay in the period, on the 30-day commercial month.

    * Employed for the whole period (hired on or before its first day, not
      terminated before its last day): the full period, 30 days monthly or
      15 days biweekly, so February and 31-day months pay exactly the salary.
    * Hired or terminated inside the period: the calendar days from
      max(hire, start) to min(termination, end), both included, capped at the
      period's days (the 16th–31st fortnight has 16 calendar days but pays 15).
    * Not employed on any day of the period: 0.
    """
    full = period_days(periodicity)
    if period_end < period_start:
        raise ValueError(f"Period end {period_end} is before its start {period_start}.")
    first = max(hire_date, period_start)
    last = min(termination_date, period_end) if termination_date else period_end
    if last < first:
        return 0
    if first == period_start and last == period_end:
        return full
    return min((last - first).days + 1, full)


def prorated_gross(monthly_salary: Decimal, days: int) -> Decimal:
    """Gross pay for ``days`` commercial days: one day is a thirtieth of the monthly salary.

    With the period's full days this is the salary (monthly) or half of it (biweekly).
    """
    return money(Decimal(monthly_salary) * days / COMMERCIAL_MONTH_DAYS)


def period_inss_ceiling(rules: Rules, periodicity: str) -> Decimal:
    """The contribution ceiling of one period: monthly, or half of it for a fortnight."""
    return rules.inss_ceiling_monthly * period_days(periodicity) / COMMERCIAL_MONTH_DAYS


def annual_income_tax(annual_taxable: Decimal, brackets: Iterable[TaxBracket]) -> Decimal:
    """Tax on an annual taxable income with the progressive table (unrounded)."""
    if annual_taxable <= ZERO:
        return ZERO
    ordered = sorted(brackets, key=lambda bracket: bracket.lower)
    if not ordered:
        raise ValueError("The income tax table is empty.")
    # The table is continuous, so the bracket is the last one starting below the income.
    applicable = ordered[0]
    for bracket in ordered:
        if annual_taxable > bracket.lower:
            applicable = bracket
    excess = max(annual_taxable - applicable.lower, ZERO)
    return applicable.base_tax + excess * applicable.rate


def period_income_tax(taxable: Decimal, periodicity: str, rules: Rules) -> Decimal:
    """IR withheld in one period: annualise, apply the table, divide back, round."""
    factor = PERIODS_PER_YEAR[periodicity]
    return money(annual_income_tax(taxable * factor, rules.brackets) / factor)


def calculate_line(*, monthly_salary: Decimal, periodicity: str, period_start: datetime.date,
                   period_end: datetime.date, hire_date: datetime.date,
                   termination_date: datetime.date | None, rules: Rules,
                   employer_rate: Decimal) -> LineFigures:
    """All figures of one employee for one period.

    ``employer_rate`` is passed in (see ``Rules.employer_rate``) because it
    depends on the company's head count, which this pure function cannot count.
    """
    days = days_worked(period_start, period_end, periodicity, hire_date, termination_date)
    gross = prorated_gross(monthly_salary, days)
    inss_base = min(gross, period_inss_ceiling(rules, periodicity))
    inss_laboral = money(inss_base * rules.inss_laboral_rate)
    ir = period_income_tax(gross - inss_laboral, periodicity, rules)
    total_deductions = inss_laboral + ir
    inss_patronal = money(inss_base * employer_rate)
    inatec = money(gross * rules.inatec_rate)
    return LineFigures(
        days_worked=days,
        gross=gross,
        inss_laboral=inss_laboral,
        ir=ir,
        total_deductions=total_deductions,
        net=gross - total_deductions,
        inss_patronal=inss_patronal,
        inatec=inatec,
        employer_cost=gross + inss_patronal + inatec,
    )


def amounts_as_strings(figures: LineFigures) -> dict[str, str]:
    """The amounts as exact strings ("12345.67"): JSON-able without float rounding."""
    return {name: f"{figures[name]:.2f}" for name in AMOUNT_FIELDS}
