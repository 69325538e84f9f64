"""coati_queue as a backend of Django's own tasks framework (``django.tasks``, Django 6+).

    TASKS = {"default": {"BACKEND": "coati_queue.django_tasks.CoatiTaskBackend"}}

Then ``@django.tasks.task`` functions run on coati_queue's workers (Dramatiq or
Huey, whichever ``COATI_QUEUE`` selects), tracked like any coati task, and
``result.refresh()`` / ``get_result()`` read the task record from any process.
README "Using coati_queue as a Django tasks backend" lists what each capability
flag means here and where coati differs from Django's own backends.

One generic coati task, ``coati.django_task``, carries the Django task's
dotted path, arguments and keyword arguments (and, as its one keyword, the
alias of the backend that enqueued it). Django's semantics hold where they
differ from coati's: no automatic retries (a failure is final), the return
value is normalised to JSON, and ``run_after`` defers the task. The queues are
coati's: ``COATI_QUEUE["QUEUES"]`` plus the ``QUEUES`` of every coati backend in
``TASKS`` (``coati_queue.conf.django_task_queues``).

The dotted path travels in the message, so the worker treats it as untrusted:
it imports only a path inside an installed app's package, and runs only a
``django.tasks.Task`` of this backend found there (``resolve_task``). Anything
else fails the task with ``RefusedTaskPath``; a path outside the installed apps
is refused before any import. ``enqueue`` applies the same rule, so a task the
workers would refuse is refused at once; ``get_result`` of a record naming
anything else raises ``SuspiciousOperation``, as django-tasks' DatabaseBackend does.
"""

from __future__ import annotations

import datetime
import re
from dataclasses import replace
from traceback import format_exception
from typing import Any, Iterable, Iterator

from django.apps import apps
from django.core import checks
from django.core.exceptions import ImproperlyConfigured, SuspiciousOperation, ValidationError
from django.db import transaction
from django.tasks import task_backends
from django.tasks.backends.base import BaseTaskBackend
from django.tasks.base import TASK_REFRESH_ATTRS
from django.tasks.base import Task as DjangoTask
from django.tasks.base import TaskContext, TaskError, TaskResult, TaskResultStatus
from django.tasks.exceptions import InvalidTask, InvalidTaskBackend, TaskResultDoesNotExist
from django.tasks.signals import task_enqueued, task_finished, task_started
from django.utils import timezone
from django.utils.json import normalize_json
from django.utils.module_loading import import_string

from .conf import QueueSettings, get_settings
from .core.execution import exception_path
from .core.jobs import Job
from .core.middleware import get_current_job
from .core.tasks import registry
from .models import TaskResult as TaskRecord
from .models import TaskStatus
from .clock import from_epoch

RUNNER_NAME = "coati.django_task"
#: The runner's one keyword argument: the ``TASKS`` alias that enqueued the task.
ALIAS_KWARG = "alias"

STATUS_OF_RECORD = {
    TaskStatus.PENDING: TaskResultStatus.READY,
    TaskStatus.PROCESSING: TaskResultStatus.RUNNING,
    TaskStatus.COMPLETED: TaskResultStatus.SUCCESSFUL,
    TaskStatus.FAILED: TaskResultStatus.FAILED,
    TaskStatus.CANCELLED: TaskResultStatus.FAILED,
}


class RefusedTaskPath(InvalidTask):
    """A message or record names something that is not a Django task this backend runs."""


class UnimportableTaskPath(RefusedTaskPath, ImportError):
    """A path inside an installed app that does not import (yet, or any more):
    ``get_result`` raises it as the ``ImportError`` django-tasks raises."""


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
        raise UnimportableTaskPath(f"{module_path!r} cannot be imported: {exc}") from None
    if not isinstance(target, DjangoTask):
        raise RefusedTaskPath(f"{module_path!r} is a {type(target).__name__}, not a Django task "
                              "(a function decorated with @django.tasks.task).")
    _coati_backend(target.backend, module_path)
    return target


def _coati_backend(alias: Any, module_path: str) -> "CoatiTaskBackend":
    """The coati backend configured as ``alias`` in ``TASKS``, else ``RefusedTaskPath``."""
    try:
        backend = task_backends[alias] if isinstance(alias, str) else None
    except InvalidTaskBackend:
        backend = None
    if not isinstance(backend, CoatiTaskBackend):
        raise RefusedTaskPath(f"{module_path!r} names the task backend {alias!r}, which is "
                              f"not coati_queue's ({type(backend).__name__}).")
    return backend


def _message_parts(values: Any) -> tuple[str, list, dict]:
    """``(module_path, args, kwargs)`` of a runner message or record, checked for shape."""
    if not (isinstance(values, (list, tuple)) and len(values) == 3
            and isinstance(values[1], list) and isinstance(values[2], dict)):
        raise RefusedTaskPath("A Django task message carries (module_path, args list, kwargs "
                              f"dict); got {values!r:.200}.")
    return values[0], values[1], values[2]


def _as_enqueued(module_path: str, alias: Any, queue: str,
                 run_after: datetime.datetime | None) -> DjangoTask:
    """The task as it was enqueued: its backend alias, queue and ``run_after``."""
    task = resolve_task(module_path)
    if alias is not None:  # messages from before the alias travelled have none
        _coati_backend(alias, module_path)
    return task.using(backend=alias, queue_name=queue, run_after=run_after,
                      priority=task.priority)


def runs_in_caller(queue_settings: QueueSettings) -> bool:
    """The selected coati backend runs tasks in the caller (as ``selection.choose_backend``
    decides, read from settings only: deciding costs no Redis ping)."""
    return not queue_settings.ENABLED or queue_settings.BACKEND == "immediate"


class CoatiTaskBackend(BaseTaskBackend):
    supports_get_result = True
    supports_async_task = True  # Task.call runs a coroutine function to completion
    supports_priority = False  # coati orders work by queue, not by a number inside one

    def __init__(self, alias: str, params: dict[str, Any]):
        # Without an explicit QUEUES, the valid queues are coati's, read when asked
        # (so override_settings of COATI_QUEUE applies); see ``queues``.
        self._explicit_queues = "QUEUES" in params
        self._queues: set[str] = set()
        super().__init__(alias, params)

    @property  # type: ignore[override]
    def queues(self) -> set[str]:
        return self._queues if self._explicit_queues else set(get_settings().QUEUES)

    @queues.setter
    def queues(self, value: Iterable[str]) -> None:
        self._queues = set(value)

    @property  # type: ignore[override]
    def supports_defer(self) -> bool:
        """False while tasks run in the caller (immediate backend, ``QUEUE_ENABLED`` off):
        ``run_after`` is then refused, as Django's ImmediateBackend refuses it, instead
        of running a deferred task at once."""
        return not runs_in_caller(get_settings())

    def validate_task(self, task: DjangoTask) -> None:
        super().validate_task(task)
        coati_queues = get_settings().QUEUES
        if task.queue_name not in coati_queues:  # only an explicit QUEUES of [] or bad names
            raise InvalidTask(f"Queue {task.queue_name!r} is not one of coati_queue's queues "
                              f"{coati_queues} (COATI_QUEUE['QUEUES'] and the QUEUES of "
                              "coati backends in TASKS).")

    def enqueue(self, task: DjangoTask, args: Any, kwargs: Any) -> TaskResult:
        self.validate_task(task)
        # Not in validate_task: Django calls that at definition time, before apps are ready.
        resolve_task(task.module_path)  # what the worker will accept, refused here first
        from .selection import get_queue_driver

        driver = get_queue_driver()
        job = self._job(driver, task, normalize_json(list(args)), normalize_json(dict(kwargs)))
        # Built from the envelope as the record is, so get_result() returns an equal result.
        result = TaskResult(task=task, id=job.id, status=TaskResultStatus.READY,
                            enqueued_at=from_epoch(job.enqueued_at), started_at=None,
                            finished_at=None, last_attempted_at=None, args=job.args[1],
                            kwargs=job.args[2], backend=self.alias, errors=[], worker_ids=[])
        # Inside a transaction the message leaves at commit (dispatch), and so does the
        # signal, as django-tasks' DatabaseBackend sends it: a rollback enqueued nothing.
        at_commit = (driver.settings.ENQUEUE_ON_COMMIT
                     and transaction.get_connection().in_atomic_block)
        if not driver.runs_in_caller:
            driver.dispatch([job])
            self._announce(result, at_commit)
            return result
        # As Django's ImmediateBackend: enqueued, started, finished, in that order, and the
        # result returned is the finished one (unless it runs at commit).
        self._announce(result, at_commit)
        driver.dispatch([job])
        if not at_commit:
            finished = self.get_result(job.id)
            for name in TASK_REFRESH_ATTRS:
                object.__setattr__(result, name, getattr(finished, name))
        return result

    def _announce(self, result: TaskResult, at_commit: bool) -> None:
        def send() -> None:
            task_enqueued.send(type(self), task_result=result)

        if at_commit:
            transaction.on_commit(send)
        else:
            send()

    def _job(self, driver: Any, task: DjangoTask, args: list, kwargs: dict) -> Job:
        job = driver.build_job(registry.get(RUNNER_NAME), [task.module_path, args, kwargs],
                               {ALIAS_KWARG: self.alias}, queue=task.queue_name)
        if task.run_after is None:
            return job
        run_after = task.run_after
        if timezone.is_naive(run_after):  # USE_TZ=False: local time of TIME_ZONE
            run_after = timezone.make_aware(run_after)
        eta = run_after.timestamp()  # exactly run_after, so get_result() gives it back
        if not 0 < eta < 2 ** 34:
            raise InvalidTask(f"run_after {task.run_after} is outside what a coati message "
                              "can carry (1970 to 2514).")
        return replace(job, eta=eta)

    def get_result(self, result_id: str) -> TaskResult:
        try:
            record = TaskRecord.objects.get(pk=result_id, task_name=RUNNER_NAME)
        except (TaskRecord.DoesNotExist, ValidationError):  # ValidationError: not a UUID
            raise TaskResultDoesNotExist(result_id) from None
        return result_of_record(record)

    def check(self, **kwargs: Any) -> Iterator[checks.CheckMessage]:
        """What Django's checks cannot see: queues coati cannot consume, ``run_after``
        refused, and (when ``databases`` are checked) unapplied migrations."""
        yield from super().check(**kwargs)
        try:
            queue_settings = get_settings()
        except ImproperlyConfigured:
            return  # coati_queue.E001 says why
        yield from self._queue_messages(queue_settings)
        where = f"TASKS[{self.alias!r}]"
        if self.options:
            yield checks.Warning(
                f"{where}['OPTIONS'] is ignored: CoatiTaskBackend takes its settings from "
                "COATI_QUEUE.", hint="Remove OPTIONS; set COATI_QUEUE instead.",
                obj=where, id="coati_queue.W061")
        if runs_in_caller(queue_settings):
            yield checks.Info(
                f"{where}: tasks run in the caller (COATI_QUEUE's immediate backend or "
                "QUEUE_ENABLED off), so supports_defer is False and a task with run_after "
                "is refused (InvalidTask), as Django's ImmediateBackend refuses it.",
                hint="Select the huey or dramatiq backend to defer tasks.", obj=where,
                id="coati_queue.I060")
        if kwargs.get("databases") is not None:
            yield from migration_messages([self.alias], kwargs["databases"])

    def _queue_messages(self, queue_settings: QueueSettings) -> Iterator[checks.CheckMessage]:
        where, coati_queues = f"TASKS[{self.alias!r}]", queue_settings.QUEUES
        if self._explicit_queues and not self._queues:
            yield checks.Error(
                f"{where}['QUEUES'] is empty: Django then accepts any queue name, but "
                "coati_queue's workers consume only the queues they know.",
                hint="List the queues, or leave QUEUES out to use COATI_QUEUE['QUEUES'].",
                obj=where, id="coati_queue.E060")
        unusable = sorted((q for q in self._queues if q not in coati_queues), key=str)
        if unusable:
            yield checks.Error(
                f"{where}['QUEUES'] names {unusable}, which are not coati_queue queues: "
                "enqueue() refuses their tasks and no worker consumes them.",
                hint="A queue name is a string of 1 to 64 characters. A subclass of "
                     "CoatiTaskBackend lists its queues in COATI_QUEUE['QUEUES'] too.",
                obj=where, id="coati_queue.E061")


def migration_messages(aliases: list[str], databases: Iterable[str]) -> list[checks.CheckMessage]:
    """Unapplied coati_queue migrations, when the database of task records is checked."""
    from django.db import DatabaseError, router

    from .checks import unapplied_migrations

    database = router.db_for_write(TaskRecord) or "default"
    if database not in databases:
        return []
    try:
        missing = unapplied_migrations(database)
    except DatabaseError:
        return []  # the database check reports an unreachable database
    if not missing:
        return []
    return [checks.Warning(
        f"The Django task backend(s) {', '.join(map(repr, aliases))} keep results in "
        f"coati_queue's task records, but {len(missing)} coati_queue migration(s) are not "
        f"applied to database {database!r} ({', '.join(missing)}): enqueue() and "
        "get_result() fail until they are.",
        hint=f"Run python manage.py migrate coati_queue --database {database}.",
        id="coati_queue.W062")]


@checks.register(checks.Tags.database, "coati_queue")
def check_task_backend_migrations(app_configs: Any = None, databases: Iterable[str] | None = None,
                                  **kwargs: Any) -> list[checks.CheckMessage]:
    """Django's check of task backends passes no ``databases`` to ``backend.check()``:
    the migrations part runs here, once for every coati backend in ``TASKS``."""
    if databases is None:
        return []
    from django.conf import settings

    aliases = []
    for alias in getattr(settings, "TASKS", None) or {}:
        try:
            if isinstance(task_backends[alias], CoatiTaskBackend):
                aliases.append(alias)
        except InvalidTaskBackend:
            continue  # Django's own check of TASKS reports it
    return migration_messages(aliases, databases) if aliases else []


def result_of_record(record: TaskRecord) -> TaskResult:
    """The Django result of a runner's task record."""
    try:
        module_path, args, kwargs = _message_parts(record.args)
        # Records from before the alias travelled have none: the task's own backend.
        alias = (record.kwargs or {}).get(ALIAS_KWARG)
        task = _as_enqueued(module_path, alias, record.queue, record.eta)
    except UnimportableTaskPath:
        raise  # an ImportError, as django-tasks raises for a task removed since
    except RefusedTaskPath as exc:
        raise SuspiciousOperation(f"Task {record.pk} does not point to a Django task of "
                                  f"coati_queue: {exc}") from None
    status = STATUS_OF_RECORD.get(record.status, TaskResultStatus.READY)
    errors = []
    if record.traceback or record.exception_class:
        errors.append(TaskError(
            exception_class_path=record.exception_class or exception_class_path(record.traceback),
            traceback=record.traceback))
    result = TaskResult(
        task=task, id=str(record.pk), status=status, enqueued_at=record.enqueued_at,
        started_at=record.started_at, finished_at=record.finished_at,
        last_attempted_at=record.started_at, args=args, kwargs=kwargs,
        backend=task.backend, errors=errors, worker_ids=[record.worker_id] * record.attempts)
    if status == TaskResultStatus.SUCCESSFUL:
        object.__setattr__(result, "_return_value", record.result)
    return result


#: The exception line of a formatted traceback: ``module.Class`` or ``Class``, then
#: ``:`` and the message, or nothing.
EXCEPTION_LINE = re.compile(r"^([A-Za-z_][\w.]*)(?::|$)")


def exception_class_path(traceback: str) -> str:
    """``module.Class`` parsed from a formatted traceback (records from before the
    class was stored). The exception line is the first one after the last frame, not
    the last line: a message may span lines and notes follow it."""
    lines = traceback.strip().splitlines()
    frames = [i for i, line in enumerate(lines) if line.startswith('  File "')]
    start = frames[-1] + 1 if frames else 0
    for line in lines[start:]:
        if line.startswith("    ") or line.startswith("Traceback ("):
            continue  # the frame's source line and its ^^^ markers
        match = EXCEPTION_LINE.match(line)
        if match:
            name = match.group(1)
            return name if "." in name else f"builtins.{name}"
        break
    return "builtins.Exception"


def run_django_task(module_path: str, args: list, kwargs: dict, alias: str | None = None) -> Any:
    """The worker side: call the Django task, sending Django's task signals.

    Raises ``RefusedTaskPath`` (the record ends failed) for anything ``resolve_task``
    refuses: the message, not our code, chose the path. Whatever the task raises,
    ``SystemExit`` and ``KeyboardInterrupt`` included, is its failure (the engine
    records it, with its class and traceback).
    """
    module_path, args, kwargs = _message_parts((module_path, args, kwargs))
    job = get_current_job()
    if job is None:  # called directly, not by a worker
        task = resolve_task(module_path)
    else:
        run_after = from_epoch(job.eta) if job.eta else None
        task = _as_enqueued(module_path, alias, job.queue, run_after)
    now = timezone.now()
    result = TaskResult(task=task, id=job.id if job else "", status=TaskResultStatus.RUNNING,
                        enqueued_at=from_epoch(job.enqueued_at) if job else None,
                        started_at=now, finished_at=None, last_attempted_at=now, args=args,
                        kwargs=kwargs, backend=task.backend, errors=[],
                        worker_ids=[""] * (job.attempt if job else 1))
    sender = type(task.get_backend())
    task_started.send(sender, task_result=result)
    try:
        if task.takes_context:
            value = task.call(TaskContext(task_result=result), *args, **kwargs)
        else:
            value = task.call(*args, **kwargs)
        value = normalize_json(value)
    except BaseException as exc:  # noqa: B036 - SystemExit from a task is its failure too
        object.__setattr__(result, "finished_at", timezone.now())
        object.__setattr__(result, "status", TaskResultStatus.FAILED)
        result.errors.append(TaskError(exception_class_path=exception_path(exc),
                                       traceback="".join(format_exception(exc))))
        task_finished.send(sender, task_result=result)  # here: receivers see exc_info()
        raise
    object.__setattr__(result, "finished_at", timezone.now())
    object.__setattr__(result, "status", TaskResultStatus.SUCCESSFUL)
    object.__setattr__(result, "_return_value", value)
    task_finished.send(sender, task_result=result)
    return value


registry.register(run_django_task, RUNNER_NAME, max_retries=0)
