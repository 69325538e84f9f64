"""One worker process: start the driver's native consumer, heartbeat, burst, signals.

Worker processes are forked by the ``runworkers`` supervisor (``coati_queue.supervisor``,
``run_child`` below); each reports the start and end of every task on a pipe (hard time
limits) and publishes what it runs now in its heartbeat.

SIGTERM/SIGINT once: stop taking work, let in-flight tasks finish (Dramatiq
gives unacked messages back to Redis), flush tracking, exit 0. SIGQUIT, or a
second SIGTERM/SIGINT: exit at once with status 1; what was in flight is given
back by the broker (Huey reservation, Redis redelivery) and runs again.

A child of ``runworkers`` takes its orders from the
supervisor only: SIGUSR1 = graceful stop, SIGQUIT = exit now. It ignores
SIGTERM/SIGINT, because a signal sent to the whole process group (systemd's
``KillMode=control-group``, Ctrl-C) reaches it as well as the supervisor, which
passes each stop on exactly once; and it stops gracefully on its own when the
supervisor is gone (told at once by the kernel: ``PR_SET_PDEATHSIG`` on Linux).

Besides the consumer, a maintenance thread runs every ``RECONCILE_INTERVAL``:
the outbox relay and the reconciler (``coati_queue.reconcile``), stalled
batches, dead letters the broker refused, jobs left in a Huey fallback
directory, and the deletion of expired records.
"""

from __future__ import annotations

import ctypes
import logging
import os
import random
import signal
import socket
import sys
import threading
import time
import traceback
import uuid
from dataclasses import dataclass
from typing import Any, NoReturn

from django.db import DatabaseError, connections
from django.utils import timezone

from .core.exceptions import BackendUnavailable
from .models import WorkerHeartbeat
from .sqlite import is_locked, retry_locked
from .time_limits import StatusChannel, running_jobs

logger = logging.getLogger("coati_queue.worker")

BURST_IDLE_CHECKS = 3
#: What the supervisor sends its children for a graceful stop: a signal nobody else
#: sends, so a stop sent to the whole process group is not counted twice.
SUPERVISOR_STOP = signal.SIGUSR1


@dataclass
class WorkerOptions:
    """What every worker process of one ``runworkers`` is given."""

    backend: str
    queues: list[str]
    threads: int
    burst: bool = False
    poll_ms: int | None = None
    max_tasks: int = 0


def run_child(options: WorkerOptions, status_fd: int, parent: int, mask: Any,
              inherited: list[int]) -> NoReturn:
    """A freshly forked child of the supervisor: a ``WorkerProcess`` until it stops.

    Stop signals arrive blocked (``mask`` is the set to restore), so none is handled
    by the supervisor's handlers copied into this process.
    """
    from .selection import get_queue_driver, reset_drivers
    from .time_limits import reset_running_jobs

    code = 1
    try:
        _stop_with_parent(parent)
        for fd in inherited:
            os.close(fd)  # the read ends of the pipes are the supervisor's business
        reset_drivers()
        reset_running_jobs()
        random.seed()
        worker = WorkerProcess(get_queue_driver(options.backend), options.queues,
                               options.threads, burst=options.burst, poll_ms=options.poll_ms,
                               supervised=True, status_fd=status_fd, supervisor_pid=parent,
                               max_tasks=options.max_tasks)
        worker.install_signal_handlers()
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        code = worker.run()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException:  # noqa: B036 - whatever ends a child is printed, then it exits
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _stop_with_parent(parent: int) -> None:
    """Linux: the kernel sends this process a graceful stop when the supervisor dies,
    however it dies (the worker loop also watches its parent, on every system)."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(1, SUPERVISOR_STOP)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:  # it died before the line above: nothing taken yet
        os._exit(1)


class WorkerProcess:
    def __init__(self, driver: Any, queues: list[str], threads: int, *, burst: bool = False,
                 poll_ms: int | None = None, supervised: bool = False,
                 status_fd: int | None = None, supervisor_pid: int | None = None,
                 max_tasks: int = 0):
        unknown = [q for q in queues if q not in driver.settings.QUEUES]
        if unknown:
            raise ValueError(f"Unknown queue(s) {', '.join(unknown)}; "
                             f"COATI_QUEUE['QUEUES'] is {driver.settings.QUEUES}.")
        self.driver = driver
        self.queues = queues
        self.threads = threads
        self.burst = burst
        self.poll_ms = poll_ms
        self.worker_id = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
        self.supervised = supervised
        self.stopping = threading.Event()
        self._maintenance: threading.Thread | None = None
        self._channel = StatusChannel(status_fd) if status_fd is not None else None
        self._consumer: Any = None
        self.max_tasks = max_tasks
        self._stops_received = 0  # stops from outside (signals); a second one: exit now
        self.supervisor_pid = supervisor_pid or (os.getppid() if supervised else None)

    def install_signal_handlers(self) -> None:
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, SUPERVISOR_STOP):
            signal.signal(signum, self._on_signal)

    def _on_signal(self, signum: int, frame: Any) -> None:
        name = signal.Signals(signum).name
        if self.supervised and signum in (signal.SIGTERM, signal.SIGINT):
            # Sent to the whole group (systemd, Ctrl-C): the supervisor got it too and
            # decides. Obeying it here as well would make one stop look like two.
            logger.debug("%s ignored: the supervisor passes stops on.", name)
            return
        if signum == signal.SIGQUIT or self._stops_received:
            logger.warning("%s: exiting now; in-flight tasks are given back and run again.",
                           name)
            os._exit(1)
        self._stops_received += 1
        what = "stop requested by the supervisor" if self.supervised else f"{name} received"
        logger.info("%s: finishing in-flight tasks (%s to exit now).", what,
                    "a second stop" if self.supervised else "send again or SIGQUIT")
        self._stop_taking_work()

    def _stop_taking_work(self) -> None:
        """The loop ends (in-flight tasks finish); the consumer takes no new job from now
        on where it can say so at once (Huey), not at its next turn."""
        self.stopping.set()
        stop_intake = getattr(self._consumer, "stop_intake", None)
        if stop_intake is not None:
            stop_intake()

    def _after_task(self, ended: int) -> None:
        """``--max-tasks-per-child``: after the N-th task this process takes no more (in
        the task's own thread, so with one thread not one task more starts), says so
        to the supervisor, finishes what runs and exits 0; the supervisor replaces it."""
        if ended < self.max_tasks or self.stopping.is_set():
            return
        if self._channel is not None:
            self._channel.send(e="recycle", reason=f"{ended} tasks run, --max-tasks-per-child "
                                                   f"{self.max_tasks}")
        logger.info("%d tasks run (--max-tasks-per-child %d): finishing in-flight tasks, then "
                    "exiting for a fresh process.", ended, self.max_tasks)
        self._stop_taking_work()

    def run(self) -> int:
        self.install_signal_handlers()
        running = running_jobs()
        running.channel = self._channel  # task starts and ends, to the supervisor
        running.on_end = self._after_task if self.max_tasks else None
        options = {"poll_ms": self.poll_ms} if self.poll_ms is not None else {}
        # Before the first task can start: tracking writes this worker's id on records.
        self.driver.middleware.before("worker_started", self.driver, self)
        consumer = self._consumer = self.driver.start_consumer(self.queues, self.threads,
                                                               **options)
        self.install_signal_handlers()  # again: Huey's consumer.start() sets its own
        if self._channel is not None:
            self._channel.send(e="ready", worker=self.worker_id,
                               lease=self.driver.lease_token())
        logger.info("Worker %s consuming %s with %d thread(s) on %s", self.worker_id,
                    ",".join(self.queues), self.threads, self.driver.describe())
        self._beat()
        try:
            self._loop(consumer)
        finally:
            self._stop_consumer(consumer)
            self._collect_dead_letters()
            self.driver.middleware.after("worker_stopped", self.driver, self)
            self._beat(stopped=True)
            connections.close_all()
        logger.info("Worker %s stopped.", self.worker_id)
        return 0

    def _stop_consumer(self, consumer: Any) -> None:
        """Graceful stop in a helper thread, the main thread waiting in short joins.

        Python runs signal handlers in the main thread only, when it runs Python
        code; a main thread blocked in one long join would not see a second signal
        that the kernel happened to deliver to another thread (two signals landing
        together, as a process-group SIGTERM plus the supervisor's SIGQUIT do).
        """
        stopper = threading.Thread(target=consumer.stop, kwargs={"graceful": True},
                                   name="coati-stop", daemon=True)
        stopper.start()
        while stopper.is_alive():
            stopper.join(0.1)

    def _loop(self, consumer: Any) -> None:
        settings = self.driver.settings
        interval = settings.HEARTBEAT_INTERVAL
        upkeep_every = min(interval, settings.REDIS_HEARTBEAT_TIMEOUT / 3)
        next_beat = time.monotonic() + interval
        next_upkeep = time.monotonic() + upkeep_every
        self._maintenance = threading.Thread(target=self._maintain_loop, name="coati-maintenance",
                                             daemon=True)
        self._maintenance.start()
        idle_checks = 0
        parent = self.supervisor_pid
        while not self.stopping.wait(0.1):
            now = time.monotonic()
            if parent is not None and os.getppid() != parent:
                logger.warning("The supervisor (pid %d) is gone: finishing in-flight tasks.",
                               parent)
                return
            if now >= next_beat:
                self._beat()
                next_beat = now + interval
            if now >= next_upkeep:
                self._upkeep()
                next_upkeep = now + upkeep_every
            if self.burst:
                idle_checks = idle_checks + 1 if self._nothing_left(consumer) else 0
                if idle_checks >= BURST_IDLE_CHECKS:
                    logger.info("Burst: queues %s are empty, stopping.", ",".join(self.queues))
                    return

    def _collect_dead_letters(self) -> None:
        """What the consumer dead-lettered since the last maintenance pass (a burst
        worker may stop before that pass comes round)."""
        from .dead_letters import collect_broker_dead_letters

        try:
            collect_broker_dead_letters(self.driver, seen_by=self.worker_id)
        except (DatabaseError, BackendUnavailable) as exc:
            logger.warning("Collecting dead letters at exit failed: %s", exc)
        finally:
            connections.close_all()

    def _upkeep(self) -> None:
        """The broker's side of leases: heartbeat our reservations, free dead workers'."""
        try:
            given_back = self.driver.maintain()
        except BackendUnavailable as exc:
            logger.warning("Broker upkeep failed: %s", exc)
            return
        if given_back:
            logger.warning("Gave back %d job(s) reserved by dead workers.", given_back)

    def _maintain_loop(self) -> None:
        """Relay, reconciler, batches, dead letters, cleanup: in their own thread, so a
        long pass never delays the heartbeat (the overview would show this worker lost)."""
        from .maintenance import run_due_tasks

        settings = self.driver.settings
        schedule: dict[str, float] = {}
        while not self.stopping.is_set():
            run_due_tasks(self.driver, schedule, settings)
            self.stopping.wait(min(max(settings.RECONCILE_INTERVAL, 0.05), 1.0)
                               if settings.RECONCILE_INTERVAL else 1.0)

    def _nothing_left(self, consumer: Any) -> bool:
        if not consumer.is_idle():
            return False
        depths = self.driver.queue_depths()
        return all(depths[q]["queued"] == 0 and depths[q]["delayed"] == 0 for q in self.queues)

    def _counters(self) -> tuple[int, int]:
        from .middleware import WorkerCountersMiddleware

        for item in self.driver.middleware.middleware:
            if isinstance(item, WorkerCountersMiddleware):
                return item.processed, item.failed
        return 0, 0

    def _beat(self, stopped: bool = False) -> None:
        processed, failed = self._counters()
        now = timezone.now()
        current, running = running_jobs().snapshot()
        if stopped or current is None:
            current, running = None, 0
        fields = {
            "hostname": socket.gethostname(), "pid": os.getpid(),
            "backend": self.driver.name, "queues": self.queues, "threads": self.threads,
            "last_seen": now, "processed": processed, "failed": failed,
            "stopped_at": now if stopped else None,
            "current_task_id": current.job_id if current else None,
            "current_task_name": current.task[:200] if current else "",
            "current_task_started_at": current.started_at if current else None,
            "running_tasks": running,
        }
        try:  # retried while SQLite is locked, but not past the next beat
            retry_locked(WorkerHeartbeat.objects.update_or_create, worker_id=self.worker_id,
                         defaults=fields, what=f"The heartbeat of {self.worker_id}",
                         patience=self.driver.settings.HEARTBEAT_INTERVAL)
        except DatabaseError as exc:
            if is_locked(exc):
                logger.warning("Could not write the heartbeat of %s: %s", self.worker_id, exc)
            else:
                logger.exception("Could not write the heartbeat of %s", self.worker_id)
        finally:
            connections.close_all()
