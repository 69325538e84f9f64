"""Run jobs in the caller (``QUEUE_ENABLED=0``, ``BACKEND="immediate"``), still tracked."""

from __future__ import annotations

import logging
import time
from typing import Any, Iterable

from ..core.jobs import Job
from .base import QueueDriver

logger = logging.getLogger("coati_queue")


class ImmediateDriver(QueueDriver):
    """Synchronous: ``send`` executes each job before returning.

    Delays and retry backoffs are not waited for (like Celery's eager mode):
    a delayed job runs at once, and retries run straight after a failure.
    """

    name = "immediate"
    runs_in_caller = True

    def send(self, jobs: list[Job]) -> None:
        for job in jobs:
            if job.eta and job.eta > time.time() and job.attempt == 1:
                logger.debug("Immediate backend runs delayed job %s now.", job.id)
            self.execute(job)
        self.middleware.after("flush", self)

    def queue_depths(self) -> dict[str, dict[str, int]]:
        return {name: {"queued": 0, "delayed": 0} for name in self.settings.QUEUES}

    def start_consumer(self, queues: list[str], threads: int, **options: Any):
        raise NotImplementedError(
            "The immediate backend runs tasks in the caller; there is nothing for a worker to "
            "consume. Set COATI_QUEUE['BACKEND'] to 'huey' or 'dramatiq' (or QUEUE_ENABLED=1).")

    def describe(self) -> str:
        return "in-process (synchronous)"

    def purge(self, queues: Iterable[str] | None = None) -> int:
        return 0
