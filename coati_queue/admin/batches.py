"""Payroll batches in the admin: progress columns, live change page, retry/cancel, start form.

Batch rows are written concurrently by workers (counters, status), so the
admin never saves a batch: every field is read-only and a POST to the change
form is refused. State changes go through the model's transitions
(``retry_failed``, ``cancel``) behind a confirmation page each.
"""

from __future__ import annotations

from typing import Any, Callable

from django import forms
from django.contrib import admin, messages
from django.contrib.admin.widgets import AdminDateWidget
from django.core.exceptions import PermissionDenied
from django.db.models import Count, F, Func, QuerySet, TextField, Value, Window
from django.db.models.functions import Cast, Concat, Replace, RowNumber, Trim
from django.http import HttpRequest, HttpResponse, HttpResponseRedirect, JsonResponse
from django.shortcuts import get_object_or_404
from django.template.response import TemplateResponse
from django.urls import NoReverseMatch, URLPattern, path, reverse
from django.utils.html import format_html, format_html_join
from django.utils.safestring import mark_safe
from django.utils.translation import gettext, gettext_lazy as _

from ..models import ACTIVE_BATCH_STATES, ItemStatus, PayrollBatch, PayrollItem
from . import display
from .readonly import ReadOnlyPostMixin

FAILED_ITEMS_PER_ERROR = 25
FAILED_ERROR_GROUPS = 50
EMPLOYEE_PLACEHOLDER = "…"


# Where an employee id stands as a word of an error message: after a space or an
# opening bracket or quote, before a space, punctuation or the closing one.
ID_DELIMITERS = ((" ", " "), (" ", ":"), (" ", ","), (" ", "."), (" ", ";"), (" ", ")"),
                 ("(", ")"), ("'", "'"), ('"', '"'))


def error_kind() -> Func:
    """The error with the item's own employee id masked where it stands as a word.

    Host errors usually name the employee ("Employee inactive: emp_7"); masked,
    one kind of error is one group, not one per employee. Only whole words are
    masked, so employee 1 does not turn "salary 1500.00" into "salary …500.00".
    """
    padded: Func = Concat(Value(" "), F("error"), Value(" "), output_field=TextField())
    employee = Cast("employee_id", TextField())
    for before, after in ID_DELIMITERS:
        padded = Replace(padded, Concat(Value(before), employee, Value(after),
                                        output_field=TextField()),
                         Value(f"{before}{EMPLOYEE_PLACEHOLDER}{after}"),
                         output_field=TextField())
    return Trim(padded)


def failed_item_groups(batch: PayrollBatch, *,
                       task_links: bool = True) -> list[dict[str, Any]]:
    """Failed items grouped by error: one windowed query, bounded per error.

    Each row carries its group's size (a window COUNT), and only the first
    ``FAILED_ITEMS_PER_ERROR`` items of each error are fetched (ROW_NUMBER),
    so a batch with 10,000 identical failures costs one small query.
    """
    rows = (PayrollItem.objects.filter(batch=batch, status=ItemStatus.FAILED)
            .annotate(kind=error_kind())
            .annotate(group_size=Window(Count("pk"), partition_by=[F("kind")]),
                      row=Window(RowNumber(), partition_by=[F("kind")],
                                 order_by=[F("employee_id").asc(), F("pk").asc()]))
            .filter(row__lte=FAILED_ITEMS_PER_ERROR)
            .order_by("-group_size", "kind", "row")
            .values_list("kind", "group_size", "employee_id", "task_id", "pk"))
    groups: dict[str, dict[str, Any]] = {}
    for error, size, employee_id, task_id, item_pk in rows:
        group = groups.setdefault(error, {"error": error, "count": size, "items": []})
        group["items"].append({
            "employee_id": employee_id, "pk": item_pk,
            "item_url": reverse("admin:coati_queue_payrollitem_change", args=[item_pk]),
            "task_url": reverse("admin:coati_queue_taskresult_change", args=[task_id])
            if task_id and task_links else "",
        })
    ordered = list(groups.values())[:FAILED_ERROR_GROUPS]
    for group in ordered:
        group["more"] = max(group["count"] - len(group["items"]), 0)
    return ordered


def progress_url(batch_pk: int) -> str:
    """The public JSON endpoint when the project mounts coati_queue.urls, else the admin's."""
    try:
        return reverse("coati_queue:batch-progress", args=[batch_pk])
    except NoReverseMatch:
        return reverse("admin:coati_queue_payrollbatch_progress", args=[batch_pk])


class StartPayrollForm(forms.Form):
    """The three inputs of ``start_payroll_batch``; the rest comes from the request."""

    planilla_id = forms.CharField(label=_("Planilla"), max_length=64,
                                  help_text=_("The planilla code, e.g. planilla_demo."))
    periodo_inicio = forms.DateField(label=_("Period start"), widget=AdminDateWidget)
    periodo_fin = forms.DateField(label=_("Period end"), widget=AdminDateWidget)

    def clean(self) -> dict[str, Any]:
        data = super().clean()
        start, end = data.get("periodo_inicio"), data.get("periodo_fin")
        if start and end and start > end:
            raise forms.ValidationError(_("The period start must not be after its end."))
        return data


class PayrollItemAdmin(ReadOnlyPostMixin, admin.ModelAdmin):
    """Per-employee outcome, read-only: items change only through their batch."""

    list_display = ["employee_id", "batch_link", "status", "attempts", "short_error", "task_link",
                    "started_at", "finished_at"]
    list_filter = ["status"]
    search_fields = ["employee_id", "error"]
    list_select_related = ["batch"]
    list_per_page = 100
    show_full_result_count = False
    fields = ["batch_link", "employee_id", "status", "attempts", "error_block", "traceback_block",
              "result_block", "task_link", "all_tasks", "started_at", "finished_at"]

    def get_readonly_fields(self, request: HttpRequest, obj: Any = None) -> list[str]:
        return list(self.fields)

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_view_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        """Whoever may see a batch may open its employees (the errors and tracebacks)."""
        return (super().has_view_permission(request, obj)
                or request.user.has_perm("coati_queue.view_payrollbatch"))

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False  # items go with their batch (see PayrollBatchAdmin.get_deleted_objects)

    @admin.display(description=_("batch"), ordering="batch")
    def batch_link(self, obj: PayrollItem) -> str:
        url = reverse("admin:coati_queue_payrollbatch_change", args=[obj.batch_id])
        return format_html('<a href="{}">#{} {}</a>', url, obj.batch_id, obj.batch.planilla_id)

    @admin.display(description=_("error"))
    def short_error(self, obj: PayrollItem) -> str:
        return obj.error if len(obj.error) <= 80 else obj.error[:79] + "…"

    @admin.display(description=_("error"))
    def error_block(self, obj: PayrollItem) -> str:
        return display.pre_block(obj.error)

    @admin.display(description=_("traceback"))
    def traceback_block(self, obj: PayrollItem) -> str:
        return display.pre_block(obj.traceback)

    @admin.display(description=_("result"))
    def result_block(self, obj: PayrollItem) -> str:
        return display.json_block(obj.result)

    @admin.display(description=_("last task"))
    def task_link(self, obj: PayrollItem) -> str:
        if not obj.task_id:
            return display.EMPTY
        url = reverse("admin:coati_queue_taskresult_change", args=[obj.task_id])
        return format_html('<a href="{}">{}</a>', url, obj.task_id)

    @admin.display(description=_("task records (all attempts)"))
    def all_tasks(self, obj: PayrollItem) -> str:
        ids = list(obj.tasks.values_list("pk", flat=True)[:50])
        if not ids:
            return display.EMPTY
        return format_html_join(
            mark_safe("<br>"), '<a href="{}">{}</a>',
            ((reverse("admin:coati_queue_taskresult_change", args=[pk]), pk) for pk in ids))


class PayrollBatchAdmin(ReadOnlyPostMixin, admin.ModelAdmin):
    list_display = ["planilla_id", "period", "requested_by_display", "status_display",
                    "progress_display", "failed", "rate_display", "eta_display",
                    "started_display", "finished_display"]
    list_display_links = ["planilla_id"]
    list_filter = ["status", "created_at"]
    search_fields = ["planilla_id"]
    list_select_related = ["requested_by"]
    change_form_template = "admin/coati_queue/payrollbatch/change_form.html"
    change_list_template = "admin/coati_queue/payrollbatch/change_list.html"

    class Media:
        css = {"all": ["coati_queue/admin.css"]}

    # -- permissions ------------------------------------------------------
    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        """A running batch is cancelled, not deleted (workers still hold its items)."""
        if obj is not None and obj.status in ACTIVE_BATCH_STATES:
            return False
        return super().has_delete_permission(request, obj)

    def get_deleted_objects(self, objs: Any, request: HttpRequest) -> tuple:
        """Items are not deletable on their own, but they go with their batch."""
        deleted, counts, perms_needed, protected = super().get_deleted_objects(objs, request)
        perms_needed.discard(PayrollItem._meta.verbose_name)
        return deleted, counts, perms_needed, protected

    def delete_queryset(self, request: HttpRequest, queryset: QuerySet) -> None:
        super().delete_queryset(request, queryset.exclude(status__in=ACTIVE_BATCH_STATES))

    # -- changelist columns -----------------------------------------------
    @staticmethod
    def _progress(obj: PayrollBatch) -> dict[str, Any]:
        cached = getattr(obj, "_coati_progress", None)
        if cached is None:
            cached = obj._coati_progress = obj.progress()
        return cached

    @admin.display(description=_("period"), ordering="periodo_inicio")
    def period(self, obj: PayrollBatch) -> str:
        return format_html('<span class="coati-nowrap">{} – {}</span>', obj.periodo_inicio,
                           obj.periodo_fin)

    @admin.display(description=_("started at"), ordering="started_at")
    def started_display(self, obj: PayrollBatch) -> str:
        return display.short_datetime(obj.started_at)

    @admin.display(description=_("finished at"), ordering="finished_at")
    def finished_display(self, obj: PayrollBatch) -> str:
        return display.short_datetime(obj.finished_at)

    @admin.display(description=_("requested by"), ordering="requested_by_name")
    def requested_by_display(self, obj: PayrollBatch) -> str:
        if obj.requested_by_name:
            return obj.requested_by_name
        return obj.requested_by.get_username() if obj.requested_by else display.EMPTY

    @admin.display(description=_("status"), ordering="status")
    def status_display(self, obj: PayrollBatch) -> str:
        return display.status_badge(obj.status, obj.get_status_display())

    @admin.display(description=_("progress"))
    def progress_display(self, obj: PayrollBatch) -> str:
        return display.progress_bar(self._progress(obj))

    @admin.display(description=_("rate"))
    def rate_display(self, obj: PayrollBatch) -> str:
        return display.format_rate(self._progress(obj)["rate_per_second"])

    @admin.display(description=_("ETA"))
    def eta_display(self, obj: PayrollBatch) -> str:
        return display.format_seconds(self._progress(obj)["eta_seconds"])

    # -- URLs ---------------------------------------------------------------
    def get_urls(self) -> list[URLPattern]:
        info = self.opts.app_label, self.opts.model_name
        wrap: Callable[..., Any] = self.admin_site.admin_view
        return [
            path("start/", wrap(self.start_view), name="%s_%s_start" % info),
            path("<int:object_id>/retry/", wrap(self.retry_view), name="%s_%s_retry" % info),
            path("<int:object_id>/cancel/", wrap(self.cancel_view), name="%s_%s_cancel" % info),
            path("<int:object_id>/progress/", wrap(self.progress_view),
                 name="%s_%s_progress" % info),
        ] + super().get_urls()

    def add_view(self, request: HttpRequest, form_url: str = "",
                 extra_context: dict | None = None) -> HttpResponse:
        """Batches are started, not typed in: "Add" leads to the start form."""
        return HttpResponseRedirect(reverse("admin:coati_queue_payrollbatch_start"))

    def changelist_view(self, request: HttpRequest,
                        extra_context: dict | None = None) -> HttpResponse:
        context = {"start_payroll_url": reverse("admin:coati_queue_payrollbatch_start")
                   if self.has_add_permission(request) else "",
                   "overview_url": reverse("admin:coati_queue_taskresult_overview")
                   if request.user.has_perm("coati_queue.view_taskresult") else "",
                   **(extra_context or {})}
        return super().changelist_view(request, extra_context=context)

    def change_view(self, request: HttpRequest, object_id: str, form_url: str = "",
                    extra_context: dict | None = None) -> HttpResponse:
        batch = self.get_object(request, object_id)
        context = dict(extra_context or {})
        if batch is not None and self.has_view_or_change_permission(request, batch):
            progress = batch.progress()
            can_change = self.has_change_permission(request, batch)
            context.update({
                "progress": progress,
                "progress_bar": display.progress_bar(progress),
                "progress_text": display.progress_text(
                    progress["completed"] + progress["failed"], progress["total"],
                    progress["progress_percentage"]),
                "rate_text": display.format_rate(progress["rate_per_second"]),
                "eta_text": display.format_seconds(progress["eta_seconds"]),
                "is_active": batch.status in ACTIVE_BATCH_STATES,
                "progress_url": progress_url(batch.pk),
                "progress_i18n": display.progress_i18n(),
                "failed_groups": failed_item_groups(batch, task_links=request.user.has_perm(
                    "coati_queue.view_taskresult")) if batch.failed else [],
                "items_url": reverse("admin:coati_queue_payrollitem_changelist")
                + f"?batch__id__exact={batch.pk}",
                "can_retry": can_change and batch.failed > 0
                and batch.status not in ACTIVE_BATCH_STATES,
                "can_cancel": can_change and batch.status in ACTIVE_BATCH_STATES,
            })
        return super().change_view(request, object_id, form_url, extra_context=context)

    # -- custom views -------------------------------------------------------
    def _batch_or_403(self, request: HttpRequest, object_id: int, change: bool) -> PayrollBatch:
        batch = get_object_or_404(PayrollBatch, pk=object_id)
        allowed = (self.has_change_permission(request, batch) if change
                   else self.has_view_or_change_permission(request, batch))
        if not allowed:
            raise PermissionDenied
        return batch

    def progress_view(self, request: HttpRequest, object_id: int) -> JsonResponse:
        """Same JSON as /queue/batches/<id>/progress/, for projects that only mount the admin."""
        return JsonResponse(self._batch_or_403(request, object_id, change=False).progress())

    def retry_view(self, request: HttpRequest, object_id: int) -> HttpResponse:
        batch = self._batch_or_403(request, object_id, change=True)
        return self._confirm(
            request, batch, title=gettext("Retry failed items"),
            question=gettext("Re-enqueue the %(failed)s failed items of this batch? Items "
                             "that succeeded are not computed again.") % {"failed": batch.failed},
            button=gettext("Yes, retry failed items"), perform=self._perform_retry)

    def cancel_view(self, request: HttpRequest, object_id: int) -> HttpResponse:
        batch = self._batch_or_403(request, object_id, change=True)
        return self._confirm(
            request, batch, title=gettext("Cancel batch"),
            question=gettext("Cancel this batch? Pending items will not run; items being "
                             "computed right now finish."),
            button=gettext("Yes, cancel the batch"), perform=self._perform_cancel)

    def _confirm(self, request: HttpRequest, batch: PayrollBatch, *, title: str, question: str,
                 button: str, perform: Callable[[HttpRequest, PayrollBatch], None]
                 ) -> HttpResponse:
        """GET: the confirmation page. POST (CSRF-checked by the middleware): do it."""
        change_url = reverse("admin:coati_queue_payrollbatch_change", args=[batch.pk])
        if request.method == "POST":
            perform(request, batch)
            return HttpResponseRedirect(change_url)
        context = {**self.admin_site.each_context(request), "opts": self.opts,
                   "object": batch, "title": title, "question": question, "button": button,
                   "change_url": change_url, "progress": batch.progress()}
        return TemplateResponse(request, "admin/coati_queue/payrollbatch/confirm_action.html",
                                context)

    def _perform_retry(self, request: HttpRequest, batch: PayrollBatch) -> None:
        from ..payroll import PayrollError

        try:
            moved = batch.retry_failed()
        except PayrollError as exc:
            self.message_user(request, str(exc), messages.ERROR)
            return
        if moved:
            self.message_user(request, gettext("%(count)s failed items were re-enqueued.")
                              % {"count": moved}, messages.SUCCESS)
        else:
            self.message_user(request, gettext("There were no failed items to retry."),
                              messages.WARNING)

    def _perform_cancel(self, request: HttpRequest, batch: PayrollBatch) -> None:
        from ..payroll import PayrollError

        try:
            cancelled = batch.cancel()
        except PayrollError as exc:
            self.message_user(request, str(exc), messages.ERROR)
            return
        if cancelled:
            self.message_user(request, gettext("The batch was cancelled."), messages.SUCCESS)
        else:
            self.message_user(request, gettext("The batch had already finished; nothing was "
                                               "cancelled."), messages.WARNING)

    def start_view(self, request: HttpRequest) -> HttpResponse:
        """The "Start payroll" form: errors of ``start_payroll_batch`` show in the form."""
        if not self.has_add_permission(request):
            raise PermissionDenied
        from ..payroll import PayrollError, start_payroll_batch

        form = StartPayrollForm(request.POST or None)
        if request.method == "POST" and form.is_valid():
            try:
                batch = start_payroll_batch(
                    form.cleaned_data["planilla_id"], form.cleaned_data["periodo_inicio"],
                    form.cleaned_data["periodo_fin"], requested_by=request.user,
                    usuario=request.user.get_username())
            except PayrollError as exc:
                form.add_error(None, str(exc))
            else:
                self.log_addition(request, batch, [{"added": {}}])
                self.message_user(request, gettext("Payroll batch #%(id)s started.")
                                  % {"id": batch.pk}, messages.SUCCESS)
                return HttpResponseRedirect(
                    reverse("admin:coati_queue_payrollbatch_change", args=[batch.pk]))
        context = {**self.admin_site.each_context(request), "opts": self.opts,
                   "title": display.START_PAYROLL, "form": form,
                   "media": self.media + form.media}
        return TemplateResponse(request, "admin/coati_queue/payrollbatch/start_payroll.html",
                                context)
