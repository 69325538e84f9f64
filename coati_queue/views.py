"""Endpoints outside the admin: a batch's JSON progress and the Prometheus metrics.

The admin pages (live batch page, queue overview) live in ``coati_queue.admin``;
these two are for scripts, the live page's poller and a Prometheus scraper.
"""

from __future__ import annotations

import hmac

from django.conf import settings
from django.contrib.auth.views import redirect_to_login
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import get_object_or_404
from django.urls import NoReverseMatch, reverse
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_GET
from prometheus_client import CONTENT_TYPE_LATEST

from .conf import get_settings
from .models import PayrollBatch

VIEW_BATCH_PERMISSIONS = ("coati_queue.view_payrollbatch", "coati_queue.change_payrollbatch")


def login_url() -> str:
    """The admin's login page when the admin is mounted, else ``settings.LOGIN_URL``."""
    try:
        return reverse("admin:login")
    except NoReverseMatch:
        return str(settings.LOGIN_URL)


@require_GET
@never_cache
def batch_progress(request: HttpRequest, pk: int) -> HttpResponse:
    """``PayrollBatch.progress()`` as JSON: counters only, constant cost per poll.

    Anonymous: a browser is sent to the login page, a script asking for JSON
    gets 401. Logged in without view permission on batches: 403.
    """
    if not request.user.is_authenticated:
        if request.accepts("text/html"):
            return redirect_to_login(request.get_full_path(), login_url())
        return JsonResponse({"error": "authentication required"}, status=401)
    if not any(request.user.has_perm(perm) for perm in VIEW_BATCH_PERMISSIONS):
        return JsonResponse({"error": "permission denied"}, status=403)
    batch = get_object_or_404(PayrollBatch, pk=pk)
    return JsonResponse(batch.progress())


def bearer_token_matches(request: HttpRequest, expected: str | None) -> bool:
    """``Authorization: Bearer <token>`` equal to ``expected``, compared in constant time."""
    if not expected:
        return False
    scheme, _, given = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not given:
        return False
    return hmac.compare_digest(given.strip().encode(), expected.encode())


@require_GET
@never_cache
def metrics(request: HttpRequest) -> HttpResponse:
    """Prometheus text: a staff session or the METRICS_TOKEN bearer token, else 403."""
    user = request.user
    staff = user.is_authenticated and user.is_active and user.is_staff
    if not staff and not bearer_token_matches(request, get_settings().METRICS_TOKEN):
        return HttpResponse("403 Forbidden: a staff session or the metrics bearer token is "
                            "required.\n", status=403, content_type="text/plain; charset=utf-8")
    from .metrics import render_metrics

    return HttpResponse(render_metrics(), content_type=CONTENT_TYPE_LATEST)
