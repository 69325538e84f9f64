"""Huey's FileStorage with a lock-free queue, leases (reservations) and job ids in file names.

Huey's ``FileStorage`` takes one exclusive file lock and lists the whole
queue directory on every enqueue and dequeue, and deletes a job the moment a
worker takes it, so a killed worker loses it. Here:

* enqueue writes ``<name>.tmp`` (0600) and renames it into place, many jobs per call;
* dequeue claims a file with one rename into this process's reservation
  folder ``reserved/<token>/`` and the task's thread acks it (one unlink) once
  the job ran. The process holds ``flock(LOCK_EX)`` on ``reserved/<token>.lock``
  for its whole life; the kernel drops it when the process dies, however it
  dies, so :meth:`reclaim_lost` can tell dead reservations from live ones
  without trusting clocks, and gives them back under their original names;
* a delayed job waits in ``schedule/`` and is renamed into the queue when due,
  so a job is always in exactly one file: presence (:meth:`present_job_ids`)
  is a listing, never a guess;
* names are ``<inverse priority>-<ms>-<seq>-<pid>-<job id>`` in the queue and
  ``<due>-<inverse priority>-<seq>-<pid>-<job id>`` in the schedule: they sort
  highest priority first then FIFO (due first), and anything else in these
  directories (an editor's swap file, a ``.tmp`` being written, a folder) is ignored.

The storage reads its own messages' JSON (``{"huey": {...}}``) only for files
whose name carries no job id: Huey-internal enqueues and older releases' schedule.
"""

from __future__ import annotations

import fcntl
import itertools
import json
import logging
import os
import re
import secrets
import shutil
import threading
import time
from collections import Counter, deque
from contextlib import contextmanager
from typing import Any, Callable, Iterable, Iterator

from huey.constants import EmptyData
from huey.storage import FileStorage
from huey.utils import FileLock

from .huey_locks import NoFollowFileLock

logger = logging.getLogger("coati_queue")

LISTING_TTL = 0.1
JOB_ID = r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"
QUEUE_NAME = re.compile(
    rf"(?P<prefix>[0-9a-f]{{4}})-[0-9a-f]{{12}}-[0-9a-f]{{10}}-\d+(?:-(?P<job>{JOB_ID}))?")
SCHEDULE_NAME = re.compile(
    rf"(?P<due>[0-9a-f]{{12}})-(?P<prefix>[0-9a-f]{{4}})-[0-9a-f]{{10}}-\d+(?:-(?P<job>{JOB_ID}))?")
#: Huey's own schedule names (an older release's delayed jobs): read, then moved.
HUEY_SCHEDULE_NAME = re.compile(r"[0-9a-f]{12}(?:\.\d{3})?")
TOKEN = re.compile(r"\d+-[0-9a-f]{16}")
TOKEN_LOCK = re.compile(r"(?P<token>\d+-[0-9a-f]{16})\.lock")
JOB_ID_NAME = re.compile(JOB_ID)


def _listdir(path: str) -> list[str]:
    try:
        return os.listdir(path)
    except FileNotFoundError:
        return []


def _read(path: str) -> bytes | None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    with os.fdopen(fd, "rb") as handle:
        return handle.read()


class QueueFileStorage(FileStorage):
    def __init__(self, name: str, path: str, **kwargs: Any):
        kwargs.setdefault("levels", 2)
        super().__init__(name, path, **kwargs)
        if isinstance(self.lock, FileLock):
            self.lock = NoFollowFileLock(self.lock_file)
        self.reserved_path = os.path.join(self.path, "reserved")
        for directory in (self.queue_path, self.schedule_path, self.reserved_path):
            os.makedirs(directory, mode=0o700, exist_ok=True)
        self._giveback_lock_path = os.path.join(self.path, "giveback.lock")
        self._sequence = itertools.count()
        self._listing: deque[str] = deque()
        self._listed_at = 0.0
        self._listing_lock = threading.Lock()
        self._prefixes: set[str] | None = None
        # (pid, token, folder, lock fd): replaced whole, so readers need no lock.
        self._reservation: tuple[int, str, str, int] | None = None
        self._reservation_lock = threading.Lock()
        self._local = threading.local()  # .claimed: the file this thread's task runs from
        # Set by the driver: how a message given back from a dead worker is marked as
        # a redelivery (its worker may have run it), so the next worker claims first.
        self.mark_redelivered: Callable[[bytes], bytes] | None = None

    # -- names ------------------------------------------------------------
    def _prefix(self, priority: int) -> str:
        return "%04x" % (self.MAX_PRIORITY - int(priority or 0))

    def only_priorities(self, priorities: set[int] | None) -> None:
        """Dequeue only these priorities (a worker started with ``--queues``)."""
        self._prefixes = None if priorities is None else {self._prefix(p) for p in priorities}

    def _tail(self, job_id: str | None) -> str:
        """``<seq>-<pid>[-<job id>]``; only a plain UUID goes into a file name."""
        tail = "%010x-%d" % (next(self._sequence), os.getpid())
        return f"{tail}-{job_id}" if job_id and JOB_ID_NAME.fullmatch(job_id) else tail

    def _queue_name(self, prefix: str, job_id: str | None) -> str:
        return "%s-%012x-%s" % (prefix, int(time.time() * 1000), self._tail(job_id))

    @staticmethod
    def describe_message(data: bytes) -> tuple[int, str | None]:
        """``(priority, job id)`` of a message, for files whose name does not say."""
        try:
            fields = json.loads(data)["huey"]
            args = fields.get("args") or [None]
            job_id = args[0].get("id") if isinstance(args[0], dict) else fields.get("id")
            return int(fields.get("priority") or 0), job_id if isinstance(job_id, str) else None
        except (ValueError, KeyError, TypeError, AttributeError, IndexError, RecursionError):
            return 0, None

    def _write(self, directory: str, name: str, data: bytes) -> None:
        """Atomically: readers see the whole file under its final name, or nothing."""
        final = os.path.join(directory, name)
        fd = os.open(final + ".tmp", os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.rename(final + ".tmp", final)

    # -- enqueue ------------------------------------------------------------
    def enqueue(self, data: bytes, priority: int | None = None) -> None:
        """Huey's own enqueue (no job id given): the id is read from the message."""
        self.enqueue_many([(data, priority or 0, self.describe_message(data)[1])])

    def enqueue_many(self, items: Iterable[tuple[bytes, int, str | None]]) -> None:
        """``[(data, priority, job id)]``; the id goes into the name for presence checks."""
        for data, priority, job_id in items:
            if not 0 <= int(priority) <= self.MAX_PRIORITY:
                raise ValueError(f"priority must be within 0..{self.MAX_PRIORITY}")
            self._write(self.queue_path, self._queue_name(self._prefix(priority), job_id), data)

    def _ready_names(self) -> list[str]:
        names = []
        for name in os.listdir(self.queue_path):
            match = QUEUE_NAME.fullmatch(name)
            if match and (self._prefixes is None or match["prefix"] in self._prefixes):
                names.append(name)
        names.sort()
        return names

    def _next_name(self) -> str | None:
        with self._listing_lock:
            stale = time.monotonic() - self._listed_at > LISTING_TTL
            if not self._listing or stale:
                self._listing = deque(self._ready_names())
                self._listed_at = time.monotonic()
            return self._listing.popleft() if self._listing else None

    # -- reservations ---------------------------------------------------------
    def _reservation_folder(self) -> str:
        """This process's folder, made (with its held lock) on the first claim."""
        reservation = self._reservation
        if reservation is None or reservation[0] != os.getpid():
            with self._reservation_lock:
                reservation = self._reservation
                if reservation is None or reservation[0] != os.getpid():
                    if reservation is not None:
                        os.close(reservation[3])  # a forked child: the parent's lease, not ours
                    reservation = self._reservation = self._new_reservation()
        return reservation[2]

    def _new_reservation(self) -> tuple[int, str, str, int]:
        pid = os.getpid()
        token = f"{pid}-{secrets.token_hex(8)}"
        # Locked before it is visible under its final name: a reclaimer can never
        # take a live worker's fresh lock for a dead one's.
        pending = os.path.join(self.reserved_path, f".{token}.lock.tmp")
        fd = os.open(pending, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            os.rename(pending, os.path.join(self.reserved_path, f"{token}.lock"))
            folder = os.path.join(self.reserved_path, token)
            os.mkdir(folder, 0o700)
        except BaseException:
            os.close(fd)
            raise
        return pid, token, folder, fd

    def _drop_reservation(self, folder: str) -> None:
        with self._reservation_lock:
            reservation = self._reservation
            if reservation is not None and reservation[2] == folder:
                self._reservation = None
                os.close(reservation[3])

    @contextmanager
    def _giveback_guard(self, exclusive: bool) -> Iterator[None]:
        """Files only move back (reserved -> queue) under the exclusive lock, so a
        presence listing under the shared one sees every file at least once."""
        fd = os.open(self._giveback_lock_path,
                     os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
            yield
        finally:
            os.close(fd)

    def dequeue(self) -> bytes | None:
        """Claim the next file (one rename into the reservation folder); :meth:`ack` deletes it."""
        self._give_back_unrun()
        folder = None
        while True:
            name = self._next_name()
            if name is None:
                return None
            folder = folder or self._reservation_folder()
            claimed = os.path.join(folder, name)
            try:
                os.rename(os.path.join(self.queue_path, name), claimed)
            except FileNotFoundError:
                if not os.path.isdir(folder):  # removed by hand: lease anew
                    logger.warning("Reservation folder %s vanished; taking a new one", folder)
                    self._drop_reservation(folder)
                    folder = None
                continue  # another worker claimed it first
            data = _read(claimed)
            if data is None:
                logger.warning("Reserved file %s vanished before it was read", claimed)
                continue
            self._local.claimed = claimed
            return data

    def ack(self) -> None:
        """The job this thread dequeued last has run: delete its file."""
        claimed = getattr(self._local, "claimed", None)
        if claimed is None:
            return
        self._local.claimed = None
        try:
            os.unlink(claimed)
        except FileNotFoundError:
            logger.warning("Reserved file %s was already gone at ack", claimed)

    def _give_back_unrun(self) -> None:
        """A message this thread dequeued but Huey never ran (its execution path
        raised, or was interrupted) goes back to the queue, not to waste until exit."""
        claimed = getattr(self._local, "claimed", None)
        if claimed is None:
            return
        self._local.claimed = None
        logger.warning("Job file %s was dequeued but not run; giving it back",
                       os.path.basename(claimed))
        with self._giveback_guard(exclusive=True):
            try:
                os.rename(claimed, os.path.join(self.queue_path, os.path.basename(claimed)))
            except FileNotFoundError:
                logger.warning("Reserved file %s was already gone", claimed)

    def _give_back_folder(self, folder: str, redelivered: bool = False) -> int:
        """Move a folder's job files back to the queue under their names; drop the folder.

        ``redelivered``: the folder's worker died, so its jobs may have run; each is
        rewritten through ``mark_redelivered`` (a new file renamed into the queue,
        then the reserved one removed: a crash in between leaves both, and the
        claim of the record runs the job once).
        """
        moved = 0
        for name in _listdir(folder):
            if QUEUE_NAME.fullmatch(name):
                source = os.path.join(folder, name)
                try:
                    if redelivered and self.mark_redelivered is not None:
                        data = _read(source)
                        if data is None:
                            continue
                        marked = self.mark_redelivered(data)
                        try:
                            self._write(self.queue_path, name, marked)
                        except FileExistsError:  # a reclaimer that died mid-write left it
                            os.unlink(os.path.join(self.queue_path, name + ".tmp"))
                            self._write(self.queue_path, name, marked)
                        os.unlink(source)
                    else:
                        os.rename(source, os.path.join(self.queue_path, name))
                    moved += 1
                except FileNotFoundError:
                    continue
        try:
            shutil.rmtree(folder)
        except FileNotFoundError:
            pass  # a crash mid-cleanup already removed it; its lock file is still ours to drop
        return moved

    def reclaim_lost(self) -> int:
        """Give back every reservation whose process is dead (its lock is free)."""
        own = self._reservation[1] if self._reservation else None
        moved = 0
        for name in _listdir(self.reserved_path):
            match = TOKEN_LOCK.fullmatch(name)
            if match and match["token"] != own:
                moved += self._reclaim_token(match["token"])
        return moved

    def _reclaim_token(self, token: str) -> int:
        lock_path = os.path.join(self.reserved_path, f"{token}.lock")
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            return 0  # another process reclaimed it a moment ago
        except OSError as exc:  # e.g. ELOOP: a symlink where our lock file should be
            logger.warning("Skipping reservation lock %s: %s", lock_path, exc)
            return 0
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return 0  # its worker is alive
            try:
                current = os.stat(lock_path, follow_symlinks=False)
            except FileNotFoundError:
                return 0
            opened = os.fstat(fd)
            if (current.st_dev, current.st_ino) != (opened.st_dev, opened.st_ino):
                return 0  # reclaimed and removed while we waited to open it
            with self._giveback_guard(exclusive=True):
                moved = self._give_back_folder(os.path.join(self.reserved_path, token),
                                               redelivered=True)
                os.unlink(lock_path)  # last: a crash before this leaves it reclaimable
        finally:
            os.close(fd)
        if moved:
            logger.warning("Gave back %d job(s) reserved by dead worker %s", moved, token)
        return moved

    def release_reservations(self) -> int:
        """Graceful exit: give back anything still reserved (normally nothing) and
        remove this process's folder and lock. Only once no worker thread runs."""
        with self._reservation_lock:
            reservation = self._reservation
            if reservation is None or reservation[0] != os.getpid():
                return 0
            _, token, folder, fd = reservation
            try:
                with self._giveback_guard(exclusive=True):
                    moved = self._give_back_folder(folder)
                    os.unlink(os.path.join(self.reserved_path, f"{token}.lock"))
            finally:
                self._reservation = None
                os.close(fd)
        return moved

    def present_job_ids(self) -> set[str]:
        """Ids of every job with a file: scheduled, queued (or being written) or reserved.

        Listed in the order files move (schedule -> queue -> reserved) under the
        shared give-back lock, so a file moving during the listing is still seen.
        """
        present: set[str] = set()

        def note(directory: str, name: str, pattern: re.Pattern) -> None:
            match = pattern.fullmatch(name.removesuffix(".tmp"))
            if match is None and pattern is SCHEDULE_NAME:
                match = HUEY_SCHEDULE_NAME.fullmatch(name)
            if match is None:
                return
            job_id = match.groupdict().get("job")
            if job_id is None:  # no id in the name: read it (older files, Huey's own)
                data = _read(os.path.join(directory, name))
                job_id = self.describe_message(data)[1] if data is not None else None
            if job_id:
                present.add(job_id)

        with self._giveback_guard(exclusive=False):
            for name in _listdir(self.schedule_path):
                note(self.schedule_path, name, SCHEDULE_NAME)
            for name in _listdir(self.queue_path):
                note(self.queue_path, name, QUEUE_NAME)
            for token in _listdir(self.reserved_path):
                if TOKEN.fullmatch(token):
                    folder = os.path.join(self.reserved_path, token)
                    for name in _listdir(folder):
                        note(folder, name, QUEUE_NAME)
        return present

    # -- Huey hooks and statistics ----------------------------------------------
    def pop_data(self, key: Any) -> Any:
        """Huey pops a task's revoke key after every task under the storage-wide
        lock; coati never revokes, so check without the lock first."""
        if not os.path.exists(self.path_for_key(key)):
            return EmptyData
        return super().pop_data(key)

    def queue_size(self) -> int:
        return len(self._ready_names())

    def queued_by_priority(self) -> Counter:
        counts: Counter = Counter()
        for name in os.listdir(self.queue_path):
            match = QUEUE_NAME.fullmatch(name)
            if match:
                counts[self.MAX_PRIORITY - int(match["prefix"], 16)] += 1
        return counts

    def enqueued_items(self, limit: int | None = None) -> list[bytes]:
        items = []
        for name in self._ready_names()[:limit]:
            data = _read(os.path.join(self.queue_path, name))
            if data is not None:
                items.append(data)
        return items

    def purge_priorities(self, priorities: set[int]) -> int:
        prefixes = {self._prefix(p) for p in priorities}
        dropped = 0
        for name in os.listdir(self.queue_path):
            match = QUEUE_NAME.fullmatch(name)
            if match and match["prefix"] in prefixes:
                try:
                    os.unlink(os.path.join(self.queue_path, name))
                    dropped += 1
                except FileNotFoundError:
                    continue
        return dropped

    # -- the schedule (delayed jobs) --------------------------------------------
    def add_to_schedule(self, data: bytes, ts: Any, priority: int | None = None,
                        job_id: str | None = None) -> None:
        """``ts`` is naive UTC, as Huey passes it; priority and id as for enqueue."""
        if priority is None:
            priority, found = self.describe_message(data)
            job_id = job_id or found
        name = "%s-%s-%s" % (self._timestamp_to_prefix(ts), self._prefix(priority),
                             self._tail(job_id))
        self._write(self.schedule_path, name, data)

    def _scheduled_names(self) -> list[tuple[str, re.Match | None]]:
        """Sorted (name, match); the match is None for Huey's own (older) names."""
        names = []
        for name in _listdir(self.schedule_path):
            match = SCHEDULE_NAME.fullmatch(name)
            if match or HUEY_SCHEDULE_NAME.fullmatch(name):
                names.append((name, match))
        names.sort(key=lambda item: item[0])
        return names

    def read_schedule(self, ts: Any) -> list[bytes]:
        """Move due jobs into the queue (one rename each) and give Huey nothing to
        enqueue: the job never leaves disk between the schedule and the queue."""
        due = self._timestamp_to_prefix(ts)
        older = []
        for name, match in self._scheduled_names():
            if name[:12] > due:
                break
            if match is None:
                older.append(name)
                continue
            target = os.path.join(self.queue_path, self._queue_name(match["prefix"], match["job"]))
            try:
                os.rename(os.path.join(self.schedule_path, name), target)
            except FileNotFoundError:
                continue  # another worker's scheduler moved it
        if older:
            with self.lock:  # two schedulers must not both copy an older file
                for name in older:
                    source = os.path.join(self.schedule_path, name)
                    data = _read(source)
                    if data is not None:
                        priority, job_id = self.describe_message(data)
                        self.enqueue_many([(data, priority, job_id)])
                        os.unlink(source)
        return []

    def schedule_size(self) -> int:
        return len(self._scheduled_names())

    def scheduled_items(self, limit: int | None = None) -> list[bytes]:
        items = []
        for name, _ in self._scheduled_names()[:limit]:
            data = _read(os.path.join(self.schedule_path, name))
            if data is not None:
                items.append(data)
        return items

    def _scheduled_priority(self, name: str, match: re.Match | None) -> int | None:
        if match is not None:
            return self.MAX_PRIORITY - int(match["prefix"], 16)
        data = _read(os.path.join(self.schedule_path, name))
        return None if data is None else self.describe_message(data)[0]

    def scheduled_by_priority(self) -> Counter:
        counts: Counter = Counter()
        for name, match in self._scheduled_names():
            priority = self._scheduled_priority(name, match)
            if priority is not None:
                counts[priority] += 1
        return counts

    def purge_scheduled(self, priorities: set[int]) -> int:
        """Drop delayed jobs of these priorities."""
        dropped = 0
        for name, match in self._scheduled_names():
            if self._scheduled_priority(name, match) in priorities:
                try:
                    os.unlink(os.path.join(self.schedule_path, name))
                    dropped += 1
                except FileNotFoundError:
                    continue
        return dropped
