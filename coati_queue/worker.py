"""One worker process: start the driver's native consumer, heartbeat, burst, signals.

SIGTERM/SIGINT once: stop taking work, let in-flight tasks finish (Dramatiq
gives unacked messages back to Redis), flush tracking, exit 0. SIGQUIT, or a
second SIGTERM/SIGINT: exit at once with status 1; what was in flight is given
back by the broker (Huey reservation, Redis redelivery) and runs again.

A child of ``runworkers`` (``--supervised``) takes its orders from the
supervisor only: SIGUSR1 = graceful stop, SIGQUIT = exit now. It ignores
SIGTERM/SIGINT, because a signal sent to the whole process group (systemd's
``KillMode=control-group``, Ctrl-C) reaches it as well as the supervisor, which
passes each stop on exactly once; and it stops gracefully on its own when the
supervisor is gone.

Besides the consumer, a maintenance thread runs every ``RECONCILE_INTERVAL``:
the outbox relay and the reconciler (``coati_queue.reconcile``), stalled
batches, dead letters the broker refused, jobs left in a Huey fallback
directory, and the deletion of expired records.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
import time
import uuid
from typing import Any

from django.db import DatabaseError, connections
from django.utils import timezone

from .core.exceptions import BackendUnavailable
from .models import WorkerHeartbeat

logger = logging.getLogger("coati_queue.worker")

BURST_IDLE_CHECKS = 3
#: What the supervisor sends its children for a graceful stop: a signal nobody else
#: sends, so a stop sent to the whole process group is not counted twice.
SUPERVISOR_STOP = signal.SIGUSR1


class WorkerProcess:
    def __init__(self, driver: Any, queues: list[str], threads: int, *, burst: bool = False,
                 worker_type: str | None = None, poll_ms: int | None = None,
                 supervised: bool = False):
        unknown = [q for q in queues if q not in driver.settings.QUEUES]
        if unknown:
            raise ValueError(f"Unknown queue(s) {', '.join(unknown)}; "
                             f"COATI_QUEUE['QUEUES'] is {driver.settings.QUEUES}.")
        self.driver = driver
        self.queues = queues
        self.threads = threads
        self.burst = burst
        self.worker_type = worker_type
        self.poll_ms = poll_ms
        self.worker_id = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
        self.supervised = supervised
        self.stopping = threading.Event()
        self._maintenance: threading.Thread | None = None

    def _on_signal(self, signum: int, frame: Any) -> None:
        name = signal.Signals(signum).name
        if self.supervised and signum in (signal.SIGTERM, signal.SIGINT):
            # Sent to the whole group (systemd, Ctrl-C): the supervisor got it too and
            # decides. Obeying it here as well would make one stop look like two.
            logger.debug("%s ignored: the supervisor passes stops on.", name)
            return
        if signum == signal.SIGQUIT or self.stopping.is_set():
            logger.warning("%s: exiting now; in-flight tasks are given back and run again.",
                           name)
            os._exit(1)
        what = "stop requested by the supervisor" if self.supervised else f"{name} received"
        logger.info("%s: finishing in-flight tasks (%s to exit now).", what,
                    "a second stop" if self.supervised else "send again or SIGQUIT")
        self.stopping.set()

    def run(self) -> int:
        options = {"worker_type": self.worker_type}
        if self.poll_ms is not None:
            options["poll_ms"] = self.poll_ms
        consumer = self.driver.start_consumer(self.queues, self.threads, **options)
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, SUPERVISOR_STOP):
            signal.signal(signum, self._on_signal)
        self.driver.middleware.before("worker_started", self.driver, self)
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
        parent = os.getppid()
        while not self.stopping.wait(0.1):
            now = time.monotonic()
            if self.supervised and os.getppid() != parent:
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
        try:
            WorkerHeartbeat.objects.update_or_create(worker_id=self.worker_id, defaults={
                "hostname": socket.gethostname(), "pid": os.getpid(),
                "backend": self.driver.name, "queues": self.queues, "threads": self.threads,
                "last_seen": now, "processed": processed, "failed": failed,
                "stopped_at": now if stopped else None,
            })
        except DatabaseError:
            logger.exception("Could not write the heartbeat of %s", self.worker_id)
        finally:
            connections.close_all()
