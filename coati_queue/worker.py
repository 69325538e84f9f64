"""One worker process: start the driver's native consumer, heartbeat, burst, signals.

SIGTERM/SIGINT once: stop taking work, let in-flight tasks finish (Dramatiq
gives unacked messages back to Redis), flush tracking, exit 0. Twice: exit
at once with status 1.
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

from .models import WorkerHeartbeat
from .tracking import delete_expired

logger = logging.getLogger("coati_queue.worker")

BURST_IDLE_CHECKS = 3


class WorkerProcess:
    def __init__(self, driver: Any, queues: list[str], threads: int, *, burst: bool = False,
                 worker_type: str | None = None, poll_ms: int | None = None):
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
        self.stopping = threading.Event()
        self._signals = 0
        self._cleaner: threading.Thread | None = None

    def _on_signal(self, signum: int, frame: Any) -> None:
        self._signals += 1
        if self._signals > 1:
            logger.warning("Second %s: exiting now.", signal.Signals(signum).name)
            os._exit(1)
        logger.info("%s received: finishing in-flight tasks (send again to exit now).",
                    signal.Signals(signum).name)
        self.stopping.set()

    def run(self) -> int:
        options = {"worker_type": self.worker_type}
        if self.poll_ms is not None:
            options["poll_ms"] = self.poll_ms
        consumer = self.driver.start_consumer(self.queues, self.threads, **options)
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self._on_signal)
        self.driver.middleware.before("worker_started", self.driver, self)
        logger.info("Worker %s consuming %s with %d thread(s) on %s", self.worker_id,
                    ",".join(self.queues), self.threads, self.driver.describe())
        self._beat()
        try:
            self._loop(consumer)
        finally:
            consumer.stop(graceful=True)
            self.driver.middleware.after("worker_stopped", self.driver, self)
            self._beat(stopped=True)
            connections.close_all()
        logger.info("Worker %s stopped.", self.worker_id)
        return 0

    def _loop(self, consumer: Any) -> None:
        interval = self.driver.settings.HEARTBEAT_INTERVAL
        cleanup_every = self.driver.settings.CLEANUP_INTERVAL or float("inf")
        next_beat = time.monotonic() + interval
        next_cleanup = time.monotonic() + cleanup_every
        idle_checks = 0
        while not self.stopping.wait(0.1):
            now = time.monotonic()
            if now >= next_beat:
                self._beat()
                next_beat = now + interval
            if now >= next_cleanup and not (self._cleaner and self._cleaner.is_alive()):
                # In a thread: deleting a large backlog of expired records must not
                # hold back the heartbeat, or the overview would show this worker lost.
                self._cleaner = threading.Thread(target=self._cleanup, name="coati-cleanup",
                                                 daemon=True)
                self._cleaner.start()
                next_cleanup = now + cleanup_every
            if self.burst:
                idle_checks = idle_checks + 1 if self._nothing_left(consumer) else 0
                if idle_checks >= BURST_IDLE_CHECKS:
                    logger.info("Burst: queues %s are empty, stopping.", ",".join(self.queues))
                    return

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

    def _cleanup(self) -> None:
        try:
            deleted = delete_expired()
            if deleted:
                logger.info("Deleted %d expired task records.", deleted)
        except DatabaseError:
            logger.exception("Deleting expired task records failed")
        finally:
            connections.close_all()  # this thread's own connection
