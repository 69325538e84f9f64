"""The Django layer's middleware: DB-connection hygiene, tracking, worker counters.

The queue-library drivers (``backends/dramatiq.py``, ``backends/huey.py``) never
touch the database: what a running job needs from Django happens here, through the
core's hooks, the same on every backend. (Sending still writes its records from the
shared ``backends/base.py``; the import-linter ratchet in setup.cfg lists that.)
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any

from django.db import close_old_connections, connections
from django.utils.module_loading import import_string

from .core.middleware import Middleware

if TYPE_CHECKING:
    from .conf import QueueSettings
    from .core.jobs import Job


class DatabaseConnectionsMiddleware(Middleware):
    """Drop broken or expired connections around each task, and all of them at shutdown.

    Worker threads outlive requests, so Django's request_started/finished
    hooks never run there; this is the same duty for jobs.
    """

    def before_execute(self, driver: Any, job: "Job") -> None:
        close_old_connections()

    def after_execute(self, driver: Any, job: "Job", **kwargs: Any) -> None:
        close_old_connections()

    def worker_stopped(self, driver: Any, worker: Any) -> None:
        connections.close_all()


class WorkerCountersMiddleware(Middleware):
    """Processed/failed counts of this process, published by the worker heartbeat."""

    def __init__(self) -> None:
        self.processed = 0
        self.failed = 0
        self._lock = threading.Lock()

    def after_execute(self, driver: Any, job: "Job", *, exception: BaseException | None = None,
                      retry_in_ms: int | None = None, **kwargs: Any) -> None:
        with self._lock:
            self.processed += 1
            if exception is not None:
                self.failed += 1


def default_middleware(settings: "QueueSettings") -> list[Middleware]:
    """Ours first, then ``COATI_QUEUE['MIDDLEWARE']`` (dotted class paths)."""
    from .tracking import TrackingMiddleware

    stack: list[Middleware] = [DatabaseConnectionsMiddleware(), TrackingMiddleware(settings),
                               WorkerCountersMiddleware()]
    stack += [import_string(path)() for path in settings.MIDDLEWARE]
    return stack
