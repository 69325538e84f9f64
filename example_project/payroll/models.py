"""Payroll data: companies, planillas, employees, rule tables and computed lines.

Legal rates and the income-tax table are rows (``PayrollRuleSet`` and
``IncomeTaxBracket``), not constants in code, so a rate change is a new rule set
with a later ``valid_from``; past periods keep being computed with the old one.
"""

from __future__ import annotations

from decimal import Decimal

from django.core.validators import MinValueValidator, RegexValidator
from django.db import models
from django.db.models import Q
from django.utils.translation import gettext_lazy as _

# Planilla and employee codes travel through coati_queue as plain strings.
code_validator = RegexValidator(
    r"^[A-Za-z0-9_.-]+$",
    _("Use only letters, digits, dots, hyphens and underscores."),
)


class Periodicity(models.TextChoices):
    MONTHLY = "monthly", _("Monthly")
    BIWEEKLY = "biweekly", _("Biweekly")


class Company(models.Model):
    """An employer. Its head count decides the employer INSS rate."""

    name = models.CharField(_("name"), max_length=200, unique=True)
    ruc = models.CharField(_("RUC"), max_length=20, blank=True, default="",
                           help_text=_("Taxpayer number (Registro Único de Contribuyente)."))
    employer_size_override = models.PositiveIntegerField(
        _("head count override"), null=True, blank=True,
        help_text=_("Head count used for the employer INSS rate instead of counting the "
                    "active employees; leave empty to count them."),
    )

    class Meta:
        verbose_name = _("company")
        verbose_name_plural = _("companies")
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name


class Planilla(models.Model):
    """A payroll definition; its ``code`` is the planilla id coati_queue passes around."""

    code = models.CharField(_("code"), max_length=64, unique=True, validators=[code_validator])
    name = models.CharField(_("name"), max_length=200)
    company = models.ForeignKey(Company, on_delete=models.PROTECT, related_name="planillas",
                                verbose_name=_("company"))
    periodicity = models.CharField(_("periodicity"), max_length=16, choices=Periodicity.choices,
                                   default=Periodicity.BIWEEKLY)
    active = models.BooleanField(_("active"), default=True)

    class Meta:
        verbose_name = _("planilla")
        verbose_name_plural = _("planillas")
        ordering = ["code"]

    def __str__(self) -> str:
        return f"{self.code} ({self.name})"


class Employee(models.Model):
    """A worker on one planilla; ``code`` is the employee id coati_queue passes around."""

    code = models.CharField(_("code"), max_length=64, unique=True, validators=[code_validator])
    planilla = models.ForeignKey(Planilla, on_delete=models.PROTECT, related_name="employees",
                                 verbose_name=_("planilla"))
    first_name = models.CharField(_("first name"), max_length=100)
    last_name = models.CharField(_("last name"), max_length=100)
    monthly_salary = models.DecimalField(_("monthly salary"), max_digits=12, decimal_places=2,
                                         validators=[MinValueValidator(Decimal("0"))])
    hire_date = models.DateField(_("hire date"))
    termination_date = models.DateField(_("termination date"), null=True, blank=True)
    active = models.BooleanField(_("active"), default=True)

    class Meta:
        verbose_name = _("employee")
        verbose_name_plural = _("employees")
        ordering = ["code"]
        indexes = [
            models.Index(fields=["planilla", "active", "code"], name="payroll_emp_planilla_active"),
        ]
        constraints = [
            models.CheckConstraint(
                condition=Q(termination_date__isnull=True)
                | Q(termination_date__gte=models.F("hire_date")),
                name="payroll_emp_terminated_after_hire",
            ),
        ]

    def __str__(self) -> str:
        return f"{self.code} {self.full_name}"

    @property
    def full_name(self) -> str:
        return f"{self.first_name} {self.last_name}".strip()


class PayrollRuleSet(models.Model):
    """Legal rates in force from ``valid_from`` until the next rule set starts."""

    code = models.CharField(_("code"), max_length=32, unique=True)
    description = models.CharField(_("description"), max_length=255, blank=True, default="")
    valid_from = models.DateField(_("valid from"), unique=True)
    inss_laboral_rate = models.DecimalField(
        _("employee INSS rate"), max_digits=6, decimal_places=4, default=Decimal("0.0700"))
    inss_ceiling_monthly = models.DecimalField(
        _("monthly INSS contribution ceiling"), max_digits=12, decimal_places=2,
        default=Decimal("191969.39"))
    inss_patronal_rate = models.DecimalField(
        _("employer INSS rate"), max_digits=6, decimal_places=4, default=Decimal("0.2150"))
    inss_patronal_rate_large = models.DecimalField(
        _("employer INSS rate (large employers)"), max_digits=6, decimal_places=4,
        default=Decimal("0.2250"))
    inss_patronal_large_threshold = models.PositiveIntegerField(
        _("large employer threshold (employees)"), default=50,
        help_text=_("Companies with at least this many active employees pay the large rate."))
    inatec_rate = models.DecimalField(
        _("INATEC rate"), max_digits=6, decimal_places=4, default=Decimal("0.0200"))

    class Meta:
        verbose_name = _("payroll rule set")
        verbose_name_plural = _("payroll rule sets")
        ordering = ["-valid_from"]

    def __str__(self) -> str:
        return f"{self.code} ({self.valid_from})"


class IncomeTaxBracket(models.Model):
    """One row of the annual progressive IR table: tax = base_tax + rate × (income − lower)."""

    ruleset = models.ForeignKey(PayrollRuleSet, on_delete=models.CASCADE, related_name="brackets",
                                verbose_name=_("rule set"))
    lower = models.DecimalField(_("from (annual)"), max_digits=14, decimal_places=2)
    upper = models.DecimalField(_("up to (annual)"), max_digits=14, decimal_places=2,
                                null=True, blank=True, help_text=_("Empty: no upper limit."))
    base_tax = models.DecimalField(_("base tax"), max_digits=14, decimal_places=2,
                                   default=Decimal("0"))
    rate = models.DecimalField(_("rate on the excess"), max_digits=6, decimal_places=4)

    class Meta:
        verbose_name = _("income tax bracket")
        verbose_name_plural = _("income tax brackets")
        ordering = ["ruleset", "lower"]
        constraints = [
            models.UniqueConstraint(fields=["ruleset", "lower"],
                                    name="payroll_bracket_unique_lower"),
        ]

    def __str__(self) -> str:
        upper = self.upper if self.upper is not None else "∞"
        percent = f"{self.rate * 100:.2f}".rstrip("0").rstrip(".")
        return f"{self.lower} – {upper}: {self.base_tax} + {percent}%"


class PayrollLine(models.Model):
    """The computed pay of one employee for one period, inside a batch or standalone."""

    batch = models.ForeignKey("coati_queue.PayrollBatch", null=True, blank=True,
                              on_delete=models.CASCADE, related_name="+",
                              verbose_name=_("batch"))
    employee = models.ForeignKey(Employee, on_delete=models.PROTECT, related_name="payroll_lines",
                                 verbose_name=_("employee"))
    planilla = models.ForeignKey(Planilla, on_delete=models.PROTECT, related_name="payroll_lines",
                                 verbose_name=_("planilla"))
    period_start = models.DateField(_("period start"))
    period_end = models.DateField(_("period end"))
    days_worked = models.PositiveSmallIntegerField(_("days worked"))
    gross = models.DecimalField(_("gross salary"), max_digits=14, decimal_places=2)
    inss_laboral = models.DecimalField(_("employee INSS"), max_digits=14, decimal_places=2)
    ir = models.DecimalField(_("income tax (IR)"), max_digits=14, decimal_places=2)
    total_deductions = models.DecimalField(_("total deductions"), max_digits=14, decimal_places=2)
    net = models.DecimalField(_("net salary"), max_digits=14, decimal_places=2)
    inss_patronal = models.DecimalField(_("employer INSS"), max_digits=14, decimal_places=2)
    inatec = models.DecimalField(_("INATEC"), max_digits=14, decimal_places=2)
    employer_cost = models.DecimalField(_("employer cost"), max_digits=14, decimal_places=2)
    ruleset_code = models.CharField(_("rule set"), max_length=32, blank=True, default="")
    calculated_by = models.CharField(_("calculated by"), max_length=150, blank=True, default="")
    created_at = models.DateTimeField(_("created at"), auto_now_add=True)
    updated_at = models.DateTimeField(_("updated at"), auto_now=True)

    class Meta:
        verbose_name = _("payroll line")
        verbose_name_plural = _("payroll lines")
        ordering = ["period_start", "employee"]
        constraints = [
            models.UniqueConstraint(fields=["batch", "employee"],
                                    name="payroll_line_one_per_batch_employee"),
            models.UniqueConstraint(fields=["employee", "period_start", "period_end"],
                                    condition=Q(batch__isnull=True),
                                    name="payroll_line_one_standalone_per_period"),
        ]
        indexes = [
            models.Index(fields=["planilla", "period_start", "period_end"],
                         name="payroll_line_planilla_period"),
        ]

    def __str__(self) -> str:
        return f"{self.employee_id} {self.period_start}..{self.period_end}: {self.net}"
