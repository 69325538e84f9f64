"""Task objects, the ``@task`` decorator and the process-wide name registry.

Tasks are registered by name, independently of any backend, so the driver
can be rebuilt (settings changed, another backend forced) without losing
them, and a worker of either backend resolves the same names.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import (Any, Callable, Generic, Iterable, Mapping, ParamSpec, Protocol, TypeVar,
                    overload)

from .exceptions import TaskAlreadyRegistered, TaskNotRegistered
from .ports import get_sender

P = ParamSpec("P")
R = TypeVar("R")
#: One call for ``Task.send_many``: ``(args, kwargs)``.
TaskCall = tuple[Iterable[Any], Mapping[str, Any]]


@dataclass(frozen=True)
class TaskOptions:
    """Per-task overrides; ``None`` means "use the COATI_QUEUE default"."""

    queue: str | None = None
    max_retries: int | None = None
    min_backoff: int | None = None
    max_backoff: int | None = None
    time_limit: int | None = None
    soft_time_limit: int | None = None
    retry_on: tuple[type[BaseException], ...] = (Exception,)

    def time_limits(self, settings: Any) -> tuple[int | None, int | None]:
        """``(hard, soft)`` milliseconds for this task's jobs; ``None`` is no limit.

        A task's own value wins; ``None`` takes ``COATI_QUEUE['TIME_LIMIT']`` /
        ``['SOFT_TIME_LIMIT']``; ``0`` turns that limit off for this task.
        """
        return (_limit(self.time_limit, settings.TIME_LIMIT),
                _limit(self.soft_time_limit, settings.SOFT_TIME_LIMIT))


def _limit(own: int | None, default: int | None) -> int | None:
    value = default if own is None else own
    return value or None


class Task(Generic[P, R]):
    """A registered function. Call it to run inline; ``send`` to run it on a worker.

    Generic in the function's parameters and result, so a type checker checks the
    arguments of a direct call and of ``send`` against the decorated function.
    """

    def __init__(self, func: Callable[P, R], name: str, options: TaskOptions):
        self.func = func
        self.name = name
        self.options = options
        self.__doc__ = func.__doc__
        self.__wrapped__ = func

    def __repr__(self) -> str:
        return f"<Task {self.name}>"

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R:
        return self.func(*args, **kwargs)

    def send(self, *args: P.args, **kwargs: P.kwargs) -> str:
        """Enqueue with the task's defaults; returns the task id at once."""
        return self.send_with_options(args=args, kwargs=kwargs)

    def send_with_options(self, *, args: Iterable[Any] = (),
                          kwargs: Mapping[str, Any] | None = None,
                          delay: float | None = None, queue: str | None = None,
                          on_commit: bool | None = None, batch_id: int | None = None,
                          task_id: str | None = None) -> str:
        """Enqueue with per-call options: ``delay`` in seconds, another ``queue``,
        ``on_commit=False`` to send now even inside a transaction (``batch_id`` and
        ``task_id`` are for coati_queue's own batches and re-sends).

        ``args``/``kwargs`` are not checked against the function by a type checker
        (a ParamSpec cannot be split into a tuple and a dict); ``send`` is.
        """
        return get_sender().enqueue_task(self, list(args), dict(kwargs or {}), delay=delay,
                                         queue=queue, on_commit=on_commit,
                                         batch_id=batch_id, task_id=task_id)

    def send_many(self, calls: Iterable[TaskCall], *,
                  queue: str | None = None, delay: float | None = None,
                  on_commit: bool | None = None, batch_id: int | None = None) -> list[str]:
        """Enqueue many calls as one bulk write; ``calls`` yields ``(args, kwargs)``."""
        return get_sender().enqueue_many(self, calls, queue=queue, delay=delay,
                                         on_commit=on_commit, batch_id=batch_id)


class TaskRegistry:
    def __init__(self) -> None:
        self._tasks: dict[str, Task[..., Any]] = {}
        self._lock = threading.Lock()

    def register(self, func: Callable[P, R], name: str | None = None, *, replace: bool = True,
                 task_class: type[Task[Any, Any]] = Task, **options: Any) -> Task[P, R]:
        """Register ``func`` under ``name`` (default: ``module.qualname``).

        Registering the same name again replaces it (re-imports, autoreload),
        unless ``replace=False``.
        """
        task_name = name or f"{func.__module__}.{func.__qualname__}"
        if isinstance(func, Task):
            func = func.func
        retry_on = options.pop("retry_on", (Exception,))
        task = task_class(func, task_name, TaskOptions(retry_on=tuple(retry_on), **options))
        with self._lock:
            if not replace and task_name in self._tasks:
                raise TaskAlreadyRegistered(f"A task named {task_name!r} is already registered.")
            self._tasks[task_name] = task
        return task

    def get(self, name: str) -> Task[..., Any]:
        try:
            return self._tasks[name]
        except KeyError:
            raise TaskNotRegistered(name, self._tasks) from None

    def names(self) -> list[str]:
        return sorted(self._tasks)

    def __contains__(self, name: str) -> bool:
        return name in self._tasks


registry = TaskRegistry()


class TaskDecorator(Protocol):
    """What ``@task(...)`` returns: turns a function into a ``Task`` of its signature."""

    def __call__(self, func: Callable[P, R], /) -> Task[P, R]: ...


@overload
def task(func: Callable[P, R], /) -> Task[P, R]: ...


@overload
def task(*, name: str | None = None, queue: str | None = None, max_retries: int | None = None,
         min_backoff: int | None = None, max_backoff: int | None = None,
         time_limit: int | None = None, soft_time_limit: int | None = None,
         retry_on: tuple[type[BaseException], ...] = (Exception,)) -> TaskDecorator: ...


def task(func: Callable[..., Any] | None = None, *, name: str | None = None,
         queue: str | None = None, max_retries: int | None = None,
         min_backoff: int | None = None, max_backoff: int | None = None,
         time_limit: int | None = None, soft_time_limit: int | None = None,
         retry_on: tuple[type[BaseException], ...] = (Exception,)
         ) -> Task[..., Any] | TaskDecorator:
    """Decorator: ``@task`` or ``@task(name=..., queue=..., max_retries=...)``.

    Backoffs and time limits are milliseconds, as in Dramatiq. ``time_limit`` (hard:
    the worker process is killed) and ``soft_time_limit`` (``SoftTimeLimitExceeded``
    is raised inside the task) default to ``COATI_QUEUE['TIME_LIMIT']`` and
    ``['SOFT_TIME_LIMIT']``; ``0`` turns one off for this task.
    """
    def decorate(target: Callable[P, R], /) -> Task[P, R]:
        return registry.register(target, name, queue=queue, max_retries=max_retries,
                                 min_backoff=min_backoff, max_backoff=max_backoff,
                                 time_limit=time_limit, soft_time_limit=soft_time_limit,
                                 retry_on=retry_on)

    return decorate(func) if func is not None else decorate
