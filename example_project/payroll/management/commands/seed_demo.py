"""``seed_demo``: a company, a planilla and N employees with realistic variety.

Repeatable: the same ``--seed`` gives the same employees. The mix exercises
every payroll rule in January 2024: salaries from minimum wage to above the
INSS ceiling, hires in mid-January (prorated), terminations during and before
the month, and inactive employees (who must be skipped).
"""

from __future__ import annotations

import datetime
import math
import random
import re
from decimal import Decimal
from typing import Any

from django.core.exceptions import ValidationError
from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db import transaction
from django.db.models import Q

from ...defaults import install_default_rules
from ...models import (Company, Employee, IncomeTaxBracket, PayrollLine, PayrollRuleSet,
                       Periodicity, Planilla, code_validator)
from ...services import clear_caches

MIN_SALARY = 9_000.0
MAX_SALARY = 250_000.0
MEDIAN_SALARY = 22_000.0
SALARY_SIGMA = 0.7
HIGH_EARNER_SHARE = 0.02     # managers between 150k and 250k (above the INSS ceiling)
NEW_HIRE_SHARE = 0.05        # hired 8–20 January 2024: prorated first pay
TERMINATED_SHARE = 0.03      # terminated in January 2024 (prorated) or in 2023 (not paid)
INACTIVE_SHARE = 0.02        # flagged inactive: never paid

FIRST_NAMES = [
    "José", "María", "Juan", "Ana", "Carlos", "Rosa", "Luis", "Carmen", "Jorge", "Martha",
    "Francisco", "Claudia", "Pedro", "Karla", "Miguel", "Lucía", "Róger", "Yadira", "Ernesto",
    "Fátima", "Denis", "Ileana", "Álvaro", "Scarleth", "Danilo", "Mayling", "Bayardo", "Xiomara",
]
LAST_NAMES = [
    "López", "García", "Martínez", "Pérez", "González", "Rodríguez", "Hernández", "Sánchez",
    "Reyes", "Castillo", "Mendoza", "Chamorro", "Espinoza", "Gutiérrez", "Obando", "Téllez",
    "Arana", "Zeledón", "Lacayo", "Somarriba", "Aguirre", "Baltodano", "Cuadra", "Urbina",
]

EMPLOYEE_CODE = re.compile(r"^emp_(\d+)$")


class Command(BaseCommand):
    help = "Create a demo company, planilla and employees for the payroll example."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--employees", type=int, default=1000,
                            help="How many employees to create (default 1000).")
        parser.add_argument("--seed", type=int, default=42,
                            help="Random seed: the same seed gives the same employees.")
        parser.add_argument("--planilla", default="planilla_demo",
                            help="Planilla code to create or reuse (default planilla_demo).")
        parser.add_argument("--company", default="Demo S.A.",
                            help='Company name to create or reuse (default "Demo S.A.").')
        parser.add_argument("--periodicity", default=Periodicity.BIWEEKLY,
                            choices=Periodicity.values, help="Planilla periodicity.")
        parser.add_argument("--reset", action="store_true",
                            help="Delete the planilla's employees (and their lines) first.")

    def handle(self, *args: Any, **options: Any) -> None:
        count: int = options["employees"]
        if count < 0:
            raise CommandError("--employees cannot be negative.")
        code: str = options["planilla"]
        try:
            code_validator(code)
        except ValidationError as exc:
            raise CommandError(f"Invalid --planilla {code!r}: {' '.join(exc.messages)}") from exc
        rng = random.Random(options["seed"])

        with transaction.atomic():
            if not PayrollRuleSet.objects.exists():  # e.g. after a flush
                ruleset = install_default_rules(PayrollRuleSet, IncomeTaxBracket)
                self.stdout.write(f"Installed the default payroll rule set {ruleset.code}.")
            company, _ = Company.objects.get_or_create(
                name=options["company"], defaults={"ruc": f"J{rng.randrange(10**13):013d}"})
            planilla, created = Planilla.objects.update_or_create(
                code=code,
                defaults={"name": f"Planilla {options['company']}", "company": company,
                          "periodicity": options["periodicity"], "active": True},
            )
            removed = self._reset(planilla) if options["reset"] else 0
            employees = build_employees(rng, planilla, count, first_number=next_employee_number())
            Employee.objects.bulk_create(employees, batch_size=1000)
        clear_caches()  # bulk_create sends no signals; head counts changed.

        self._report(company, planilla, created, removed, employees)

    def _reset(self, planilla: Planilla) -> int:
        PayrollLine.objects.filter(employee__planilla=planilla).delete()
        removed, _ = Employee.objects.filter(planilla=planilla).delete()
        return removed

    def _report(self, company: Company, planilla: Planilla, created: bool, removed: int,
                employees: list[Employee]) -> None:
        jan_start, jan_end = datetime.date(2024, 1, 1), datetime.date(2024, 1, 31)
        hired = sum(1 for e in employees if jan_start <= e.hire_date <= jan_end)
        terminated = sum(1 for e in employees if e.termination_date)
        inactive = sum(1 for e in employees if not e.active)
        above_ceiling = sum(1 for e in employees if e.monthly_salary > Decimal("191969.39"))
        total = Employee.objects.filter(planilla=planilla).count()
        if removed:
            self.stdout.write(f"Removed {removed} previous employees of {planilla.code}.")
        self.stdout.write(self.style.SUCCESS(
            f"{'Created' if created else 'Reused'} planilla {planilla.code} "
            f"({planilla.get_periodicity_display()}) of company {company.name} (id {company.pk})."
        ))
        self.stdout.write(
            f"Added {len(employees)} employees (planilla now has {total}): {hired} hired in "
            f"January 2024, {terminated} terminated, {inactive} inactive, "
            f"{above_ceiling} above the INSS ceiling."
        )
        period_end = "2024-01-31" if planilla.periodicity == Periodicity.MONTHLY else "2024-01-15"
        self.stdout.write(
            f"Next: python manage.py run_payroll --planilla {planilla.code} "
            f"--desde 2024-01-01 --hasta {period_end} --wait"
        )


def next_employee_number() -> int:
    """One past the highest ``emp_NNNNNN`` code, so several runs never collide."""
    highest = 0
    for code in Employee.objects.filter(Q(code__startswith="emp_")).values_list("code", flat=True):
        match = EMPLOYEE_CODE.match(code)
        if match:
            highest = max(highest, int(match.group(1)))
    return highest + 1


def random_salary(rng: random.Random) -> Decimal:
    """Log-normal around the median, clipped to [minimum, maximum], rounded to 50 NIO."""
    if rng.random() < HIGH_EARNER_SHARE:
        value = rng.uniform(150_000, MAX_SALARY)
    else:
        value = rng.lognormvariate(math.log(MEDIAN_SALARY), SALARY_SIGMA)
    value = min(max(value, MIN_SALARY), MAX_SALARY)
    return Decimal(round(value / 50) * 50).quantize(Decimal("0.01"))


def random_date(rng: random.Random, first: datetime.date, last: datetime.date) -> datetime.date:
    return first + datetime.timedelta(days=rng.randint(0, (last - first).days))


def build_employees(rng: random.Random, planilla: Planilla, count: int,
                    first_number: int) -> list[Employee]:
    """Unsaved employees; every random choice comes from ``rng`` (repeatable)."""
    employees = []
    for offset in range(count):
        hire_date = random_date(rng, datetime.date(2012, 1, 1), datetime.date(2023, 12, 31))
        termination_date = None
        active = True
        roll = rng.random()
        if roll < NEW_HIRE_SHARE:
            hire_date = random_date(rng, datetime.date(2024, 1, 8), datetime.date(2024, 1, 20))
        elif roll < NEW_HIRE_SHARE + TERMINATED_SHARE:
            termination_date = random_date(rng, max(hire_date, datetime.date(2023, 11, 1)),
                                           datetime.date(2024, 1, 25))
        elif roll < NEW_HIRE_SHARE + TERMINATED_SHARE + INACTIVE_SHARE:
            active = False
        employees.append(Employee(
            code=f"emp_{first_number + offset:06d}",
            planilla=planilla,
            first_name=rng.choice(FIRST_NAMES),
            last_name=f"{rng.choice(LAST_NAMES)} {rng.choice(LAST_NAMES)}",
            monthly_salary=random_salary(rng),
            hire_date=hire_date,
            termination_date=termination_date,
            active=active,
        ))
    return employees
