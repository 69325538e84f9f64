"""Data of the queue overview page: backend, depths, workers, last hour per minute.

Every query here is bounded whatever the history size: per-queue counts are
one GROUP BY, the hourly chart is one GROUP BY minute over an indexed
``finished_at`` range (at most 60 × 2 rows), workers and batches are capped.
A broker that cannot be reached turns into a message on the page (password
scrubbed), never a 500.
"""

from __future__ import annotations

import datetime
import logging
from dataclasses import dataclass
from typing import Any

from django.db.models import Count, QuerySet
from django.db.models.functions import TruncMinute
from django.utils import timezone
from django.utils.dateparse import parse_datetime
from django.utils.formats import date_format
from django.utils.html import format_html, format_html_join
from django.utils.safestring import SafeString
from django.utils.translation import gettext, ngettext, pgettext_lazy

from . import clock
from .conf import get_settings
from .models import ACTIVE_BATCH_STATES, TaskResult, TaskStatus
from .redis_url import broker_errors, masked_broker_error

logger = logging.getLogger("coati_queue")

CHART_MINUTES = 60
ACTIVE_BATCHES_LISTED = 20

#: How a system-check finding shows on the overview: its level's word and badge colour.
FINDING_STYLE = {
    "critical": {"label": pgettext_lazy("system check level", "critical"),
                 "badge": "coati-status-failed"},
    "error": {"label": pgettext_lazy("system check level", "error"),
              "badge": "coati-status-failed"},
    "warning": {"label": pgettext_lazy("system check level", "warning"),
                "badge": "coati-status-lost"},
    "info": {"label": pgettext_lazy("system check level", "info"),
             "badge": "coati-status-pending"},
    "debug": {"label": pgettext_lazy("system check level", "debug"),
              "badge": "coati-status-pending"},
}


@dataclass
class Minute:
    start: datetime.datetime
    completed: int = 0
    failed: int = 0

    @property
    def total(self) -> int:
        return self.completed + self.failed


def last_hour_by_minute(now: datetime.datetime | None = None) -> list[Minute]:
    """Tasks finished in each of the last 60 minutes (oldest first), one grouped query."""
    now = now or timezone.now()
    end = now.replace(second=0, microsecond=0) + datetime.timedelta(minutes=1)
    start = end - datetime.timedelta(minutes=CHART_MINUTES)
    minutes = [Minute(start + datetime.timedelta(minutes=i)) for i in range(CHART_MINUTES)]
    rows = (TaskResult.objects.filter(finished_at__gte=start, finished_at__lt=end,
                                      status__in=[TaskStatus.COMPLETED, TaskStatus.FAILED])
            .annotate(minute=TruncMinute("finished_at")).order_by()
            .values_list("minute", "status").annotate(n=Count("pk")))
    for minute, status, count in rows:
        index = int((minute - start).total_seconds() // 60)
        if 0 <= index < CHART_MINUTES:
            if status == TaskStatus.COMPLETED:
                minutes[index].completed += count
            else:
                minutes[index].failed += count
    return minutes


def throughput_svg(minutes: list[Minute]) -> SafeString:
    """A stacked bar chart (completed below, failed above) as inline SVG; no JS, no CDN.

    Colours come from CSS classes (coati_queue/admin.css) bound to the admin's
    own variables, so the chart follows the light and dark themes.
    """
    left, top, plot_w, plot_h, step = 40, 10, 600, 120, 10
    peak = max((m.total for m in minutes), default=0) or 1
    bars = []
    for i, minute in enumerate(minutes):
        x = left + i * step
        ok_h = round(minute.completed / peak * plot_h, 2)
        fail_h = round(minute.failed / peak * plot_h, 2)
        label = gettext("%(time)s: %(completed)s completed, %(failed)s failed") % {
            "time": date_format(clock.local(minute.start), "H:i"),
            "completed": minute.completed, "failed": minute.failed}
        bars.append((label, x, top, step, plot_h, x + 1, top + plot_h - ok_h, step - 2, ok_h,
                     x + 1, top + plot_h - ok_h - fail_h, step - 2, fail_h))
    groups = format_html_join(
        "",
        '<g><title>{}</title><rect class="coati-bar-hit" x="{}" y="{}" width="{}" height="{}"/>'
        '<rect class="coati-bar-ok" x="{}" y="{}" width="{}" height="{}"/>'
        '<rect class="coati-bar-failed" x="{}" y="{}" width="{}" height="{}"/></g>',
        bars)
    bottom = top + plot_h
    return format_html(
        '<svg class="coati-chart" viewBox="0 0 {} {}" role="img" aria-label="{}" '
        'preserveAspectRatio="xMinYMin meet">'
        '<line class="coati-axis" x1="{}" y1="{}" x2="{}" y2="{}"/>'
        '<text class="coati-axis-label" x="{}" y="{}" text-anchor="end">{}</text>'
        '<text class="coati-axis-label" x="{}" y="{}" text-anchor="end">0</text>'
        '<text class="coati-axis-label" x="{}" y="{}">{}</text>'
        '<text class="coati-axis-label" x="{}" y="{}" text-anchor="middle">{}</text>'
        '<text class="coati-axis-label" x="{}" y="{}" text-anchor="end">{}</text>'
        '{}</svg>',
        left + plot_w + 5, bottom + 22, gettext("Tasks finished per minute, last hour"),
        left, bottom, left + plot_w, bottom,
        left - 4, top + 8, peak,
        left - 4, bottom,
        left, bottom + 16, gettext("−60 min"),
        left + plot_w // 2, bottom + 16, gettext("−30 min"),
        left + plot_w, bottom + 16, gettext("now"),
        groups,
    )


def overview_context(batches: QuerySet | None = None) -> dict[str, Any]:
    """Everything the overview template shows; no password can reach it.

    ``batches``: the payroll batches the viewer may open (None: lists none); the
    active ones among them are listed.
    """
    from .checks import health_findings
    from .selection import get_queue_driver
    from .stats import collect_stats

    settings = get_settings()
    broker_error = ""
    driver = None
    try:
        driver = get_queue_driver()
        stats = collect_stats(driver)
    except broker_errors() as exc:
        broker_error = masked_broker_error(exc, settings.REDIS_URL)
        logger.warning("Queue overview: the broker could not be asked: %s", broker_error)
        broker_error = f"{type(exc).__name__}: {broker_error}"
        stats = collect_stats(driver, ask_broker=False)
    for worker in stats["workers"]:
        seen = worker.get("last_seen")
        worker["last_seen_at"] = parse_datetime(seen) if isinstance(seen, str) else seen
    minutes = last_hour_by_minute()
    completed = sum(m.completed for m in minutes)
    failed = sum(m.failed for m in minutes)
    alive = sum(1 for w in stats["workers"] if w.get("alive"))
    return {
        "stats": stats,
        "broker_error": broker_error,
        "lost_after": settings.WORKER_LOST_AFTER,
        "chart": throughput_svg(minutes),
        "hour_completed": completed,
        "hour_failed": failed,
        "hour_rate": round((completed + failed) / CHART_MINUTES, 1),
        "workers_alive": alive,
        "workers_summary": ngettext("%(alive)s worker alive", "%(alive)s workers alive", alive)
        % {"alive": alive},
        "active_batches": [] if batches is None else list(
            batches.filter(status__in=ACTIVE_BATCH_STATES)
            .order_by("-created_at")[:ACTIVE_BATCHES_LISTED]),
        "findings": [{**finding, **FINDING_STYLE.get(finding["level"], FINDING_STYLE["info"])}
                     for finding in health_findings()],
    }

