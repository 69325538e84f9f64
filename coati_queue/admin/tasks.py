"""Task records and worker heartbeats in the admin, and the queue overview page.

Task records are the queue's own bookkeeping, so the form is read-only for
everyone. The change permission still matters: it is what the retry actions
require, hence ``has_change_permission`` stays the real one while every field
is read-only and a POST to the form is refused.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from typing import Any, Iterable

from django.contrib import admin, messages
from django.core.exceptions import PermissionDenied
from django.db import transaction
from django.db.models import Q, QuerySet, TextField
from django.db.models.functions import Cast
from django.http import HttpRequest, HttpResponse
from django.template.response import TemplateResponse
from django.urls import URLPattern, path, reverse
from django.utils import timezone
from django.utils.html import format_html, format_html_join
from django.utils.translation import gettext, gettext_lazy as _, ngettext

from ..conf import get_settings
from ..core.exceptions import TaskNotRegistered
from ..core.tasks import registry
from ..models import (FINISHED_TASK_STATES, PayrollBatch, TaskResult, TaskStatus,
                      WorkerHeartbeat)
from ..tallies import delete_task_records
from . import display
from .readonly import QueueRecordAdminMixin

#: The bulk "retry all failed" action re-enqueues at most this many records per click.
RETRY_ALL_LIMIT = 5000


class AlreadyRetried(Exception):
    def __init__(self, retry_id: Any):
        super().__init__(retry_id)
        self.retry_id = retry_id


@dataclass
class RetryOutcome:
    retried: int = 0
    skipped: dict[str, str] = field(default_factory=dict)  # task name -> why not
    already_retried: list[tuple[Any, Any]] = field(default_factory=list)  # (record, its retry)


def retry_records(records: Iterable[TaskResult]) -> RetryOutcome:
    """Re-enqueue each record as a NEW task whose ``retry_of`` is the original.

    Each retry is one transaction: its record, its ``retry_of`` link and the
    send succeed or fail together, so a broker that is down leaves no
    pending record that was never sent (the original stays retryable).

    Idempotent: a record that was retried already (it has a record whose
    ``retry_of`` is it) is left alone, so a double click, a resubmitted form or
    two admins at once enqueue it once. The original row is locked first
    (``SELECT ... FOR UPDATE``; on SQLite the IMMEDIATE transaction takes the
    write lock), so two concurrent requests cannot both see "not retried yet".
    """
    from ..redis_url import broker_errors, masked_broker_error
    from ..selection import get_queue_driver

    driver = get_queue_driver()
    outcome = RetryOutcome()
    for record in records:
        try:
            task = registry.get(record.task_name)
        except TaskNotRegistered:
            outcome.skipped[record.task_name] = gettext("not registered in this process")
            continue
        queue = record.queue if record.queue in driver.settings.QUEUES else None
        try:
            with transaction.atomic():
                locked = TaskResult.objects.select_for_update().filter(pk=record.pk)
                if not locked.exists():
                    continue  # deleted meanwhile
                earlier = (TaskResult.objects.filter(retry_of_id=record.pk)
                           .order_by("enqueued_at").values_list("pk", flat=True).first())
                if earlier is not None:
                    raise AlreadyRetried(earlier)
                new_id = driver.enqueue_task(task, list(record.args or []),
                                             dict(record.kwargs or {}), queue=queue,
                                             on_commit=False, task_id=None)
                TaskResult.objects.filter(pk=uuid.UUID(str(new_id))).update(
                    retry_of_id=record.pk)
        except AlreadyRetried as exc:
            outcome.already_retried.append((record.pk, exc.retry_id))
            continue
        except (TypeError, ValueError) as exc:
            outcome.skipped[record.task_name] = str(exc)
            continue
        except broker_errors() as exc:  # the rest would fail the same way
            outcome.skipped[record.task_name] = gettext(
                "the queue is unavailable: %(error)s") % {
                "error": masked_broker_error(exc, driver.settings.REDIS_URL)}
            break
        outcome.retried += 1
    return outcome


class TaskResultAdmin(QueueRecordAdminMixin, admin.ModelAdmin):
    list_display = ["id", "task_name", "queue", "backend", "status_display", "attempts",
                    "enqueued_at", "started_at", "finished_at", "duration_display"]
    list_filter = ["status", "task_name", "queue", "backend", "enqueued_at"]
    search_fields = ["id", "task_name"]
    list_per_page = 100
    show_full_result_count = False
    actions = ["retry_selected", "retry_all_failed_of_names"]
    change_list_template = "admin/coati_queue/taskresult/change_list.html"
    fieldsets = [
        (None, {"fields": ["id", "task_name", "status_display", "queue", "backend", "worker_id",
                           "batch", "retry_of", "retries_display"]}),
        (_("Timing"), {"fields": ["attempts", "max_retries", "enqueued_at", "eta", "started_at",
                                  "finished_at", "duration_display", "expires_at"]}),
        (_("Data"), {"fields": ["args_display", "kwargs_display", "result_display"]}),
        (_("Failure"), {"fields": ["exception_class", "error_display", "traceback_display"]}),
    ]

    # -- columns and detail ----------------------------------------------
    @admin.display(description=_("status"), ordering="status")
    def status_display(self, obj: TaskResult) -> str:
        return display.status_badge(obj.status, obj.get_status_display())

    @admin.display(description=_("duration"))
    def duration_display(self, obj: TaskResult) -> str:
        duration = obj.duration
        return display.format_seconds(duration.total_seconds()) if duration else display.EMPTY

    @admin.display(description=_("arguments"))
    def args_display(self, obj: TaskResult) -> str:
        return display.json_block(obj.args)

    @admin.display(description=_("keyword arguments"))
    def kwargs_display(self, obj: TaskResult) -> str:
        return display.json_block(obj.kwargs)

    @admin.display(description=_("result"))
    def result_display(self, obj: TaskResult) -> str:
        return display.json_block(obj.result)

    @admin.display(description=_("error"))
    def error_display(self, obj: TaskResult) -> str:
        return display.pre_block(obj.error)

    @admin.display(description=_("traceback"))
    def traceback_display(self, obj: TaskResult) -> str:
        return display.pre_block(obj.traceback)

    @admin.display(description=_("retried as"))
    def retries_display(self, obj: TaskResult) -> str:
        retries = list(obj.retries.order_by("enqueued_at").values_list("pk", "status")[:20])
        if not retries:
            return display.EMPTY
        return format_html("<ul>{}</ul>", format_html_join_lines(retries))

    # -- search: ids, names, and the JSON arguments as text ----------------
    def get_search_results(self, request: HttpRequest, queryset: QuerySet,
                           search_term: str) -> tuple[QuerySet, bool]:
        results, may_have_duplicates = super().get_search_results(request, queryset,
                                                                  search_term)
        term = search_term.strip()
        if term:
            # SQLite keeps non-ASCII JSON text \u-escaped: "José" is stored "Jos\u00e9".
            matches = Q()
            for text in {term, json.dumps(term)[1:-1]}:
                matches |= Q(_args_text__icontains=text) | Q(_kwargs_text__icontains=text)
            in_arguments = queryset.annotate(
                _args_text=Cast("args", TextField()), _kwargs_text=Cast("kwargs", TextField()),
            ).filter(matches)
            results = results | queryset.filter(pk__in=in_arguments.values("pk"))
        return results, may_have_duplicates

    # -- deleting: finished records only, and the metrics counters stay monotonic --
    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        """An unfinished record would come back with the worker's next state write."""
        if obj is not None and not obj.is_finished:
            return False
        return super().has_delete_permission(request, obj)

    def get_deleted_objects(self, objs: Any, request: HttpRequest) -> tuple:
        """Unfinished records among the selected are kept (delete_queryset), not a 403."""
        deleted, counts, perms_needed, protected = super().get_deleted_objects(objs, request)
        if super().has_delete_permission(request):
            perms_needed.discard(TaskResult._meta.verbose_name)
        return deleted, counts, perms_needed, protected

    def delete_model(self, request: HttpRequest, obj: TaskResult) -> None:
        delete_task_records(TaskResult.objects.filter(pk=obj.pk))

    def delete_queryset(self, request: HttpRequest, queryset: QuerySet) -> None:
        unfinished = queryset.exclude(status__in=FINISHED_TASK_STATES).count()
        delete_task_records(queryset.filter(status__in=FINISHED_TASK_STATES))
        if unfinished:
            self.message_user(request, ngettext(
                "%(count)s selected task has not finished and was kept.",
                "%(count)s selected tasks have not finished and were kept.", unfinished)
                % {"count": unfinished}, messages.WARNING)

    # -- actions ------------------------------------------------------------
    def _report(self, request: HttpRequest, outcome: RetryOutcome) -> None:
        retried, skipped = outcome.retried, outcome.skipped
        if retried:
            self.message_user(request, ngettext(
                "%(count)s task was re-enqueued as a new record.",
                "%(count)s tasks were re-enqueued as new records.", retried) % {"count": retried},
                messages.SUCCESS)
        for name, why in sorted(skipped.items()):
            self.message_user(request, gettext("Tasks named %(name)s were not retried: "
                                               "%(why)s.") % {"name": name, "why": why},
                              messages.WARNING)
        already = outcome.already_retried
        if len(already) == 1:
            (original, retry), = already
            self.message_user(request, gettext(
                "Task %(id)s was already retried as %(retry)s; nothing was enqueued again. "
                "Retry that record if it failed too.") % {"id": original, "retry": retry},
                messages.WARNING)
        elif already:
            self.message_user(request, ngettext(
                "%(count)s selected task was already retried; it was not enqueued again.",
                "%(count)s selected tasks were already retried; they were not enqueued again.",
                len(already)) % {"count": len(already)}, messages.WARNING)
        if not retried and not skipped and not already:
            self.message_user(request, gettext("Nothing to retry."), messages.WARNING)

    @admin.action(permissions=["change"], description=_("Retry selected tasks"))
    def retry_selected(self, request: HttpRequest, queryset: QuerySet) -> None:
        finished = queryset.filter(status__in=FINISHED_TASK_STATES)
        unfinished = queryset.exclude(status__in=FINISHED_TASK_STATES).count()
        self._report(request, retry_records(finished.order_by("enqueued_at")))
        if unfinished:
            self.message_user(request, ngettext(
                "%(count)s selected task has not finished yet and was left alone.",
                "%(count)s selected tasks have not finished yet and were left alone.",
                unfinished) % {"count": unfinished}, messages.WARNING)

    @admin.action(permissions=["change"],
                  description=_("Retry all failed tasks with the selected tasks' names"))
    def retry_all_failed_of_names(self, request: HttpRequest, queryset: QuerySet) -> None:
        names = list(queryset.order_by().values_list("task_name", flat=True).distinct())
        failed = (TaskResult.objects.failed().filter(task_name__in=names, retries__isnull=True)
                  .order_by("enqueued_at"))
        outcome = retry_records(failed[:RETRY_ALL_LIMIT])
        self._report(request, outcome)
        if outcome.retried == RETRY_ALL_LIMIT:
            self.message_user(request, gettext("Only the first %(limit)s failed tasks were "
                                               "retried; run the action again for the rest.")
                              % {"limit": RETRY_ALL_LIMIT}, messages.WARNING)

    # -- the queue overview -----------------------------------------------
    def get_urls(self) -> list[URLPattern]:
        name = f"{self.opts.app_label}_{self.opts.model_name}_overview"
        return [path("overview/", self.admin_site.admin_view(self.overview_view), name=name),
                ] + super().get_urls()

    def changelist_view(self, request: HttpRequest,
                        extra_context: dict | None = None) -> HttpResponse:
        context = {"overview_url": reverse("admin:coati_queue_taskresult_overview"),
                   **(extra_context or {})}
        return super().changelist_view(request, extra_context=context)

    def overview_view(self, request: HttpRequest) -> HttpResponse:
        """Backend and why, depths, workers, last hour per minute. Needs view permission."""
        if not self.has_view_permission(request):
            raise PermissionDenied
        from ..monitoring import overview_context

        context = {**self.admin_site.each_context(request),
                   **overview_context(self._viewable_batches(request)),
                   "opts": self.opts, "title": display.QUEUE_OVERVIEW, "media": self.media}
        # Per object too: an object-permission backend (django-guardian) may refuse some.
        batch_admin = self.admin_site._registry.get(PayrollBatch)
        context["active_batches"] = [
            (batch, display.progress_bar(batch.progress()))
            for batch in context["active_batches"]
            if batch_admin.has_view_or_change_permission(request, batch)]
        return TemplateResponse(request, "admin/coati_queue/taskresult/overview.html", context)

    def _viewable_batches(self, request: HttpRequest) -> QuerySet | None:
        """The batches this user may open, as the batch admin decides (its permissions
        and its ``get_queryset``, which a project may narrow); None: none."""
        batch_admin = self.admin_site._registry.get(PayrollBatch)
        if batch_admin is None or not batch_admin.has_view_or_change_permission(request):
            return None
        return batch_admin.get_queryset(request)


def format_html_join_lines(retries: list[tuple[Any, str]]) -> str:
    """One ``<li>`` link per retry record."""
    return format_html_join("", '<li><a href="{}">{}</a> ({})</li>', (
        (reverse("admin:coati_queue_taskresult_change", args=[pk]), pk,
         TaskStatus(status).label if status in TaskStatus.values else status)
        for pk, status in retries))


class WorkerHeartbeatAdmin(admin.ModelAdmin):
    """Workers as their heartbeats saw them; "lost" = no beat within WORKER_LOST_AFTER."""

    list_display = ["worker_id", "hostname", "pid", "backend", "queues_display", "threads",
                    "started_at", "last_seen", "processed", "failed", "state"]
    list_filter = ["backend", "hostname"]
    search_fields = ["worker_id", "hostname"]

    class Media:
        css = {"all": ["coati_queue/admin.css"]}

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    @admin.display(description=_("queues"))
    def queues_display(self, obj: WorkerHeartbeat) -> str:
        return ", ".join(str(q) for q in obj.queues or [])

    @admin.display(description=_("state"))
    def state(self, obj: WorkerHeartbeat) -> str:
        if obj.stopped_at is not None:
            return display.status_badge("stopped", gettext("stopped"))
        if obj.is_alive(get_settings().WORKER_LOST_AFTER, timezone.now()):
            return display.status_badge("alive", gettext("alive"))
        return display.status_badge("lost", gettext("lost"))
