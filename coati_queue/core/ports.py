"""What the core needs from the layers above it, as protocols plus setters.

The core imports only the standard library. Sending a job needs the driver that
``coati_queue.selection`` picks from the settings, and running a job in a worker
needs the time-limit registry of ``coati_queue.time_limits``; both are Django-side.
``CoatiQueueConfig.ready()`` installs them here, so the core calls *up* without
importing up (no import cycle, and the core type-checks and tests on its own).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Iterable, Protocol

from .exceptions import CoatiQueueError

if TYPE_CHECKING:
    from .jobs import Job
    from .middleware import MiddlewareStack
    from .tasks import Task, TaskCall


class Sender(Protocol):
    """The part of a driver that ``Task.send`` and ``Task.send_many`` use."""

    def enqueue_task(self, task: Task[..., Any], args: list[Any], kwargs: dict[str, Any], *,
                     delay: float | None = None, queue: str | None = None,
                     on_commit: bool | None = None, batch_id: int | None = None,
                     task_id: str | None = None) -> str: ...

    def enqueue_many(self, task: Task[..., Any], calls: Iterable[TaskCall], *,
                     queue: str | None = None, delay: float | None = None,
                     on_commit: bool | None = None, batch_id: int | None = None) -> list[str]: ...


class Driver(Protocol):
    """The part of a driver that :func:`coati_queue.core.execution.execute` uses."""

    settings: Any
    middleware: MiddlewareStack

    @property
    def runs_in_caller(self) -> bool: ...

    def requeue(self, job: Job, delay_ms: int) -> None: ...


class JobRunner(Protocol):
    """Runs a job's call with the job registered as running (time limits, heartbeat)."""

    def run(self, job: Job, call: Callable[[], Any]) -> Any: ...


class NotSetUp(CoatiQueueError, RuntimeError):
    """A port was used before ``CoatiQueueConfig.ready()`` installed it."""

    def __init__(self, what: str):
        super().__init__(f"coati_queue cannot {what} yet: add 'coati_queue' to INSTALLED_APPS "
                         "and call django.setup() (manage.py and WSGI/ASGI do) first.")


_sender: Callable[[], Sender] | None = None
_job_runner: Callable[[], JobRunner] | None = None


def set_sender(provider: Callable[[], Sender]) -> None:
    """Install what ``get_sender()`` calls: returns the current driver (built lazily)."""
    global _sender
    _sender = provider


def get_sender() -> Sender:
    if _sender is None:
        raise NotSetUp("send a task")
    return _sender()


def set_job_runner(provider: Callable[[], JobRunner]) -> None:
    """Install what ``get_job_runner()`` calls: returns this process's running-jobs registry."""
    global _job_runner
    _job_runner = provider


def get_job_runner() -> JobRunner:
    if _job_runner is None:
        raise NotSetUp("run a job in a worker")
    return _job_runner()

