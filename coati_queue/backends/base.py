"""The driver contract: public methods once here, small primitives per backend.

``enqueue``/``enqueue_many`` (JSON checks, options, on-commit), results and
stats are written once; a driver only implements ``send``, ``queue_depths``,
``start_consumer`` and ``describe``. Retries come from ``core.execution``.
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace
from typing import Any, Callable, Iterable, Protocol

from django.db import transaction

from ..conf import QueueSettings
from ..core.exceptions import BackendUnavailable
from ..core.execution import execute
from ..core.jobs import Job, ensure_json_arguments, new_job_id
from ..core.middleware import Middleware, MiddlewareStack
from ..core.tasks import Task, TaskCall, registry

logger = logging.getLogger("coati_queue")


class Consumer(Protocol):
    """What ``runworkers`` needs from a started native worker."""

    def is_idle(self) -> bool: ...

    def stop(self, graceful: bool = True) -> None: ...


class QueueDriver:
    name = "base"
    runs_in_caller = False

    def __init__(self, settings: QueueSettings, *, reason: str = "",
                 middleware: Iterable[Middleware] | None = None):
        self.settings = settings
        self.reason = reason
        if middleware is None:
            from ..middleware import default_middleware

            middleware = default_middleware(settings)
        self.middleware = MiddlewareStack(middleware)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.describe()}>"

    # -- registration -----------------------------------------------------
    def register_task(self, func: Callable[..., Any], name: str | None = None,
                      **options: Any) -> Task[..., Any]:
        """Register ``func``; options as for ``@coati_queue.task``."""
        return registry.register(func, name, **options)

    # -- enqueue ----------------------------------------------------------
    def enqueue(self, task_name: str, *args: Any, delay: float | None = None,
                queue: str | None = None, **kwargs: Any) -> str:
        """Origin-design API: ``enqueue("name", employee_id="1", delay=300)``.

        ``delay`` (seconds) and ``queue`` are options, not task arguments; use
        ``Task.send_with_options`` for a task that takes arguments so named.
        """
        return self.enqueue_task(registry.get(task_name), list(args), kwargs, delay=delay,
                                 queue=queue)

    def enqueue_task(self, task: Task[..., Any], args: list[Any], kwargs: dict[str, Any], *,
                     delay: float | None = None, queue: str | None = None,
                     on_commit: bool | None = None, batch_id: int | None = None,
                     task_id: str | None = None) -> str:
        job = self.build_job(task, args, kwargs, queue=queue, delay=delay, batch_id=batch_id,
                             task_id=task_id)
        self.dispatch([job], on_commit=on_commit)
        return job.id

    def enqueue_many(self, task: Task[..., Any] | str, calls: Iterable[TaskCall], *,
                     queue: str | None = None, delay: float | None = None,
                     on_commit: bool | None = None, batch_id: int | None = None) -> list[str]:
        """Bulk enqueue: one tracking INSERT per 500 jobs, one broker round trip."""
        task = registry.get(task) if isinstance(task, str) else task
        jobs = [self.build_job(task, list(args), dict(kwargs), queue=queue, delay=delay,
                               batch_id=batch_id) for args, kwargs in calls]
        self.dispatch(jobs, on_commit=on_commit)
        return [job.id for job in jobs]

    def build_job(self, task: Task[..., Any], args: list[Any], kwargs: dict[str, Any], *,
                  queue: str | None = None, delay: float | None = None,
                  batch_id: int | None = None, task_id: str | None = None) -> Job:
        s, o = self.settings, task.options
        ensure_json_arguments(task.name, args, kwargs, max_size=s.MAX_MESSAGE_SIZE)
        queue = queue or o.queue or s.DEFAULT_QUEUE
        if queue not in s.QUEUES:
            raise ValueError(f"Task {task.name!r} was sent to unknown queue {queue!r}; "
                             f"COATI_QUEUE['QUEUES'] is {s.QUEUES}.")
        if delay is not None and delay < 0:
            raise ValueError(f"delay must be >= 0 seconds, got {delay!r}")
        now = time.time()
        time_limit, soft_time_limit = o.time_limits(s)
        return Job(
            task=task.name, args=list(args), kwargs=kwargs, queue=queue,
            id=task_id or new_job_id(),
            max_retries=s.MAX_RETRIES if o.max_retries is None else o.max_retries,
            min_backoff=o.min_backoff or s.MIN_BACKOFF,
            max_backoff=o.max_backoff or s.MAX_BACKOFF,
            time_limit=time_limit, soft_time_limit=soft_time_limit,
            enqueued_at=now, eta=now + delay if delay else None, batch_id=batch_id,
        )

    def dispatch(self, jobs: list[Job], *, on_commit: bool | None = None) -> None:
        """Track, then send now or when the surrounding transaction commits.

        Inside a transaction the records are the outbox: written with the caller's
        rows, sent after commit. A broker error then does not reach the caller (its
        commit already happened): the records are marked unsent and the relay sends
        them when the broker answers. Outside a transaction, records and send succeed
        or fail together and ``BackendUnavailable`` tells the caller at once.
        """
        if not jobs:
            return
        wait = self.settings.ENQUEUE_ON_COMMIT if on_commit is None else on_commit
        if wait and transaction.get_connection().in_atomic_block:
            self.middleware.before("before_enqueue", self, jobs, strict=True)
            transaction.on_commit(lambda: self._send_after_commit(jobs), robust=True)
        elif self.runs_in_caller:
            self.middleware.before("before_enqueue", self, jobs, strict=True)
            self._send_now(jobs)
        else:
            # Records and send succeed or fail together: a broker error leaves
            # no record stuck in "pending".
            with transaction.atomic():
                self.middleware.before("before_enqueue", self, jobs, strict=True)
                self.send(jobs)
            self.middleware.after("after_enqueue", self, jobs)

    def _send_now(self, jobs: list[Job]) -> None:
        self.send(jobs)
        self.middleware.after("after_enqueue", self, jobs)

    def _send_after_commit(self, jobs: list[Job]) -> None:
        try:
            self.send(jobs)
        except BackendUnavailable as exc:
            logger.warning("The broker refused %d job(s) after commit (%s); they wait in the "
                           "outbox for the relay.", len(jobs), exc)
            self.middleware.after("send_failed", self, jobs, exc)
            return
        self.middleware.after("after_enqueue", self, jobs)

    def requeue(self, job: Job, delay_ms: int) -> None:
        """Another attempt of ``job`` after ``delay_ms`` (called by the executor)."""
        jobs = [replace(job, eta=time.time() + delay_ms / 1000.0)]
        try:
            self.send(jobs)
        except BackendUnavailable as exc:
            logger.warning("Retry of job %s waits in the outbox: %s", job.id, exc)
            self.middleware.after("send_failed", self, jobs, exc)

    # -- execution --------------------------------------------------------
    def execute(self, raw: Any) -> None:
        execute(self, raw)

    # -- results ----------------------------------------------------------
    def get_task_result(self, task_id: str) -> dict[str, Any] | None:
        from ..tracking import task_result

        return task_result(task_id)

    def get_bulk_results(self, task_ids: Iterable[str]) -> dict[str, Any]:
        from ..tracking import bulk_results

        return bulk_results(task_ids)

    def get_stats(self) -> dict[str, Any]:
        from ..tracking import status_counts

        depths = self.queue_depths()
        return {
            "driver": type(self).__name__,
            "backend": self.name,
            "reason": self.reason,
            "location": self.describe(),
            "registered_tasks": registry.names(),
            "queues": {name: d["queued"] for name, d in depths.items()},
            "delayed": {name: d["delayed"] for name, d in depths.items()},
            "pending_tasks": sum(d["queued"] + d["delayed"] for d in depths.values()),
            "tracked": status_counts(),
        }

    # -- primitives -------------------------------------------------------
    def send(self, jobs: list[Job]) -> None:
        """Hand jobs to the broker; a job with ``eta`` in the future is delayed.

        Raises ``BackendUnavailable`` (password masked) when the broker cannot take them.
        """
        raise NotImplementedError

    def queue_depths(self) -> dict[str, dict[str, int]]:
        """``{queue: {"queued": n, "delayed": n}}`` for every configured queue."""
        raise NotImplementedError

    def start_consumer(self, queues: list[str], threads: int, **options: Any) -> Consumer:
        """Start the native worker in this process; return a handle to stop it."""
        raise NotImplementedError

    def describe(self) -> str:
        """Where jobs go, safe to show (no passwords)."""
        raise NotImplementedError

    def purge(self, queues: Iterable[str] | None = None) -> int:
        """Drop queued and delayed jobs; returns how many were dropped."""
        raise NotImplementedError

    # -- delivery (README "Delivery guarantees") ----------------------------
    def missing_jobs(self, jobs: list[tuple[str, int, str]]) -> set[str]:
        """Of ``(job_id, attempt, queue)``, the ids the broker holds no message for.

        "Holds" means queued, delayed, or reserved by a worker (unacked); the
        reconciler re-sends only what is missing, so it never duplicates a message.
        """
        return set()

    def maintain(self) -> int:
        """Periodic broker upkeep in every worker: keep this worker's reservations
        alive and give back those of dead workers. Returns how many were given back."""
        return 0

    def lease_token(self) -> str | None:
        """What names this worker process's reservations in the broker, for the
        supervisor to release when the process dies (None: nothing to release)."""
        return None

    def keep_alive(self, tokens: list[str]) -> None:
        """The supervisor vouches for its live worker processes' leases: a process frozen
        by a task that holds the GIL cannot renew its own, and must not lose its work
        to another worker while it still runs it (its hard time limit ends it)."""

    def release_dead_worker(self, token: str) -> None:
        """The supervisor saw the process holding ``token`` die: let other workers give
        its reservations back now rather than after a timeout."""

    def discard_reserved(self, lease: str | None, pid: int, job_id: str, queue: str) -> bool:
        """Drop the message of ``job_id`` that the live worker process ``pid`` (holding
        ``lease``) has reserved, just before the supervisor kills that process at the
        job's hard time limit: the broker never gives it back, so it cannot run again."""
        return False

    def take_dead_letters(self) -> list[dict[str, Any]]:
        """Messages the broker itself refused (e.g. Dramatiq's dead-letter set), removed
        from it: ``[{"payload": bytes | str, "queue": str, "reason": str}]``."""
        return []
