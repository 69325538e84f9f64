"""coati_queue as a backend of Django's own tasks framework (``django.tasks``, Django 6+).

    TASKS = {"default": {"BACKEND": "coati_queue.django_tasks.CoatiTaskBackend"}}

Then ``@django.tasks.task`` functions run on coati_queue's workers (Dramatiq or
Huey, whichever ``COATI_QUEUE`` selects), tracked like any coati task, and
``result.refresh()`` / ``get_result()`` read the task record from any process.

One generic coati task, ``coati.django_task``, carries the Django task's
dotted path, arguments and keyword arguments. Django's semantics hold where
they differ from coati's: no automatic retries (a failure is final), the
return value is normalised to JSON, and ``run_after`` defers the task.
Queues default to ``COATI_QUEUE["QUEUES"]``; Django's per-task ``priority``
is refused (coati orders work by queue, not by a number inside a queue).

The dotted path travels in the message, so the worker treats it as untrusted:
it imports only a path inside an installed app's package, and runs only a
``django.tasks.Task`` of this backend found there (``resolve_task``). Anything
else fails the task with ``RefusedTaskPath``; a path outside the installed apps
is refused before any import. ``enqueue`` applies the same rule, so a task the
workers would refuse is refused at once.
"""

from __future__ import annotations

from traceback import format_exception
from typing import Any

from django.apps import apps
from django.core.exceptions import ValidationError
from django.tasks.backends.base import BaseTaskBackend
from django.tasks.base import (Task as DjangoTask, TaskContext, TaskError, TaskResult,
                               TaskResultStatus)
from django.tasks.exceptions import InvalidTask, TaskResultDoesNotExist
from django.tasks.signals import task_enqueued, task_finished, task_started
from django.utils import timezone
from django.utils.json import normalize_json
from django.utils.module_loading import import_string

from .conf import get_settings
from .core.middleware import get_current_job
from .core.tasks import registry
from .models import TaskResult as TaskRecord, TaskStatus

RUNNER_NAME = "coati.django_task"

STATUS_OF_RECORD = {
    TaskStatus.PENDING: TaskResultStatus.READY,
    TaskStatus.PROCESSING: TaskResultStatus.RUNNING,
    TaskStatus.COMPLETED: TaskResultStatus.SUCCESSFUL,
    TaskStatus.FAILED: TaskResultStatus.FAILED,
    TaskStatus.CANCELLED: TaskResultStatus.FAILED,
}


class RefusedTaskPath(InvalidTask):
    """A message or record names something that is not a Django task this backend runs."""


def _inside_installed_app(module_path: str) -> bool:
    return any(module_path.startswith(f"{config.name}.") for config in apps.get_app_configs())


def resolve_task(module_path: Any) -> DjangoTask:
    """The Django task at ``module_path``, imported only from inside an installed app.

    The path comes from a message (or a record written from one): importing any
    path would let a planted message import any module and call any function.
    """
    parts = module_path.split(".") if isinstance(module_path, str) else []
    if len(parts) < 2 or not all(p.isidentifier() and not p.startswith("__") for p in parts):
        raise RefusedTaskPath(f"{module_path!r} is not the dotted path of a Django task.")
    if not _inside_installed_app(module_path):
        raise RefusedTaskPath(
            f"{module_path!r} is not inside an installed app: coati_queue runs only Django "
            "tasks defined in the modules of INSTALLED_APPS (refused without importing it).")
    try:
        target = import_string(module_path)
    except ImportError as exc:
        raise RefusedTaskPath(f"{module_path!r} cannot be imported: {exc}") from None
    if not isinstance(target, DjangoTask):
        raise RefusedTaskPath(f"{module_path!r} is a {type(target).__name__}, not a Django task "
                              "(a function decorated with @django.tasks.task).")
    backend = target.get_backend()
    if not isinstance(backend, CoatiTaskBackend):
        raise RefusedTaskPath(f"{module_path!r} is a task of the {target.backend!r} backend "
                              f"({type(backend).__name__}), not of coati_queue's.")
    return target


def _message_parts(values: Any) -> tuple[str, list, dict]:
    """``(module_path, args, kwargs)`` of a runner message or record, checked for shape."""
    if not (isinstance(values, (list, tuple)) and len(values) == 3
            and isinstance(values[1], list) and isinstance(values[2], dict)):
        raise RefusedTaskPath("A Django task message carries (module_path, args list, kwargs "
                              f"dict); got {values!r:.200}.")
    return values[0], values[1], values[2]


class CoatiTaskBackend(BaseTaskBackend):
    supports_defer = True
    supports_get_result = True
    supports_async_task = True  # Task.call runs a coroutine function to completion

    def __init__(self, alias: str, params: dict[str, Any]):
        super().__init__(alias, params)
        # Without an explicit QUEUES, the valid queues are coati's, read when checked
        # (so override_settings of COATI_QUEUE applies).
        self._explicit_queues = "QUEUES" in params
        if not self._explicit_queues:
            self.queues = set()

    def validate_task(self, task: DjangoTask) -> None:
        super().validate_task(task)
        if not self._explicit_queues and task.queue_name not in get_settings().QUEUES:
            raise InvalidTask(f"Queue {task.queue_name!r} is not one of COATI_QUEUE['QUEUES'] "
                              f"{get_settings().QUEUES}.")

    def enqueue(self, task: DjangoTask, args: Any, kwargs: Any) -> TaskResult:
        self.validate_task(task)
        # Not in validate_task: Django calls that at definition time, before apps are ready.
        resolve_task(task.module_path)  # what the worker will accept, refused here first
        args, kwargs = normalize_json(list(args)), normalize_json(dict(kwargs))
        delay = None
        if task.run_after is not None:
            delay = max((task.run_after - timezone.now()).total_seconds(), 0.0)
        task_id = registry.get(RUNNER_NAME).send_with_options(
            args=(task.module_path, args, kwargs), queue=task.queue_name, delay=delay)
        result = TaskResult(task=task, id=task_id, status=TaskResultStatus.READY,
                            enqueued_at=timezone.now(), started_at=None, finished_at=None,
                            last_attempted_at=None, args=args, kwargs=kwargs,
                            backend=self.alias, errors=[], worker_ids=[])
        task_enqueued.send(type(self), task_result=result)
        return result

    def get_result(self, result_id: str) -> TaskResult:
        try:
            record = TaskRecord.objects.get(pk=result_id, task_name=RUNNER_NAME)
        except (TaskRecord.DoesNotExist, ValidationError):  # ValidationError: not a UUID
            raise TaskResultDoesNotExist(result_id) from None
        module_path, args, kwargs = _message_parts(record.args)
        result = TaskResult(
            task=resolve_task(module_path), id=str(record.pk),
            status=STATUS_OF_RECORD.get(record.status, TaskResultStatus.READY),
            enqueued_at=record.enqueued_at, started_at=record.started_at,
            finished_at=record.finished_at, last_attempted_at=record.started_at,
            args=args, kwargs=kwargs, backend=self.alias,
            errors=[TaskError(exception_class_path=exception_class_path(record.traceback),
                              traceback=record.traceback)] if record.traceback else [],
            worker_ids=[record.worker_id] * record.attempts)
        object.__setattr__(result, "_return_value", record.result)
        return result


def exception_class_path(traceback: str) -> str:
    """``module.Class`` from a formatted traceback's last line (builtins unqualified)."""
    last = traceback.strip().splitlines()[-1] if traceback.strip() else "Exception"
    name = last.split(":", 1)[0].strip()
    return name if "." in name else f"builtins.{name}"


def run_django_task(module_path: str, args: list, kwargs: dict) -> Any:
    """The worker side: call the Django task, sending Django's task signals.

    Raises ``RefusedTaskPath`` (the record ends failed) for anything ``resolve_task``
    refuses: the message, not our code, chose the path.
    """
    module_path, args, kwargs = _message_parts((module_path, args, kwargs))
    task = resolve_task(module_path)
    job = get_current_job()
    now = timezone.now()
    result = TaskResult(task=task, id=job.id if job else "", status=TaskResultStatus.RUNNING,
                        enqueued_at=None, started_at=now, finished_at=None,
                        last_attempted_at=now, args=args, kwargs=kwargs, backend=task.backend,
                        errors=[], worker_ids=[""] * (job.attempt if job else 1))
    task_started.send(type(task.get_backend()), task_result=result)
    try:
        if task.takes_context:
            value = task.call(TaskContext(task_result=result), *args, **kwargs)
        else:
            value = task.call(*args, **kwargs)
        value = normalize_json(value)
    except Exception as exc:
        object.__setattr__(result, "status", TaskResultStatus.FAILED)
        result.errors.append(TaskError(
            exception_class_path=f"{type(exc).__module__}.{type(exc).__qualname__}",
            traceback="".join(format_exception(exc))))
        raise
    else:
        object.__setattr__(result, "status", TaskResultStatus.SUCCESSFUL)
        object.__setattr__(result, "_return_value", value)
        return value
    finally:
        object.__setattr__(result, "finished_at", timezone.now())
        task_finished.send(type(task.get_backend()), task_result=result)


registry.register(run_django_task, RUNNER_NAME, max_retries=0)
