"""Running a job: decode, look up, call, decide on retry. Written once for every backend.

Drivers hand raw messages to :func:`execute`; it never raises, so a bad
message can never kill a worker thread. Whether and when to retry is
decided here and nowhere else.
"""

from __future__ import annotations

import json
import logging
import traceback as traceback_module
from typing import Any

from .exceptions import InvalidJob, Retry, SkipJob, TaskNotRegistered, TimeLimitExceeded
from .jobs import Job, NotJSONSerializable, ensure_json
from .middleware import current_job
from .ports import Driver, get_job_runner
from .tasks import Task, registry

logger = logging.getLogger("coati_queue.worker")


def execute(driver: Driver, raw: Any) -> None:
    """Run one message end to end; every outcome goes through the middleware."""
    try:
        job = raw if isinstance(raw, Job) else decode_message(raw, driver.settings)
    except InvalidJob as exc:
        _dead_letter(driver, raw, exc)
        return

    token = current_job.set(job)
    try:
        _run(driver, job)
    finally:
        current_job.reset(token)


def decode_message(raw: Any, settings: Any) -> Job:
    """A validated job, or ``InvalidJob`` saying why not (size, JSON, fields, queue)."""
    if isinstance(raw, (str, bytes, bytearray)):
        size = len(raw)
    else:
        try:
            size = len(json.dumps(raw, separators=(",", ":")))
        except (TypeError, ValueError, RecursionError) as exc:
            raise InvalidJob(f"message cannot be encoded as JSON: {type(exc).__name__}") from None
    if size > settings.MAX_MESSAGE_SIZE:
        raise InvalidJob(f"message is {size:,} bytes, over the {settings.MAX_MESSAGE_SIZE:,}-byte "
                         "limit (COATI_QUEUE['MAX_MESSAGE_SIZE'])")
    job = Job.decode(raw)
    if job.queue not in settings.QUEUES:
        raise InvalidJob(f"message names queue {job.queue!r}, which is not one of "
                         f"COATI_QUEUE['QUEUES'] {settings.QUEUES}")
    return job


def _dead_letter(driver: Driver, raw: Any, exc: InvalidJob) -> None:
    logger.error("Dead letter: %s", exc)
    driver.middleware.after("after_invalid_message", driver, raw, exc)


def _run(driver: Driver, job: Job) -> None:
    try:
        task = registry.get(job.task)
    except TaskNotRegistered as unknown:
        # Never resolved by import: a name from a message is only looked up.
        _dead_letter(driver, job.to_dict(), InvalidJob(str(unknown)))
        return

    try:
        driver.middleware.before("before_execute", driver, job)
    except SkipJob as skip:
        logger.info("Job %s (%s) not run: %s", job.id, job.task, skip)
        return
    except InvalidJob as invalid:
        _dead_letter(driver, job.to_dict(), invalid)
        return
    result, exc = _call(driver, task, job)
    if exc is not None:
        # Only the worker's own signal handlers stop a worker, and they never raise
        # into task threads; whatever a task raises is the task's outcome.
        retry_in = retry_delay(task.options.retry_on, job, exc)
        level = logging.WARNING if retry_in is not None else logging.ERROR
        logger.log(level, "Job %s (%s) attempt %d failed: %s%s", job.id, job.task, job.attempt,
                   _describe(exc), f"; retrying in {retry_in} ms" if retry_in is not None else "")
        driver.middleware.after("after_execute", driver, job, exception=exc,
                                retry_in_ms=retry_in, traceback=_format(exc))
        if retry_in is not None:
            driver.requeue(job.next_attempt(), retry_in)
    else:
        driver.middleware.after("after_execute", driver, job, result=result)


def _call(driver: Driver, task: Task[..., Any],
          job: Job) -> tuple[Any, BaseException | None]:
    """``(result, None)`` or ``(None, what the task raised)``, within the job's limits.

    In a worker the job is registered as running (the supervisor's hard limit, the
    soft-limit watchdog, the heartbeat's current task); in the caller (immediate
    mode, like Celery's eager mode) no limit applies.
    """
    if driver.runs_in_caller:
        return _invoke(task, job)
    try:
        outcome: tuple[Any, BaseException | None] = get_job_runner().run(
            job, lambda: _invoke(task, job))
        return outcome
    except TimeLimitExceeded as exc:
        # The soft limit fired as the task was returning: it landed after the task's own
        # code (between two bytecodes of ours), which is still this task's overrun.
        return None, exc


def _invoke(task: Task[..., Any], job: Job) -> tuple[Any, BaseException | None]:
    try:
        result = task.func(*job.args, **job.kwargs)
        ensure_json(result, f"The result of task {job.task!r}")
        return result, None
    except BaseException as exc:  # noqa: B036 - SystemExit from a task is its failure too
        return None, exc


def _describe(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__


def retry_delay(retry_on: tuple[type[BaseException], ...], job: Job,
                exc: BaseException) -> int | None:
    """Milliseconds until the next attempt, or None when this failure is final."""
    if job.retries_left <= 0:
        return None
    if isinstance(exc, TimeLimitExceeded):
        # Final unless retry_on names a time limit itself (not merely Exception).
        named = tuple(kind for kind in retry_on
                      if isinstance(kind, type) and issubclass(kind, TimeLimitExceeded))
        return job.backoff_ms() if named and isinstance(exc, named) else None
    if isinstance(exc, Retry):
        return int(exc.delay * 1000) if exc.delay is not None else job.backoff_ms()
    if isinstance(exc, NotJSONSerializable):
        return None  # a non-JSON result fails the same way every time
    if not isinstance(exc, Exception) or not isinstance(exc, retry_on):
        return None  # SystemExit, KeyboardInterrupt, time limits: final
    return job.backoff_ms()


def exception_path(exc: BaseException | type[BaseException]) -> str:
    """``module.QualName`` of an exception (or its class), as task records store it."""
    kind = exc if isinstance(exc, type) else type(exc)
    return f"{kind.__module__}.{kind.__qualname__}"


def _format(exc: BaseException) -> str:
    return "".join(traceback_module.format_exception(type(exc), exc, exc.__traceback__))
