"""Dead letters in the admin: read them, requeue the ones that decode, delete them.

A dead letter is evidence, so the form is read-only for everyone and its
payload is shown escaped in a ``<pre>``, never rendered. Viewing needs
``view_deadletter``, the requeue action ``change_deadletter`` and the delete
action ``delete_deadletter``; a POSTed action the user lacks is a 403.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from django.contrib import admin, messages
from django.db.models import QuerySet
from django.core.exceptions import ValidationError
from django.http import HttpRequest
from django.template.defaultfilters import filesizeformat
from django.urls import reverse
from django.utils.html import format_html
from django.utils.text import Truncator
from django.utils.translation import gettext, gettext_lazy as _, ngettext

from ..conf import get_settings
from ..models import DeadLetter, TaskResult
from . import display
from .readonly import QueueRecordAdminMixin

#: Dead letters listed by id in one "not requeued" message before "and N more".
IDS_LISTED = 10


class RequeuedFilter(admin.SimpleListFilter):
    title = _("requeued")
    parameter_name = "requeued"

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, Any]]:
        return [("no", _("No")), ("yes", _("Yes"))]

    def queryset(self, request: HttpRequest, queryset: QuerySet) -> QuerySet:
        if self.value() == "no":
            return queryset.filter(requeued_at__isnull=True)
        if self.value() == "yes":
            return queryset.filter(requeued_at__isnull=False)
        return queryset


class QueueFilter(admin.SimpleListFilter):
    """The configured queues plus "other": a dead letter's queue comes from its payload,
    so listing every distinct value would let a flood of forged names fill the sidebar."""

    title = _("queue")
    parameter_name = "queue"
    OTHER = "__other__"

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, Any]]:
        return [(name, name) for name in get_settings().QUEUES] + [(self.OTHER, _("other"))]

    def queryset(self, request: HttpRequest, queryset: QuerySet) -> QuerySet:
        if self.value() == self.OTHER:
            return queryset.exclude(queue__in=get_settings().QUEUES)
        if self.value():
            return queryset.filter(queue=self.value())
        return queryset


class DeadLetterAdmin(QueueRecordAdminMixin, admin.ModelAdmin):
    list_display = ["seen_at_display", "source", "queue", "task_display", "reason_display",
                    "size_display", "requeued_display"]
    list_display_links = ["seen_at_display"]
    list_filter = ["source", QueueFilter, RequeuedFilter, "backend"]
    search_fields = ["task_name", "task_id", "reason"]
    list_per_page = 100
    show_full_result_count = False
    actions = ["requeue_selected"]
    fieldsets = [
        (None, {"fields": ["seen_at", "source", "backend", "queue", "seen_by"]}),
        (_("Task"), {"fields": ["task_name", "task_id", "reason_block"]}),
        (_("Payload"), {"fields": ["payload_size", "truncated", "payload_block"]}),
        (_("Requeued"), {"fields": ["requeued_at", "requeued_as_display"]}),
    ]

    # -- columns and detail ----------------------------------------------
    @admin.display(description=_("seen at"), ordering="seen_at")
    def seen_at_display(self, obj: DeadLetter) -> str:
        return display.short_datetime(obj.seen_at)

    @admin.display(description=_("task"), ordering="task_name")
    def task_display(self, obj: DeadLetter) -> str:
        return obj.task_name or display.EMPTY

    @admin.display(description=_("reason"))
    def reason_display(self, obj: DeadLetter) -> str:
        return Truncator(obj.reason).chars(90)  # escaped by the changelist

    @admin.display(description=_("size"), ordering="payload_size")
    def size_display(self, obj: DeadLetter) -> str:
        size = filesizeformat(obj.payload_size)
        return gettext("%(size)s (truncated)") % {"size": size} if obj.truncated else size

    @admin.display(description=_("requeued"), boolean=True, ordering="requeued_at")
    def requeued_display(self, obj: DeadLetter) -> bool:
        return obj.requeued_at is not None

    @admin.display(description=_("reason"))
    def reason_block(self, obj: DeadLetter) -> str:
        return display.pre_block(obj.reason)

    @admin.display(description=_("payload"))
    def payload_block(self, obj: DeadLetter) -> str:
        """Escaped by ``format_html``: a payload is whatever someone put in the queue."""
        return display.pre_block(obj.payload)

    @admin.display(description=_("requeued as task"))
    def requeued_as_display(self, obj: DeadLetter) -> str:
        if not obj.requeued_as:
            return display.EMPTY
        try:
            exists = TaskResult.objects.filter(pk=obj.requeued_as).exists()
        except (ValidationError, ValueError):
            exists = False  # not a UUID: shown as text
        if exists:
            return format_html('<a href="{}">{}</a>', reverse(
                "admin:coati_queue_taskresult_change", args=[obj.requeued_as]), obj.requeued_as)
        return obj.requeued_as

    # -- actions ------------------------------------------------------------
    @admin.action(permissions=["change"], description=_("Requeue selected dead letters"))
    def requeue_selected(self, request: HttpRequest, queryset: QuerySet) -> None:
        from ..dead_letters import requeue

        sent, errors = requeue(queryset.order_by("seen_at", "pk"))
        if sent:
            self.message_user(request, ngettext(
                "%(count)s dead letter was requeued as a new task.",
                "%(count)s dead letters were requeued as new tasks.", len(sent))
                % {"count": len(sent)}, messages.SUCCESS)
        by_reason: dict[str, list[int]] = defaultdict(list)
        for pk, why in errors.items():
            by_reason[why].append(pk)
        for why, pks in sorted(by_reason.items(), key=lambda item: item[1][0]):
            listed = ", ".join(f"#{pk}" for pk in pks[:IDS_LISTED])
            if len(pks) > IDS_LISTED:
                listed += " " + gettext("and %(count)s more") % {"count": len(pks) - IDS_LISTED}
            self.message_user(request, ngettext(
                "Dead letter %(ids)s was not requeued: %(why)s",
                "Dead letters %(ids)s were not requeued: %(why)s", len(pks))
                % {"ids": listed, "why": why}, messages.WARNING)
        if not sent and not errors:
            self.message_user(request, gettext("Nothing to requeue."), messages.WARNING)
