"""coati_queue: background jobs for Django on Dramatiq+Redis or Huey+filesystem.

Public API (nothing is built on import)::

    from coati_queue import task, get_queue_driver
"""

from typing import TYPE_CHECKING

from .core.exceptions import (BackendUnavailable, CoatiQueueError, InvalidJob, Retry,
                              SoftTimeLimitExceeded, StorageUnavailable, TaskNotRegistered,
                              TimeLimitExceeded)
from .core.middleware import Middleware, get_current_job
from .core.tasks import Task, TaskDecorator, task

if TYPE_CHECKING:
    from .backends.base import QueueDriver

__all__ = [
    "BackendUnavailable", "CoatiQueueError", "InvalidJob", "Middleware", "Retry",
    "SoftTimeLimitExceeded", "StorageUnavailable", "Task", "TaskDecorator", "TaskNotRegistered",
    "TimeLimitExceeded", "get_current_job", "get_queue_driver", "task",
]
__version__ = "0.1.0"


def get_queue_driver(force_backend: str | None = None) -> "QueueDriver":
    """The process-wide queue driver; see ``coati_queue.selection``."""
    from .selection import get_queue_driver as _get

    return _get(force_backend)
