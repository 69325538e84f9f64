"""A file lock that never follows a symlink nor truncates what it opens."""

from __future__ import annotations

import fcntl
import os
import threading
from typing import Any


class NoFollowFileLock:
    """Huey's ``FileLock`` without its two hazards: it opened ``.lock`` with
    ``O_TRUNC`` and followed a symlink, so a ``.lock`` symlink planted by another
    user truncated the file it pointed to. One descriptor per thread, as Huey's."""

    def __init__(self, filename: str):
        self.filename = filename
        self._local = threading.local()

    def acquire(self) -> None:
        fd = os.open(self.filename, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX)
        self._local.fd = fd

    def release(self) -> None:
        fd = getattr(self._local, "fd", None)
        if fd is not None:
            self._local.fd = None
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def __enter__(self) -> "NoFollowFileLock":
        self.acquire()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()
