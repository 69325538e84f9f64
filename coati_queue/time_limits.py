"""Time limits: what a worker process runs now, the soft limit, and the supervisor's feed.

Inside a worker process, every job is registered here while its task function runs
(``RunningJobs.run``, called by ``core.execution``):

* **soft limit** (``Job.soft_time_limit``): a watchdog thread raises
  ``SoftTimeLimitExceeded`` inside the task's thread with
  ``PyThreadState_SetAsyncExc``, as Dramatiq's ``TimeLimit`` does, so the task
  can clean up. It fires once; a task that catches it and carries on meets the
  hard limit.
* **hard limit** (``Job.time_limit``) is not enforced in the process: a task blocked
  in C code never sees a Python exception. Each start (with its deadline) and each
  end is one JSON line on a pipe to the supervisor (the ``runworkers`` parent),
  which kills this process at the deadline and writes the task's record
  (``hard_limit_outcome`` below, called from ``coati_queue.supervisor``).
* the heartbeat publishes the longest-running job and the number running
  (``WorkerHeartbeat.current_task_*``, ``running_tasks``).

Why a pipe: it costs one ``write()`` per start and end (no file, no fsync, no
query), and the supervisor already holds everything it needs when it kills: a
process stuck in C code, or killed, cooperates with nothing. Its end of the pipe
also tells the supervisor at once that a child died (end of file).
"""

from __future__ import annotations

import ctypes
import datetime
import json
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from .core.exceptions import SoftTimeLimitExceeded, TimeLimitExceeded
from .core.jobs import Job

logger = logging.getLogger("coati_queue.worker")


def seconds(milliseconds: float) -> str:
    """A limit as people read it: ``0.5 s``, ``1 s``, ``240 s``."""
    return f"{milliseconds / 1000:.{3 if milliseconds < 100_000 else 6}g} s"


@dataclass
class RunningJob:
    job_id: str
    task: str
    attempt: int
    thread_id: int
    started: float = field(default_factory=time.time)  # wall clock, for people
    started_mono: float = field(default_factory=time.monotonic)  # system-wide clock
    soft_ms: int | None = None
    fired: bool = False

    @property
    def soft_deadline(self) -> float | None:
        return None if self.soft_ms is None else self.started_mono + self.soft_ms / 1000

    @property
    def started_at(self) -> datetime.datetime:
        from .clock import from_epoch

        return from_epoch(self.started)


class StatusChannel:
    """The child's end of the supervisor pipe: one JSON line per event.

    Lines stay under ``PIPE_BUF`` (task names are at most 200 characters), so the
    writes of many threads never interleave. A blocking pipe: a line is never dropped
    (a dropped start would escape its hard limit); the supervisor reads continuously.
    """

    def __init__(self, fd: int):
        self.fd = fd
        self.broken = False

    def send(self, **event: Any) -> None:
        if self.broken:
            return
        try:
            os.write(self.fd, (json.dumps(event, separators=(",", ":")) + "\n").encode())
        except OSError as exc:  # the supervisor is gone; this process dies with it
            self.broken = True
            logger.warning("Lost the pipe to the supervisor (%s); hard time limits are no "
                           "longer enforced for this process.", exc)


class RunningJobs:
    """The jobs this process runs now, by thread; the soft-limit watchdog."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._entries: dict[int, RunningJob] = {}
        self._watchdog: threading.Thread | None = None
        self.channel: StatusChannel | None = None
        self.ended = 0
        #: Called in the task's thread after each task with the number ended so far
        #: (``--max-tasks-per-child``: the process stops taking work at once).
        self.on_end: Callable[[int], None] | None = None

    def run(self, job: Job, call: Callable[[], Any]) -> Any:
        """``call()`` with ``job`` registered as running in this thread."""
        thread_id = threading.get_ident()
        try:
            self._start(job, thread_id)
            return call()
        finally:
            self._finish(thread_id, job.id)

    def _start(self, job: Job, thread_id: int) -> None:
        entry = RunningJob(job.id, job.task, job.attempt, thread_id, soft_ms=job.soft_time_limit)
        with self._lock:
            self._entries[thread_id] = entry
            if entry.soft_ms is not None:
                if self._watchdog is None or not self._watchdog.is_alive():
                    self._watchdog = threading.Thread(target=self._watch, daemon=True,
                                                      name="coati-soft-time-limits")
                    self._watchdog.start()
                self._changed.notify()
        if self.channel is not None:
            self.channel.send(e="start", id=job.id, task=job.task, queue=job.queue,
                              attempt=job.attempt, max_retries=job.max_retries,
                              t=entry.started_mono,
                              wall=entry.started, hard=job.time_limit)

    def _finish(self, thread_id: int, job_id: str) -> None:
        ended = None
        while True:
            try:
                with self._lock:
                    entry = self._entries.get(thread_id)
                    if entry is not None and entry.job_id == job_id:
                        ended = entry
                        del self._entries[thread_id]
                        if entry.fired:  # an exception still pending must not escape later
                            _set_async_exc(thread_id, None)
                            SoftTimeLimitExceeded.pending_messages.pop(thread_id, None)
                break
            except TimeLimitExceeded:
                continue  # fired as the task returned and landed here: remove again
        if ended is None:
            return
        if self.channel is not None:
            self.channel.send(e="end", id=job_id)
        with self._lock:
            self.ended += 1
            count = self.ended
        if self.on_end is not None:
            self.on_end(count)

    def snapshot(self) -> tuple[RunningJob | None, int]:
        """The longest-running job (or None) and how many run now."""
        with self._lock:
            entries = list(self._entries.values())
        oldest = min(entries, key=lambda entry: entry.started_mono) if entries else None
        return oldest, len(entries)

    def _watch(self) -> None:
        with self._changed:
            while True:
                armed = [entry for entry in self._entries.values()
                         if entry.soft_ms is not None and not entry.fired]
                if not armed:
                    self._changed.wait()
                    continue
                first = min(armed, key=lambda entry: entry.soft_deadline)
                now = time.monotonic()
                if first.soft_deadline > now:
                    self._changed.wait(first.soft_deadline - now)
                    continue
                self._fire(first, now)

    @staticmethod
    def _fire(entry: RunningJob, now: float) -> None:
        message = (f"Soft time limit of {seconds(entry.soft_ms)} exceeded after "
                   f"{now - entry.started_mono:.2f} s")
        entry.fired = True
        SoftTimeLimitExceeded.pending_messages[entry.thread_id] = message
        if _set_async_exc(entry.thread_id, SoftTimeLimitExceeded) != 1:
            SoftTimeLimitExceeded.pending_messages.pop(entry.thread_id, None)
            return
        logger.warning("Job %s (%s): %s; SoftTimeLimitExceeded raised in the task.",
                       entry.job_id, entry.task, message)


def _set_async_exc(thread_id: int, exception: type[BaseException] | None) -> int:
    """Raise ``exception`` in thread ``thread_id`` at its next bytecode (None: cancel)."""
    target = ctypes.py_object(exception) if exception is not None else None
    return ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread_id), target)


_running: RunningJobs | None = None
_running_lock = threading.Lock()


def running_jobs() -> RunningJobs:
    """This process's registry, made on first use (never at import)."""
    global _running
    if _running is None:
        with _running_lock:
            if _running is None:
                _running = RunningJobs()
    return _running


def reset_running_jobs() -> None:
    """A forked child starts with an empty registry (the parent's threads are not its own)."""
    global _running
    _running = None


# -- the supervisor's side: the record of a task killed at its hard limit ------------------
@dataclass
class ChildJob:
    """A job a child reported as running (from its ``start`` line)."""

    job_id: str
    task: str
    queue: str
    attempt: int
    max_retries: int
    started_mono: float
    started: float
    hard_ms: int | None

    @property
    def deadline(self) -> float | None:
        return None if self.hard_ms is None else self.started_mono + self.hard_ms / 1000

    @classmethod
    def from_event(cls, event: dict[str, Any]) -> "ChildJob":
        hard = event.get("hard")
        return cls(str(event["id"]), str(event["task"]), str(event["queue"]),
                   int(event["attempt"]),
                   int(event.get("max_retries") or 0), float(event["t"]),
                   float(event.get("wall") or time.time()),
                   int(hard) if hard else None)


@dataclass(kw_only=True)
class ChildFeed:
    """The supervisor's view of one child, from the lines the child wrote on its pipe."""

    ready: bool = False  # its consumer started (or it started a task)
    worker_id: str = ""
    lease: str | None = None
    jobs: dict[str, ChildJob] = field(default_factory=dict)
    done: int = 0  # tasks ended
    recycle_reason: str = ""  # it stopped taking work on its own (--max-tasks-per-child)
    buffer: bytes = b""

    def feed(self, data: bytes) -> set[str]:
        """Apply the complete lines of ``data``; returns the kinds of event seen."""
        self.buffer += data
        *lines, self.buffer = self.buffer.split(b"\n")
        kinds = set()
        for line in lines:
            try:
                event = json.loads(line)
                kind = event["e"]
                if kind == "start":
                    job = ChildJob.from_event(event)
                    self.jobs[job.job_id] = job
                    self.ready = True
                elif kind == "end" and self.jobs.pop(str(event["id"]), None) is not None:
                    self.done += 1
                elif kind == "ready":
                    self.ready, self.worker_id = True, str(event["worker"])
                    self.lease = event.get("lease")
                elif kind == "recycle":
                    self.recycle_reason = str(event["reason"])
                kinds.add(kind)
            except (ValueError, KeyError, TypeError) as exc:
                logger.warning("Unreadable line from a worker process (%s): %r", exc,
                               line[:200])
        return kinds


def hard_limit_outcome(driver: Any, job: ChildJob, ran: float, worker_id: str,
                       pid: int) -> str:
    """Write the record of ``job``, whose process the supervisor has killed.

    Written after the kill: the frozen process may hold a database lock (SQLite's is
    the whole database) that only its death releases. Its message was discarded from
    the broker before the kill, so nothing gives it back; and should it come back
    anyway (the discard failed), the record is failed at the job's attempt, which a
    redelivery of that attempt cannot claim. With a ``retry_on`` that names
    ``TimeLimitExceeded``, the record goes back to ``pending`` at the next attempt
    number (still unclaimable by the old attempt) and that attempt is sent. Returns
    the error and what was done, for the log line.
    """
    from dataclasses import replace

    from django.utils import timezone

    from .core.execution import exception_path, retry_delay
    from .core.tasks import registry
    from .models import TaskResult, TaskStatus
    from .reconcile import job_from_record

    error = f"Hard time limit of {seconds(job.hard_ms or 0)} exceeded after {ran:.2f} s"
    note = (f"TimeLimitExceeded: {error}\nThe runworkers supervisor killed worker process "
            f"{pid} (SIGKILL) and started a new one; the task had no Python traceback.")
    settings = driver.settings
    options = registry.get(job.task).options if job.task in registry else None
    stub = Job(task=job.task, id=job.job_id, attempt=job.attempt, max_retries=job.max_retries,
               min_backoff=(options and options.min_backoff) or settings.MIN_BACKOFF,
               max_backoff=(options and options.max_backoff) or settings.MAX_BACKOFF)
    retry_in = retry_delay(options.retry_on if options else (), stub, TimeLimitExceeded(error))
    now = timezone.now()
    record = TaskResult.objects.filter(pk=job.job_id, attempts__lte=job.attempt,
                                       status__in=[TaskStatus.PENDING, TaskStatus.PROCESSING])
    if retry_in is None:
        written = record.update(
            status=TaskStatus.FAILED, error=error, traceback=note, attempts=job.attempt,
            exception_class=exception_path(TimeLimitExceeded),
            finished_at=now, duration_seconds=ran, worker_id=worker_id,
            expires_at=now + datetime.timedelta(seconds=settings.FAILURE_TTL))
        return f"{error}; failed" if written else f"{error}; no record to update"
    current = record.first()  # read before the write: nothing may fail after it
    if current is None or not record.update(status=TaskStatus.PENDING, error=error,
                                            traceback=note, attempts=job.attempt + 1,
                                            exception_class=exception_path(TimeLimitExceeded),
                                            worker_id=""):
        return f"{error}; no record to update"
    # A first delivery of the next attempt (not claimed: its record says pending at that
    # attempt); requeue() sets its eta, and parks it in the outbox if the broker refuses.
    driver.requeue(replace(job_from_record(current, job.attempt + 1), delivery=1), retry_in)
    return f"{error}; retried as attempt {job.attempt + 1} in {retry_in} ms"


def short_lock_waits(milliseconds: int = 100) -> None:
    """Make the default database connection give up on a lock after ``milliseconds``.

    The supervisor writes while a child may be frozen holding a lock (a task stuck in
    C code with the GIL freezes the process's tracking writer mid-transaction; on
    SQLite that lock is the whole database). It must not wait for it: it would stop
    killing children, including the frozen one. It retries later instead. The caller
    closes the connection afterwards, so the setting never outlives its writes.
    """
    from django.db import connection

    statements = {"sqlite": f"PRAGMA busy_timeout = {milliseconds}",
                  "postgresql": f"SET lock_timeout = {milliseconds}",
                  "mysql": f"SET SESSION innodb_lock_wait_timeout = {max(milliseconds // 1000, 1)}"}
    statement = statements.get(connection.vendor)
    if statement:
        with connection.cursor() as cursor:
            cursor.execute(statement)


def give_back_records(job_ids: list[str], worker_id: str) -> int:
    """Records of jobs the supervisor took from a child it killed (not the task's fault):
    back to ``pending``, so their redelivery claims them without counting a lost worker."""
    from django.db.models import F

    from .models import TaskResult, TaskStatus

    if not job_ids or not worker_id:
        return 0
    return TaskResult.objects.filter(pk__in=job_ids, status=TaskStatus.PROCESSING,
                                     worker_id=worker_id).update(
        status=TaskStatus.PENDING, worker_id="", attempts=F("attempts") - 1)


@dataclass
class _Deferred:
    what: str
    action: Callable[[], Any]
    since: float
    due: float
    tries: int = 0


class DeferredWrites:
    """The supervisor's writes for children it killed, done between two turns of its
    loop, in order, each giving up on a lock at once (``short_lock_waits``) and tried
    again later, so a frozen child holding a lock never stops the supervisor."""

    give_up_after = 120.0  # seconds; the reconciler repairs what was abandoned

    def __init__(self) -> None:
        self._items: list[_Deferred] = []

    def __bool__(self) -> bool:
        return bool(self._items)

    def add(self, what: str, action: Callable[[], Any]) -> None:
        now = time.monotonic()
        self._items.append(_Deferred(what, action, now, now))

    def next_due(self) -> float:
        return self._items[0].due

    def run(self) -> None:
        from django.db import DatabaseError, connections

        from .core.exceptions import BackendUnavailable

        while self._items:
            item, now = self._items[0], time.monotonic()
            if item.due > now:
                return
            try:
                short_lock_waits()
                result = item.action()
            except (DatabaseError, BackendUnavailable) as exc:
                if now - item.since < self.give_up_after:
                    item.tries += 1
                    item.due = now + min(0.05 * 2 ** item.tries, 5.0)
                    logger.debug("Writing %s waits (%s)", item.what, exc)
                    return
                logger.error("Gave up writing %s after %.0f s: %s", item.what,
                             now - item.since, exc)
            else:
                if isinstance(result, str):
                    logger.info("Wrote %s: %s.", item.what, result)
            finally:
                connections.close_all()
            self._items.pop(0)
