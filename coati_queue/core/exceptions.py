"""One error tree; each message says what was wrong and how to fix it.

Pure Python like the rest of the core: no error here subclasses Django's. The
Django layer adds that where it belongs (``coati_queue.selection`` raises
``BackendUnavailable`` subclasses that are also ``ImproperlyConfigured`` for
settings problems; a broker outage is not a configuration error).
"""

from __future__ import annotations

import difflib
from typing import Iterable


class CoatiQueueError(Exception):
    """Base class of every error raised by coati_queue."""


class TaskNotRegistered(CoatiQueueError, LookupError):
    def __init__(self, name: str, known: Iterable[str] = ()):
        known = sorted(known)
        close = difflib.get_close_matches(name, known, n=3, cutoff=0.5)
        hint = f" Did you mean: {', '.join(close)}?" if close else ""
        listing = f" Registered tasks: {', '.join(known)}." if known and not close else ""
        super().__init__(
            f"No task named {name!r} is registered.{hint}{listing} "
            "Tasks are registered by @coati_queue.task or queue.register_task(), "
            "and tasks.py of installed apps is imported at startup."
        )
        self.name = name
        self.suggestions = close


class TaskAlreadyRegistered(CoatiQueueError, ValueError):
    pass


class InvalidJob(CoatiQueueError, ValueError):
    """A message that cannot be decoded into a job (bad JSON, missing fields)."""


class SkipJob(CoatiQueueError):
    """Raised by a ``before_execute`` hook: this delivery must not run, and it is not a
    failure (the task already ran or is running elsewhere, or was failed for good)."""


class BackendUnavailable(CoatiQueueError):
    """The configured backend cannot be reached or built."""


class StorageUnavailable(BackendUnavailable):
    """No candidate directory for Huey's file storage is usable."""


class TimeLimitExceeded(CoatiQueueError):
    """A task ran past a time limit. Final unless the task's ``retry_on`` names this
    class (or ``SoftTimeLimitExceeded``): a task that overran once will likely overrun
    again, and ``retry_on=(Exception,)`` must not mean "retry every overrun".

    The hard limit is never raised inside the task: the supervisor kills the worker
    process, and this is the error its record gets.
    """


class SoftTimeLimitExceeded(TimeLimitExceeded):
    """Raised inside a task's thread at its soft time limit, so it can clean up.

    Raised asynchronously (between two Python bytecodes of the task), like
    Dramatiq's and Celery's: a task blocked in a C call sees it when the call
    returns, or is killed at the hard limit first.
    """

    #: Messages waiting for the next instance raised in a thread, by thread id: an
    #: asynchronous exception is raised as a bare class, so its text is passed here.
    pending_messages: dict[int, str] = {}

    def __init__(self, *args: object):
        if not args:
            import threading

            message = self.pending_messages.pop(threading.get_ident(), None)
            args = (message,) if message else ("Soft time limit exceeded",)
        super().__init__(*args)


class Retry(CoatiQueueError):
    """Raise inside a task to ask for another attempt (counts against max_retries)."""

    def __init__(self, message: str = "retry requested", delay: float | None = None):
        super().__init__(message)
        self.delay = delay
