"""Huey + filesystem: the embedded driver that needs nothing installed.

One Huey instance over one directory; a queue name maps to a Huey priority
(``QUEUES`` lists the highest first), so Huey's own ordering consumes
``high`` before ``default`` before ``low``; a worker given ``--queues`` in
another order takes its queues in that order. Messages are JSON, never pickle.
Retries are decided by ``coati_queue.core.execution``, so Huey's are off.

Delivery is at least once: a worker's claim is a reservation on disk, deleted
(acked) only after the job ran; a killed worker's reservations are given back
by the next ``maintain()`` or worker start (see ``huey_storage``).
"""

from __future__ import annotations

import datetime
import glob
import json
import logging
import os
import threading
from typing import Any, Callable, Iterable

from huey import Huey
from huey.registry import Message
from huey.serializer import Serializer

from ..core.exceptions import StorageUnavailable
from ..core.jobs import Job
from .base import QueueDriver
from .huey_storage import QueueFileStorage

logger = logging.getLogger("coati_queue")

EXECUTE_TASK = "coati.execute"
DEAD_LETTER_TASK = "coati.dead_letter"
# Huey names a task ``<module of the function>.<name>``; both tasks live here.
MODULE = __name__


def _dead_letter_message(data: Any, reason: str, priority: int | None = None) -> Message:
    # Whole and escaped: the dead-letter record truncates it and keeps its true size.
    text = data.decode("utf-8", "backslashreplace") if isinstance(data, bytes) else str(data)
    return Message(id=None, name=f"{MODULE}.{DEAD_LETTER_TASK}", retries=0, retry_delay=0,
                   priority=priority, args=(text, reason), kwargs={})


def _shape_problem(message: Message) -> str | None:
    """Why Huey could not call our task with this message, or None. Checked here, so
    a foreign or forged message is dead-lettered instead of failing in Huey (where
    its file would be neither run nor acked)."""
    args, kwargs = tuple(message.args or ()), message.kwargs or {}
    if message.name == f"{MODULE}.{EXECUTE_TASK}":
        ok = len(args) == 1 and isinstance(args[0], dict) and not kwargs
    elif message.name == f"{MODULE}.{DEAD_LETTER_TASK}":
        ok = len(args) == 2 and all(isinstance(a, str) for a in args) and not kwargs
    else:
        return f"not a coati_queue message (Huey task {message.name!r})"
    return None if ok else f"unexpected arguments for Huey task {message.name!r}"


def mark_redelivered(data: bytes) -> bytes:
    """The job file of a dead worker, its envelope's ``delivery`` counted up."""
    try:
        decoded = json.loads(data)
        envelope = decoded["huey"]["args"][0]
        envelope["delivery"] = int(envelope.get("delivery", 1)) + 1
    except (ValueError, KeyError, IndexError, TypeError, AttributeError, RecursionError):
        return data  # not a job of ours: the next worker dead-letters it as it is
    return json.dumps(decoded, separators=(",", ":")).encode()


class JSONMessageSerializer(Serializer):
    """Huey messages as JSON. An unreadable or foreign file becomes a dead-letter message."""

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
            message = Message(**fields)
        except (ValueError, KeyError, TypeError, RecursionError) as exc:
            return _dead_letter_message(data, f"undecodable Huey message: {exc}")
        problem = _shape_problem(message)
        if problem:
            priority = message.priority if isinstance(message.priority, int) else None
            return _dead_letter_message(data, problem, priority)
        return message


class CoatiHuey(Huey):
    def dequeue(self) -> Any:
        """A message Huey cannot turn into a task becomes a dead letter: left to
        Huey, it would be logged, never run, and given back to the queue forever."""
        data = self.storage.dequeue()
        if data is None:
            return None
        try:
            return self.deserialize_task(data)
        except Exception as exc:  # noqa: BLE001 - anything Huey's registry raises
            reason = f"unreadable Huey message: {type(exc).__name__}: {exc}"
            return self._registry.create_task(_dead_letter_message(data, reason))

    def ready_to_run(self, task: Any, timestamp: Any = None) -> bool:
        """Always: the storage moves a delayed job into the queue only when due. Huey's
        own check would put a queued job back into the schedule when the clocks of
        machines sharing the directory differ, leaving its reservation un-acked."""
        return True


class OrderedQueueFileStorage(QueueFileStorage):
    """The queue listing sorted by this worker's queue order (``runworkers --queues
    low,high``) instead of the priorities in the file names (``QUEUES`` order)."""

    rank: dict[str, int] | None = None  # name prefix -> position in this worker's order

    def _ready_names(self) -> list[str]:
        names = super()._ready_names()
        rank = self.rank
        if rank:
            names.sort(key=lambda name: rank.get(name[:4], len(rank)))  # stable: FIFO kept
        return names


class HueyDriver(QueueDriver):
    name = "huey"

    def __init__(self, settings: Any, *, path: str, reason: str = "",
                 verify_path: Callable[[str], None] | None = None, **kwargs: Any):
        super().__init__(settings, reason=reason, **kwargs)
        self.path = path
        # The Django layer's directory check, run again when the storage is opened:
        # the directory may have been swapped or opened up since it was chosen.
        self.verify_path = verify_path
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
        if self.verify_path is not None:
            self.verify_path(self.path)
        huey = CoatiHuey("coati", results=False, utc=True, serializer=JSONMessageSerializer(),
                         storage_class=OrderedQueueFileStorage, path=self.path)
        huey.storage.mark_redelivered = mark_redelivered
        huey.task(name=EXECUTE_TASK, retries=0)(self._run_envelope)
        huey.task(name=DEAD_LETTER_TASK, retries=0)(self._dead_letter)
        return huey

    def _run_envelope(self, envelope: Any) -> None:
        with self._in_flight_lock:
            self.in_flight += 1
        try:
            self.execute(envelope)
        except Exception:
            # ``execute`` never raises by contract; an error escaping it would escape
            # every redelivery too, so the message is done with rather than looped.
            self.huey.storage.ack()
            raise
        finally:
            with self._in_flight_lock:
                self.in_flight -= 1
        # Acked only once the job ran: a SIGKILL or os._exit before this line leaves
        # the file reserved for reclaim. (KeyboardInterrupt/SystemExit skip it too.)
        self.huey.storage.ack()

    def _dead_letter(self, raw: str, error: str) -> None:
        from ..core.exceptions import InvalidJob

        self.middleware.after("after_invalid_message", self, raw, InvalidJob(error))
        self.huey.storage.ack()

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
                # Huey keeps naive UTC
                delayed.append((data, eta.replace(tzinfo=None), priority, job.id))
            else:
                ready.append((data, priority, job.id))
        try:
            if ready:
                storage.enqueue_many(ready)
            for data, eta, priority, job_id in delayed:
                storage.add_to_schedule(data, eta, priority=priority, job_id=job_id)
        except OSError as exc:  # disk full, directory gone or made read-only
            raise StorageUnavailable(f"Huey storage at {self.path} refused the send: "
                                     f"{exc.strerror or exc}") from None

    def queue_depths(self) -> dict[str, dict[str, int]]:
        storage = self.huey.storage
        depths = {q: {"queued": 0, "delayed": 0} for q in self.settings.QUEUES}
        for priority, count in storage.queued_by_priority().items():
            queue = self._queue_of_priority.get(priority)
            if queue:
                depths[queue]["queued"] += count
        for priority, count in storage.scheduled_by_priority().items():
            queue = self._queue_of_priority.get(priority)
            if queue:
                depths[queue]["delayed"] += count
        return depths

    def start_consumer(self, queues: list[str], threads: int, **options: Any) -> "HueyConsumer":
        huey = self.huey
        storage = huey.storage
        storage.only_priorities({self._priority[q] for q in queues})
        by_priority = sorted(queues, key=self._priority.__getitem__, reverse=True)
        if list(queues) != by_priority:
            storage.rank = {storage._prefix(self._priority[q]): i for i, q in enumerate(queues)}
        # Before taking new work: what a killed worker (or a whole killed group) held.
        self.maintain()
        # Threads only: time limits, leases and tracking are per process and thread
        # (Huey's "process" and "greenlet" worker types would break all three).
        consumer = huey.create_consumer(
            workers=threads, worker_type="thread", periodic=False,
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
        return storage.purge_priorities(wanted) + storage.purge_scheduled(wanted)

    # -- supervision ----------------------------------------------------------
    def discard_reserved(self, lease: str | None, pid: int, job_id: str, queue: str) -> bool:
        """Delete the job's file from process ``pid``'s reservation folder (named
        ``<pid>-<token>``): its reclaim then finds nothing of that job to give back."""
        pattern = os.path.join(glob.escape(self.huey.storage.reserved_path), f"{pid}-*",
                               f"*-{job_id}")
        dropped = False
        for path in glob.glob(pattern):
            try:
                os.unlink(path)
                dropped = True
            except FileNotFoundError:
                continue  # acked a moment ago
        return dropped

    # -- delivery ---------------------------------------------------------
    def missing_jobs(self, jobs: list[tuple[str, int, str]]) -> set[str]:
        """One listing of schedule, queue and reservations per call (job ids are in
        the file names), whatever the number of jobs asked about."""
        if not jobs:
            return set()
        try:
            present = self.huey.storage.present_job_ids()
        except OSError as exc:
            raise StorageUnavailable(f"Cannot list the Huey directory {self.path}: {exc}") from exc
        return {job_id for job_id, _, _ in jobs} - present

    def maintain(self) -> int:
        """Give back the reservations of dead workers (their flock is free); the
        storage logs each dead worker's, the caller the total."""
        try:
            return self.huey.storage.reclaim_lost()
        except OSError as exc:
            raise StorageUnavailable(f"Cannot reclaim reservations in {self.path}: {exc}") from exc


class HueyConsumer:
    def __init__(self, driver: HueyDriver, consumer: Any):
        self.driver = driver
        self.consumer = consumer

    def is_idle(self) -> bool:
        return self.driver.in_flight == 0

    def stop_intake(self) -> None:
        """Take no new job from now on (safe in a signal handler: sets an Event); the
        running ones finish. ``stop()`` follows."""
        self.consumer.stop_flag.set()

    def stop(self, graceful: bool = True) -> None:
        self.consumer.stop(graceful=graceful)
        # Only Huey's signal; no handler of ours acts on it, and reservations stay
        # with the files (given back below or by the next worker).
        self.driver.huey.notify_interrupted_tasks()
        environment = self.consumer.environment
        if graceful and not any(environment.is_alive(process)
                                for _, process in self.consumer.worker_threads):
            # Every task finished and acked: drop the (empty) reservation folder now
            # rather than leave it for the next worker's reclaim.
            self.driver.huey.storage.release_reservations()
        logger.debug("Huey consumer in pid %s stopped", os.getpid())
