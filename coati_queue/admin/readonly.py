"""Read-only change forms for records the queue writes (tasks, batches, items).

Workers update these rows concurrently (counters, states), so saving the
form would write back stale values over theirs: the form shows every field
read-only, hides the save buttons and refuses a POST outright. The list
refuses, with a 403, a POSTed action the user has no permission for.
"""

from __future__ import annotations

from typing import Any

from django.core.exceptions import PermissionDenied
from django.http import HttpRequest, HttpResponse
from django.utils.translation import gettext


class ReadOnlyPostMixin:
    """The change form shows records; a POST to it would overwrite workers' writes."""

    def get_readonly_fields(self, request: HttpRequest, obj: Any = None) -> list[str]:
        extra = list(super().get_readonly_fields(request, obj))  # type: ignore[misc]
        return extra + [f.name for f in self.model._meta.fields]  # type: ignore[attr-defined]

    def changelist_view(self, request: HttpRequest,
                        extra_context: dict | None = None) -> HttpResponse:
        # Django answers an action the user may not run with 200 "No action selected";
        # a POST of an action this user lacks the permission for is refused outright.
        action = request.POST.get("action") if request.method == "POST" else None
        if action and action not in self.get_actions(request):  # type: ignore[attr-defined]
            raise PermissionDenied(gettext("You may not run this action."))
        return super().changelist_view(request, extra_context)  # type: ignore[misc]

    def change_view(self, request: HttpRequest, object_id: str, form_url: str = "",
                    extra_context: dict | None = None) -> HttpResponse:
        if request.method == "POST":
            raise PermissionDenied(gettext("These records are written by the queue and "
                                           "cannot be edited."))
        context = {"show_save": False, "show_save_and_continue": False,
                   "show_save_and_add_another": False,
                   "title": gettext("View %s") % self.opts.verbose_name,  # type: ignore
                   **(extra_context or {})}
        return super().change_view(request, object_id, form_url,  # type: ignore[misc]
                                   extra_context=context)


class QueueRecordAdminMixin(ReadOnlyPostMixin):
    """A record the queue writes, shown by fieldsets: every field read-only, no "add"."""

    class Media:
        css = {"all": ["coati_queue/admin.css"]}

    def get_readonly_fields(self, request: HttpRequest, obj: Any = None) -> list[str]:
        shown = [name for _, options in self.fieldsets  # type: ignore[attr-defined]
                 for name in options["fields"]]
        fields = [f.name for f in self.model._meta.fields]  # type: ignore[attr-defined]
        return list(dict.fromkeys(shown + fields))

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False
