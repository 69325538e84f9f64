"""What every worker does besides running tasks, each on its own interval.

``run_due_tasks`` is called by the worker's maintenance thread; every task is
safe when many workers run it at once, and a failing one is logged and tried
again at its next turn (a broker or database outage must not stop a worker).
"""

from __future__ import annotations

import logging
import time
from typing import Any, Callable

from django.db import DatabaseError, connections

from .core.exceptions import BackendUnavailable
from .sqlite import retry_locked

logger = logging.getLogger("coati_queue.worker")


def reconcile_delivery(driver: Any) -> None:
    from .reconcile import reconcile

    report = reconcile(driver)
    if report:
        logger.info("Reconciler: %s", report)


def reconcile_batches(driver: Any) -> None:
    from .payroll_recovery import reconcile_batches as reconcile_payroll

    reconcile_payroll()


def collect_dead_letters(driver: Any) -> None:
    from .dead_letters import collect_broker_dead_letters

    collect_broker_dead_letters(driver)


def drain_fallback(driver: Any) -> None:
    from .fallback import drain_fallback_directories

    drain_fallback_directories(driver)


def delete_expired_records(driver: Any) -> None:
    from .tracking import delete_expired

    deleted = delete_expired()
    if deleted:
        logger.info("Deleted %d expired task records.", deleted)


def due_tasks(settings: Any) -> list[tuple[str, float, Callable[[Any], None], bool]]:
    """(name, interval in seconds, function, run at start) of the enabled tasks."""
    every = settings.RECONCILE_INTERVAL
    return [(name, interval, func, at_start) for name, interval, func, at_start in [
        # The fallback first: its jobs are pending records whose message is not in
        # Redis yet, which the reconciler would otherwise send a second time.
        ("fallback directory", every, drain_fallback, True),
        ("relay and reconciler", every, reconcile_delivery, True),
        ("stalled batches", every, reconcile_batches, True),
        ("broker dead letters", every, collect_dead_letters, True),
        ("expired records", settings.CLEANUP_INTERVAL, delete_expired_records, False),
    ] if interval]


def run_due_tasks(driver: Any, schedule: dict[str, float], settings: Any) -> None:
    """Run each task whose turn has come; ``schedule`` keeps the next turns."""
    for name, interval, func, at_start in due_tasks(settings):
        now = time.monotonic()
        if name not in schedule:
            schedule[name] = now if at_start else now + interval
        if now < schedule[name]:
            continue
        schedule[name] = now + interval
        try:  # each task is safe to run again, so a whole pass is retried on a lock
            retry_locked(func, driver, what=f"Maintenance task {name!r}")
        except (DatabaseError, BackendUnavailable) as exc:
            logger.warning("Maintenance task %r failed (tried again in %.0f s): %s", name,
                           interval, exc)
        finally:
            connections.close_all()  # this thread's own connections
