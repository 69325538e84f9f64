"""Huey's FileStorage with a lock-free queue, bulk enqueue and per-queue consumption.

Huey's ``FileStorage`` takes one exclusive file lock and lists the whole
queue directory on every enqueue and dequeue, so N queued jobs cost O(N)
each. Here the queue half is reworked, the schedule half is Huey's own:

* enqueue writes ``<name>.tmp`` and renames it into place (atomic), many
  jobs per call;
* dequeue claims a file by renaming it to a private name (atomic: one
  process wins), from a sorted listing that is re-read only when used up
  or older than ``LISTING_TTL``;
* a worker can be limited to some priorities (= queues).

File names keep Huey's ordering: inverse priority, then milliseconds, then
a per-process sequence, so the listing sorts highest priority first, FIFO.
"""

from __future__ import annotations

import itertools
import os
import threading
import time
from collections import Counter, deque
from typing import Any

from huey.constants import EmptyData
from huey.storage import FileStorage

LISTING_TTL = 0.1


class QueueFileStorage(FileStorage):
    def __init__(self, name: str, path: str, **kwargs):
        kwargs.setdefault("levels", 2)
        super().__init__(name, path, **kwargs)
        os.makedirs(self.queue_path, mode=0o700, exist_ok=True)
        self._sequence = itertools.count()
        self._listing: deque[str] = deque()
        self._listed_at = 0.0
        self._listing_lock = threading.Lock()
        self._prefixes: set[str] | None = None

    def _prefix(self, priority: int) -> str:
        return "%04x" % (self.MAX_PRIORITY - int(priority or 0))

    def only_priorities(self, priorities: set[int] | None) -> None:
        """Dequeue only these priorities (a worker started with ``--queues``)."""
        self._prefixes = None if priorities is None else {self._prefix(p) for p in priorities}

    def _file_name(self, priority: int) -> str:
        return "%s-%012x-%010x-%d" % (self._prefix(priority), int(time.time() * 1000),
                                      next(self._sequence), os.getpid())

    def enqueue(self, data: bytes, priority: int | None = None) -> None:
        self.enqueue_many([(data, priority or 0)])

    def enqueue_many(self, items: list[tuple[bytes, int]]) -> None:
        for data, priority in items:
            if not 0 <= int(priority) <= self.MAX_PRIORITY:
                raise ValueError(f"priority must be within 0..{self.MAX_PRIORITY}")
            final = os.path.join(self.queue_path, self._file_name(priority))
            with open(final + ".tmp", "wb") as handle:
                handle.write(data)
            os.rename(final + ".tmp", final)

    def _ready_names(self) -> list[str]:
        names = [n for n in os.listdir(self.queue_path) if not n.endswith(".tmp")]
        if self._prefixes is not None:
            names = [n for n in names if n[:4] in self._prefixes]
        names.sort()
        return names

    def _next_name(self) -> str | None:
        with self._listing_lock:
            stale = time.monotonic() - self._listed_at > LISTING_TTL
            if not self._listing or stale:
                self._listing = deque(self._ready_names())
                self._listed_at = time.monotonic()
            return self._listing.popleft() if self._listing else None

    def dequeue(self) -> bytes | None:
        while True:
            name = self._next_name()
            if name is None:
                return None
            source = os.path.join(self.queue_path, name)
            claimed = f"{source}.{os.getpid()}-{threading.get_ident()}.tmp"
            try:
                os.rename(source, claimed)
            except FileNotFoundError:
                continue  # another worker claimed it first
            with open(claimed, "rb") as handle:
                data = handle.read()
            os.unlink(claimed)
            return data

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
            if not name.endswith(".tmp"):
                counts[self.MAX_PRIORITY - int(name[:4], 16)] += 1
        return counts

    def enqueued_items(self, limit: int | None = None) -> list[bytes]:
        items = []
        for name in self._ready_names()[:limit]:
            try:
                with open(os.path.join(self.queue_path, name), "rb") as handle:
                    items.append(handle.read())
            except FileNotFoundError:
                continue
        return items

    def purge_priorities(self, priorities: set[int]) -> int:
        prefixes = {self._prefix(p) for p in priorities}
        dropped = 0
        for name in os.listdir(self.queue_path):
            if name[:4] in prefixes and not name.endswith(".tmp"):
                try:
                    os.unlink(os.path.join(self.queue_path, name))
                    dropped += 1
                except FileNotFoundError:
                    continue
        return dropped

    def purge_scheduled(self, doomed) -> int:
        """Drop scheduled (delayed) items whose data ``doomed(data)`` is true."""
        dropped = 0
        with self.lock:
            for name in self._get_sorted_filenames(self.schedule_path):
                path = os.path.join(self.schedule_path, name)
                try:
                    with open(path, "rb") as handle:
                        data = handle.read()
                except FileNotFoundError:
                    continue
                if doomed(data):
                    os.unlink(path)
                    dropped += 1
        return dropped
