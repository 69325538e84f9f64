"""Huey + filesystem: the embedded driver that needs nothing installed.

One Huey instance over one directory; a queue name maps to a Huey priority
(``QUEUES`` lists the highest first), so Huey's own ordering consumes
``high`` before ``default`` before ``low``. Messages are JSON, never pickle.
Retries are decided by ``coati_queue.core.execution``, so Huey's are off.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import threading
from typing import Any, Iterable

from huey import Huey
from huey.registry import Message
from huey.serializer import Serializer

from ..core.jobs import Job
from .base import QueueDriver
from .huey_storage import QueueFileStorage

logger = logging.getLogger("coati_queue")

EXECUTE_TASK = "coati.execute"
DEAD_LETTER_TASK = "coati.dead_letter"
# Huey names a task ``<module of the function>.<name>``; both tasks live here.
MODULE = __name__


class JSONMessageSerializer(Serializer):
    """Huey messages as JSON. An unreadable file becomes a dead-letter message."""

    def _serialize(self, data: Any) -> bytes:
        if not isinstance(data, Message):
            return json.dumps(data).encode()
        fields = data._asdict()
        for nested in ("on_complete", "on_error", "chord_config"):
            if fields.pop(nested) is not None:
                raise TypeError(f"coati_queue does not use Huey's {nested}")
        for stamp in ("eta", "expires_resolved"):
            if isinstance(fields[stamp], datetime.datetime):
                fields[stamp] = fields[stamp].isoformat()
        fields["args"] = list(fields["args"] or ())
        return json.dumps({"huey": fields}, separators=(",", ":")).encode()

    def _deserialize(self, data: bytes) -> Any:
        try:
            decoded = json.loads(data)
            fields = decoded["huey"]
            for stamp in ("eta", "expires_resolved"):
                if fields.get(stamp):
                    fields[stamp] = datetime.datetime.fromisoformat(fields[stamp])
            return Message(**fields)
        except (ValueError, KeyError, TypeError) as exc:
            text = data.decode("utf-8", "replace") if isinstance(data, bytes) else str(data)
            return Message(id=None, name=f"{MODULE}.{DEAD_LETTER_TASK}", retries=0, retry_delay=0,
                           args=(text[:10_000], f"undecodable Huey message: {exc}"), kwargs={})


class HueyDriver(QueueDriver):
    name = "huey"

    def __init__(self, settings: Any, *, path: str, reason: str = "", **kwargs: Any):
        super().__init__(settings, reason=reason, **kwargs)
        self.path = path
        self._huey: Huey | None = None
        self._lock = threading.Lock()
        self._priority = {q: settings.queue_priority(q) for q in settings.QUEUES}
        self._queue_of_priority = {p: q for q, p in self._priority.items()}
        self.in_flight = 0
        self._in_flight_lock = threading.Lock()

    @property
    def huey(self) -> Huey:
        """Built on first use, never at import."""
        if self._huey is None:
            with self._lock:
                if self._huey is None:
                    self._huey = self._build_huey()
        return self._huey

    def _build_huey(self) -> Huey:
        huey = Huey("coati", results=False, utc=True, serializer=JSONMessageSerializer(),
                    storage_class=QueueFileStorage, path=self.path)
        huey.task(name=EXECUTE_TASK, retries=0)(self._run_envelope)
        huey.task(name=DEAD_LETTER_TASK, retries=0)(self._dead_letter)
        return huey

    def _run_envelope(self, envelope: Any) -> None:
        with self._in_flight_lock:
            self.in_flight += 1
        try:
            self.execute(envelope)
        finally:
            with self._in_flight_lock:
                self.in_flight -= 1

    def _dead_letter(self, raw: str, error: str) -> None:
        from ..core.exceptions import InvalidJob

        self.middleware.after("after_invalid_message", self, raw, InvalidJob(error))

    # -- primitives -------------------------------------------------------
    def _encode(self, job: Job) -> tuple[bytes, int]:
        priority = self._priority[job.queue]
        message = Message(id=job.id, name=f"{MODULE}.{EXECUTE_TASK}", retries=0, retry_delay=0,
                          priority=priority, args=(job.to_dict(),), kwargs={})
        return self.huey.serializer.serialize(message), priority

    def send(self, jobs: list[Job]) -> None:
        storage = self.huey.storage
        now = datetime.datetime.now(datetime.timezone.utc)
        ready, delayed = [], []
        for job in jobs:
            data, priority = self._encode(job)
            eta = (datetime.datetime.fromtimestamp(job.eta, datetime.timezone.utc)
                   if job.eta else None)
            if eta and eta > now:
                delayed.append((data, eta.replace(tzinfo=None)))  # Huey keeps naive UTC
            else:
                ready.append((data, priority))
        if ready:
            storage.enqueue_many(ready)
        for data, eta in delayed:
            storage.add_to_schedule(data, eta)

    def queue_depths(self) -> dict[str, dict[str, int]]:
        storage = self.huey.storage
        depths = {q: {"queued": 0, "delayed": 0} for q in self.settings.QUEUES}
        for priority, count in storage.queued_by_priority().items():
            queue = self._queue_of_priority.get(priority)
            if queue:
                depths[queue]["queued"] += count
        for data in storage.scheduled_items():
            message = self.huey.serializer.deserialize(data)
            queue = self._queue_of_priority.get(message.priority or 0)
            if queue:
                depths[queue]["delayed"] += 1
        return depths

    def start_consumer(self, queues: list[str], threads: int, **options: Any) -> "HueyConsumer":
        huey = self.huey
        huey.storage.only_priorities({self._priority[q] for q in queues})
        consumer = huey.create_consumer(
            workers=threads, worker_type=options.get("worker_type") or "thread", periodic=False,
            initial_delay=options.get("poll_ms", 5) / 1000, backoff=1.15,
            max_delay=max(options.get("poll_ms", 5) / 1000, 0.05), scheduler_interval=1,
            check_worker_health=True)
        consumer.start()
        return HueyConsumer(self, consumer)

    def describe(self) -> str:
        return f"Huey file storage at {self.path}"

    def purge(self, queues: Iterable[str] | None = None) -> int:
        wanted = {self._priority[q] for q in (queues or self.settings.QUEUES)}
        storage = self.huey.storage

        def doomed(data: bytes) -> bool:
            return (self.huey.serializer.deserialize(data).priority or 0) in wanted

        return storage.purge_priorities(wanted) + storage.purge_scheduled(doomed)


class HueyConsumer:
    def __init__(self, driver: HueyDriver, consumer: Any):
        self.driver = driver
        self.consumer = consumer

    def is_idle(self) -> bool:
        return self.driver.in_flight == 0

    def stop(self, graceful: bool = True) -> None:
        self.consumer.stop(graceful=graceful)
        self.driver.huey.notify_interrupted_tasks()
        logger.debug("Huey consumer in pid %s stopped", os.getpid())
