"""System checks: catch bad configuration at ``manage.py check``, not at 3 a.m."""

from __future__ import annotations

from django.conf import settings
from django.core.checks import Error, Warning, register
from django.core.exceptions import ImproperlyConfigured
from django.utils.module_loading import import_string


@register()
def check_queue_settings(app_configs, **kwargs):
    from .conf import get_settings

    try:
        queue_settings = get_settings()
    except ImproperlyConfigured as exc:
        return [Error(str(exc), id="coati_queue.E001")]
    problems = []
    for key in ("ACTIVE_EMPLOYEES", "CALCULATE_EMPLOYEE"):
        path = queue_settings.PAYROLL.get(key)
        if path:
            try:
                import_string(path)
            except ImportError as exc:
                problems.append(Error(f"COATI_QUEUE['PAYROLL']['{key}'] = {path!r} cannot be "
                                      f"imported: {exc}", id="coati_queue.E002"))
    for path in queue_settings.MIDDLEWARE:
        try:
            import_string(path)
        except ImportError as exc:
            problems.append(Error(f"COATI_QUEUE['MIDDLEWARE'] entry {path!r} cannot be imported: "
                                  f"{exc}", id="coati_queue.E003"))
    database = settings.DATABASES.get("default", {})
    if database.get("ENGINE", "").endswith("sqlite3") and queue_settings.BACKEND != "immediate":
        init = database.get("OPTIONS", {}).get("init_command", "")
        if "journal_mode=wal" not in init.lower().replace(" ", ""):
            problems.append(Warning(
                "SQLite without WAL: worker threads writing task records will often hit "
                "'database is locked'.",
                hint="Add OPTIONS={'init_command': 'PRAGMA journal_mode=WAL;', "
                     "'transaction_mode': 'IMMEDIATE', 'timeout': 30} to DATABASES['default'].",
                id="coati_queue.W001"))
    return problems
