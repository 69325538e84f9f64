"""Middleware hooks around enqueue and execution, modelled on Dramatiq's.

Every hook is a no-op by default. ``before_*`` hooks run in order,
``after_*`` hooks in reverse order. A failing hook is logged and does not
stop the others, except ``before_enqueue``, whose failure aborts the send
(a task that cannot be tracked must not run untracked), and the two control
exceptions a ``before_execute`` hook may raise: ``SkipJob`` (do not run this
delivery) and ``InvalidJob`` (dead-letter it).
"""

from __future__ import annotations

import contextvars
import logging
from typing import TYPE_CHECKING, Any, Iterable

from .exceptions import InvalidJob, SkipJob

if TYPE_CHECKING:
    from .jobs import Job

logger = logging.getLogger("coati_queue.middleware")

current_job: contextvars.ContextVar["Job | None"] = contextvars.ContextVar(
    "coati_queue_current_job", default=None)


def get_current_job() -> "Job | None":
    """The job being executed by this thread, or None outside a task."""
    return current_job.get()


class Middleware:
    """Subclass and override the hooks you need."""

    def before_enqueue(self, driver: Any, jobs: list["Job"]) -> None:
        """Jobs about to be handed to the broker (inside the caller's transaction)."""

    def after_enqueue(self, driver: Any, jobs: list["Job"]) -> None:
        """Jobs handed to the broker."""

    def before_execute(self, driver: Any, job: "Job") -> None:
        """A worker is about to run ``job``."""

    def after_execute(self, driver: Any, job: "Job", *, result: Any = None,
                      exception: BaseException | None = None, retry_in_ms: int | None = None,
                      traceback: str = "") -> None:
        """``job`` ran: ``retry_in_ms`` is set when another attempt was scheduled."""

    def send_failed(self, driver: Any, jobs: list["Job"], error: BaseException) -> None:
        """The broker refused jobs after their transaction committed (outbox)."""

    def after_invalid_message(self, driver: Any, raw: Any, error: BaseException) -> None:
        """A message could not be decoded into a job (dead letter)."""

    def flush(self, driver: Any) -> None:
        """Write anything buffered now (end of a burst, worker shutdown, immediate mode)."""

    def worker_started(self, driver: Any, worker: Any) -> None:
        """A worker process started consuming."""

    def worker_stopped(self, driver: Any, worker: Any) -> None:
        """A worker process stopped consuming."""


class MiddlewareStack:
    def __init__(self, middleware: Iterable[Middleware] = ()):
        self.middleware = list(middleware)

    def before(self, hook: str, *args: Any, strict: bool = False, **kwargs: Any) -> None:
        for item in self.middleware:
            self._call(item, hook, args, kwargs, strict)

    def after(self, hook: str, *args: Any, **kwargs: Any) -> None:
        for item in reversed(self.middleware):
            self._call(item, hook, args, kwargs, False)

    @staticmethod
    def _call(item: Middleware, hook: str, args: tuple[Any, ...], kwargs: dict[str, Any],
              strict: bool) -> None:
        try:
            getattr(item, hook)(*args, **kwargs)
        except (SkipJob, InvalidJob):
            raise
        except Exception:
            if strict:
                raise
            logger.exception("Middleware %s.%s failed", type(item).__name__, hook)
