"""Admin for the payroll data; computed lines are read-only (batches write them)."""

from __future__ import annotations

from django.contrib import admin
from django.db.models import Count, QuerySet
from django.http import HttpRequest
from django.utils.translation import gettext_lazy as _

from .models import Company, Employee, IncomeTaxBracket, PayrollLine, PayrollRuleSet, Planilla


@admin.register(Company)
class CompanyAdmin(admin.ModelAdmin):
    list_display = ["name", "ruc", "employer_size_override"]
    search_fields = ["name", "ruc"]


@admin.register(Planilla)
class PlanillaAdmin(admin.ModelAdmin):
    list_display = ["code", "name", "company", "periodicity", "active", "employee_count"]
    list_filter = ["active", "periodicity", "company"]
    search_fields = ["code", "name"]
    list_select_related = ["company"]

    def get_queryset(self, request: HttpRequest) -> QuerySet:
        return super().get_queryset(request).annotate(_employee_count=Count("employees"))

    @admin.display(description=_("employees"), ordering="_employee_count")
    def employee_count(self, obj: Planilla) -> int:
        return obj._employee_count


@admin.register(Employee)
class EmployeeAdmin(admin.ModelAdmin):
    list_display = ["code", "full_name", "planilla", "monthly_salary", "hire_date",
                    "termination_date", "active"]
    list_filter = ["active", "planilla"]
    search_fields = ["code", "first_name", "last_name"]
    list_select_related = ["planilla"]
    date_hierarchy = "hire_date"
    autocomplete_fields = ["planilla"]

    @admin.display(description=_("name"), ordering="last_name")
    def full_name(self, obj: Employee) -> str:
        return obj.full_name


class IncomeTaxBracketInline(admin.TabularInline):
    model = IncomeTaxBracket
    extra = 0


@admin.register(PayrollRuleSet)
class PayrollRuleSetAdmin(admin.ModelAdmin):
    list_display = ["code", "valid_from", "inss_laboral_rate", "inss_ceiling_monthly",
                    "inss_patronal_rate", "inss_patronal_rate_large", "inatec_rate"]
    inlines = [IncomeTaxBracketInline]


@admin.register(PayrollLine)
class PayrollLineAdmin(admin.ModelAdmin):
    list_display = ["employee", "batch", "planilla", "period_start", "period_end", "days_worked",
                    "gross", "inss_laboral", "ir", "net", "employer_cost"]
    list_filter = ["planilla", "period_start"]
    search_fields = ["employee__code", "employee__first_name", "employee__last_name"]
    list_select_related = ["employee", "planilla", "batch"]
    date_hierarchy = "period_start"
    show_full_result_count = False

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: PayrollLine | None = None) -> bool:
        return False
