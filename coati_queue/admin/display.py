"""HTML fragments and number formats shared by the admin pages and the overview.

Everything that builds HTML goes through ``format_html``/``format_html_join``
so data (task arguments, error messages, tracebacks) is always escaped.
The live progress panel's JavaScript renders the same texts from the same
format strings (``progress_i18n``), so a polled update reads like the page.
"""

from __future__ import annotations

import datetime
import json
from typing import Any

from django.utils.formats import date_format, number_format
from django.utils.html import format_html
from django.utils.safestring import SafeString
from django.utils.translation import gettext, gettext_lazy as _

from .. import clock
from ..models import BatchStatus

EMPTY = "-"  # the admin's own empty_value_display


def progress_text(processed: int, total: int, percent: float) -> str:
    """``x of y (p%)`` in the active language."""
    return gettext("%(processed)s of %(total)s (%(percent)s%%)") % {
        "processed": number_format(processed, force_grouping=True),
        "total": number_format(total, force_grouping=True),
        "percent": number_format(percent, decimal_pos=1),
    }


def format_rate(rate: float | None) -> str:
    if rate is None:
        return EMPTY
    return gettext("%(rate)s items/s") % {"rate": number_format(rate, decimal_pos=1)}


def format_seconds(seconds: float | None) -> str:
    """A short human duration: ``42 s``, ``3 min 5 s``, ``2 h 10 min``."""
    if seconds is None:
        return EMPTY
    whole = int(round(seconds))
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return gettext("%(h)s h %(m)s min") % {"h": hours, "m": minutes}
    if minutes:
        return gettext("%(m)s min %(s)s s") % {"m": minutes, "s": secs}
    if seconds < 10 and seconds != whole:
        return gettext("%(s)s s") % {"s": number_format(seconds, decimal_pos=1)}
    return gettext("%(s)s s") % {"s": secs}


def short_datetime(value: datetime.datetime | None) -> SafeString | str:
    """A compact local date-time with seconds (list columns), kept on one line."""
    if value is None:
        return EMPTY
    return format_html('<span class="coati-nowrap">{}</span>',
                       date_format(clock.local(value), "SHORT_DATETIME_FORMAT"))


def progress_bar(progress: dict[str, Any]) -> SafeString:
    """A native ``<progress>`` plus its text; styled by coati_queue/admin.css (dark mode aware)."""
    processed = progress["completed"] + progress["failed"]
    percent = progress["progress_percentage"]
    text = progress_text(processed, progress["total"], percent)
    failed_class = " coati-has-failures" if progress["failed"] else ""
    return format_html(
        '<span class="coati-progress{}"><progress max="100" value="{}" aria-label="{}">{}'
        '</progress> <span class="coati-progress-text">{}</span></span>',
        failed_class, f"{percent:.1f}", text, text, text,
    )


def status_badge(value: str, label: str) -> SafeString:
    """A status word with a CSS class per state (colours come from admin variables)."""
    return format_html('<span class="coati-status coati-status-{}">{}</span>', value, label)


def pre_block(text: str | None) -> SafeString | str:
    """Escaped, preformatted text (tracebacks, errors); never ``mark_safe``."""
    if not text:
        return EMPTY
    return format_html('<pre class="coati-pre">{}</pre>', text)


def json_block(value: Any) -> SafeString | str:
    """Pretty JSON in an escaped ``<pre>``."""
    if value is None:
        return EMPTY
    return pre_block(json.dumps(value, indent=2, ensure_ascii=False, sort_keys=True, default=str))


def progress_i18n() -> dict[str, Any]:
    """Strings and status labels the live progress script needs, in the active language."""
    return {
        "progress": gettext("%(processed)s of %(total)s (%(percent)s%%)"),
        "rate": gettext("%(rate)s items/s"),
        "hours": gettext("%(h)s h %(m)s min"),
        "minutes": gettext("%(m)s min %(s)s s"),
        "seconds": gettext("%(s)s s"),
        "empty": EMPTY,
        "finished": gettext("The batch has finished. Reload the page to see failed items "
                            "and the available actions."),
        "error": gettext("Could not refresh the progress (%(reason)s); retrying."),
        "forbidden": gettext("You no longer have access to this batch's progress."),
        "statuses": {value: str(label) for value, label in BatchStatus.choices},
    }


START_PAYROLL = _("Start payroll")
QUEUE_OVERVIEW = _("Queue overview")
