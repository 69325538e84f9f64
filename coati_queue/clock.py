"""Timestamps as Django stores them: aware UTC with ``USE_TZ``, naive local time without.

Jobs carry epoch seconds (``time.time()``); every datetime coati writes to the
database is made from one here, so it matches ``django.utils.timezone.now()``
under both settings (SQLite refuses an aware datetime when ``USE_TZ`` is False).
"""

from __future__ import annotations

import datetime

from django.conf import settings
from django.utils import timezone


def from_epoch(epoch: float) -> datetime.datetime:
    """The datetime of ``epoch`` the way ``timezone.now()`` would have given it: aware
    in UTC, or (``USE_TZ = False``) naive in ``TIME_ZONE``, as Django stores it."""
    value = datetime.datetime.fromtimestamp(epoch, datetime.timezone.utc)
    if settings.USE_TZ:
        return value
    return timezone.make_naive(value, timezone.get_default_timezone())


def local(value: datetime.datetime) -> datetime.datetime:
    """``timezone.localtime`` for a stored datetime; a naive one (``USE_TZ = False``) is
    local time already (``localtime`` would raise)."""
    return value if timezone.is_naive(value) else timezone.localtime(value)
