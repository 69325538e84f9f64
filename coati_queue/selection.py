"""The one place that decides which backend runs, and where Huey keeps its files.

``get_queue_driver()`` builds the process-wide driver on first use (never at
import) and logs one INFO line saying which backend and why; the cache is
dropped on ``setting_changed`` so ``override_settings`` works.
"""

from __future__ import annotations

import logging
import os
import stat
import tempfile
import threading
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from django.core.exceptions import ImproperlyConfigured

from .conf import QueueSettings, get_settings, reset_settings
from .core.exceptions import BackendUnavailable, StorageUnavailable
from .redis_url import error_text, mask_redis_url, secret_url

if TYPE_CHECKING:
    from .backends.base import QueueDriver

logger = logging.getLogger("coati_queue")


class BackendNotConfigured(BackendUnavailable, ImproperlyConfigured):
    """No backend can be chosen from these settings: a ``BackendUnavailable`` that is
    also Django's ``ImproperlyConfigured`` (the core's errors cannot subclass Django's)."""


class StorageNotConfigured(StorageUnavailable, ImproperlyConfigured):
    """No safe directory for Huey's storage: a settings problem, as above."""

SYSTEM_PATH = "/var/lib/coati/queue"
USER_PATH = "~/.local/share/coati-queue/queue"
LOCAL_PATH = "./.coati_queue"
FORCEABLE = ("huey", "dramatiq", "immediate")


@dataclass(frozen=True)
class Selection:
    backend: str
    reason: str
    # A RedisURL: its repr (DEBUG error pages, logs of the object) masks the password.
    redis_url: str | None = field(default=None, repr=False)
    path: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "redis_url", secret_url(self.redis_url))

    def __repr__(self) -> str:
        return (f"Selection(backend={self.backend!r}, reason={self.reason!r}, "
                f"redis_url={self.redis_url!r}, path={self.path!r})")


def redis_answers(url: str, timeout: float) -> tuple[bool, str]:
    """PING within ``timeout`` seconds; the error text never holds the password."""
    import redis

    try:
        client = redis.Redis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout)
        try:
            client.ping()
        finally:
            client.close()
        return True, ""
    except (redis.RedisError, OSError, ValueError) as exc:
        return False, error_text(exc, url)


def huey_path_candidates(settings: QueueSettings) -> list[tuple[str, str]]:
    candidates = []
    if settings.PATH:
        candidates.append((settings.PATH, "COATI_QUEUE_PATH"))
    candidates += [(SYSTEM_PATH, "system"), (os.path.expanduser(USER_PATH), "user"),
                   (os.path.abspath(LOCAL_PATH), "project")]
    candidates.append((os.path.join(tempfile.gettempdir(), "coati_queue"), "temporary"))
    return candidates


#: Names inside a Huey directory that must be real files or folders of ours, never
#: symlinks: Huey's lock, our give-back lock and the storage's folders.
HUEY_INNER_NAMES = (".lock", "giveback.lock", "queue", "schedule", "reserved")


@dataclass(frozen=True)
class DirectoryProblem:
    """Why a Huey directory is refused. ``unsafe``: other users could read or swap the
    job files (a symlink, another owner, writable by others); else it is unusable
    (missing and not creatable, not a directory, not writable)."""

    reason: str
    unsafe: bool = False

    def __str__(self) -> str:
        return self.reason


def _uid() -> int | None:
    return os.getuid() if hasattr(os, "getuid") else None


def _others_may_write(info: os.stat_result, uid: int | None) -> str | None:
    """Why users other than us could rename or replace entries of this directory, or None.

    Its owner can always (chmod), so it must be us or root; group or world write
    is fine only with the sticky bit (entries can then be renamed or removed by
    their owners only), as on /tmp.
    """
    if uid is None:
        return None
    if info.st_uid not in (uid, 0):
        return f"it is owned by uid {info.st_uid}, neither this user ({uid}) nor root"
    if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH) and not info.st_mode & stat.S_ISVTX:
        return (f"it is writable by other users (mode {stat.S_IMODE(info.st_mode):04o}) "
                "without the sticky bit")
    return None


def _ancestors(path: str) -> list[str]:
    """Every directory the kernel looks a name up in to reach ``path``'s parent: its
    parents up to the root as written, and, for each symlink met on the way, the
    parents of its target (and the fully resolved chain)."""
    seen: list[str] = []
    parent = os.path.dirname(path)
    pending = [parent, os.path.realpath(parent)]
    hops = 0
    while pending:
        current = pending.pop(0)
        while current not in seen:
            seen.append(current)
            if os.path.islink(current) and hops < 40:  # 40: the kernel's own limit
                hops += 1
                target = os.readlink(current)
                pending.append(os.path.normpath(os.path.join(os.path.dirname(current), target)))
            parent = os.path.dirname(current)
            if parent == current:
                break
            current = parent
    return seen


def unsafe_parent(path: str) -> DirectoryProblem | None:
    """A directory above ``path`` that other users could swap ``path`` in, or None.

    Checked with ``lstat``; a symlinked parent (``/var/run`` -> ``/run``) is
    checked where it lives and where it points.
    """
    uid = _uid()
    for directory in _ancestors(os.path.abspath(path)):
        try:
            info = os.lstat(directory)
        except FileNotFoundError:
            continue  # not created yet: it will be ours, mode 0700
        except OSError as exc:
            return DirectoryProblem(f"its parent {directory} cannot be examined: "
                                    f"{type(exc).__name__}: {exc.strerror or exc}")
        if stat.S_ISLNK(info.st_mode):
            continue  # the link's own folder and its target's chain are in the list
        why = _others_may_write(info, uid)
        if why:
            return DirectoryProblem(f"its parent {directory} is not safe: {why}; another user "
                                    "could replace the queue directory", unsafe=True)
    return None


def _inspect_existing(path: str, info: os.stat_result) -> DirectoryProblem | None:
    uid = _uid()
    if stat.S_ISLNK(info.st_mode):
        return DirectoryProblem("it is a symlink (refused: it could point anywhere)", unsafe=True)
    if not stat.S_ISDIR(info.st_mode):
        return DirectoryProblem("it exists and is not a directory")
    if uid is not None and info.st_uid != uid:
        return DirectoryProblem(f"it is owned by uid {info.st_uid}, not by this user ({uid})",
                                unsafe=True)
    if uid is not None and info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return DirectoryProblem(
            f"it is writable by other users (mode {stat.S_IMODE(info.st_mode):04o}); "
            f"run chmod 700 {path}", unsafe=True)
    for name in HUEY_INNER_NAMES:
        inner = os.path.join(path, name)
        try:
            inner_info = os.lstat(inner)
        except FileNotFoundError:
            continue
        if stat.S_ISLNK(inner_info.st_mode):
            return DirectoryProblem(f"it holds a symlink {inner} (refused: the queue would "
                                    "follow it)", unsafe=True)
        if uid is not None and inner_info.st_uid != uid:
            return DirectoryProblem(f"{inner} is owned by uid {inner_info.st_uid}, not by this "
                                    f"user ({uid})", unsafe=True)
    return None


def _probe(path: str) -> DirectoryProblem | None:
    """Write, read back and delete a file (0600, never through a symlink)."""
    probe = os.path.join(path, f".probe-{uuid.uuid4().hex}")
    fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        os.write(fd, b"coati")
    finally:
        os.close(fd)
    try:
        with open(probe, "rb") as handle:
            if handle.read() != b"coati":
                return DirectoryProblem("a probe file read back differently")
    finally:
        os.unlink(probe)
    return None


def _creatable(path: str) -> DirectoryProblem | None:
    """None when the missing ``path`` could be made: its nearest existing ancestor is a
    directory we may write into."""
    current = os.path.dirname(path)
    while not os.path.lexists(current):
        parent = os.path.dirname(current)
        if parent == current:
            break
        current = parent
    if not os.path.isdir(current):
        return DirectoryProblem(f"it does not exist and cannot be created: {current} is not "
                                "a directory")
    if not os.access(current, os.W_OK | os.X_OK):
        return DirectoryProblem(f"it does not exist and cannot be created: {current} is not "
                                "writable by this user")
    return None


def _make_directories(path: str) -> None:
    """Create ``path`` and its missing parents, each with mode 0700 (``os.makedirs``
    would give the parents the umask's mode, maybe group-writable)."""
    missing = []
    current = path
    while not os.path.lexists(current):
        missing.append(current)
        parent = os.path.dirname(current)
        if parent == current:
            break
        current = parent
    for directory in reversed(missing):
        try:
            os.mkdir(directory, 0o700)
        except FileExistsError:
            pass


def directory_problem(path: str, *, create: bool = True) -> DirectoryProblem | None:
    """None when ``path`` is a safe, usable Huey directory; else why not.

    Safe: neither it nor any parent up to the root can be renamed or replaced
    by another user (see :func:`unsafe_parent`); it is a real directory (``lstat``:
    a symlink is refused), owned by this user, not writable by group or others,
    and Huey's lock files and folders in it are not symlinks. Usable: a probe
    file is written, read back and deleted. ``create``: make it (0700) when
    missing; else a missing directory is fine when it could be created.
    """
    path = os.path.abspath(path)
    try:
        problem = unsafe_parent(path)
        if problem:
            return problem
        try:
            info = os.lstat(path)
        except FileNotFoundError:
            if not create:
                return _creatable(path)
            _make_directories(path)
            info = os.lstat(path)
        problem = _inspect_existing(path, info)
        if problem:
            return problem
        return _probe(path)
    except OSError as exc:
        return DirectoryProblem(f"{type(exc).__name__}: {exc.strerror or exc}")


def check_directory(path: str) -> str | None:
    """None when ``path`` is usable, else why not. Creates it (0700) if missing."""
    problem = directory_problem(path)
    return None if problem is None else problem.reason


def verify_huey_directory(path: str) -> None:
    """Raise ``StorageUnavailable`` unless ``path`` is (still) a safe, usable directory.

    Called whenever a driver is built on a directory, not once per process: a
    directory that was fine when chosen may have been replaced since.
    """
    problem = directory_problem(path, create=False)
    if problem is None and not os.path.isdir(path):
        problem = DirectoryProblem("it does not exist (any more)")
    if problem is not None:
        raise StorageNotConfigured(f"Refused Huey storage directory {path}: {problem.reason}")


def resolve_huey_path(settings: QueueSettings) -> str:
    for path, label in huey_path_candidates(settings):
        problem = check_directory(path)
        if problem is None:
            if label == "temporary":
                logger.warning("Huey storage is in the temporary directory %s: jobs may be lost "
                               "on reboot. Set COATI_QUEUE_PATH to a persistent directory.", path)
            return path
        logger.error("Refused Huey storage directory %s (%s): %s", path, label, problem)
    raise StorageNotConfigured("No usable directory for Huey's file storage; set COATI_QUEUE_PATH "
                             "to a directory this user owns and can write.")


def choose_backend(settings: QueueSettings, force_backend: str | None = None) -> Selection:
    """Decide the backend: forced, then QUEUE_ENABLED, then BACKEND (auto probes Redis)."""
    if force_backend is not None and force_backend not in FORCEABLE:
        raise BackendNotConfigured(
            f"force_backend={force_backend!r}; choose one of {', '.join(FORCEABLE)}.")
    wanted = force_backend or settings.BACKEND
    if force_backend is None and not settings.ENABLED:
        return Selection("immediate", "QUEUE_ENABLED is off: tasks run in the caller")
    if wanted == "immediate":
        return Selection("immediate", "forced" if force_backend else "BACKEND='immediate'")
    url = secret_url(settings.REDIS_URL)  # a masked repr in tracebacks' local variables
    if wanted == "dramatiq":
        if not url:
            raise BackendNotConfigured("The Dramatiq backend needs a Redis URL: set REDIS_URL or "
                                     "COATI_QUEUE['REDIS_URL'].")
        how = "forced" if force_backend else "BACKEND='dramatiq'"
        return Selection("dramatiq", f"{how}, Redis at {mask_redis_url(url)}", redis_url=url)
    if wanted == "huey":
        path = resolve_huey_path(settings)
        how = "forced" if force_backend else "BACKEND='huey'"
        return Selection("huey", f"{how}, file storage at {path}", path=path)
    # auto
    if url:
        ok, error = redis_answers(url, settings.REDIS_TIMEOUT)
        if ok:
            return Selection("dramatiq", f"Redis at {mask_redis_url(url)} answered PING",
                             redis_url=url)
        path = resolve_huey_path(settings)
        logger.warning("Failed to connect to Redis for Dramatiq: %s — using Huey with filesystem "
                       "storage at %s", error, path)
        return Selection("huey", f"Redis at {mask_redis_url(url)} did not answer ({error})",
                         path=path)
    path = resolve_huey_path(settings)
    return Selection("huey", f"no Redis URL configured; file storage at {path}", path=path)


def build_driver(selection: Selection, settings: QueueSettings) -> Any:
    """Import the chosen driver module only now (optional dependencies stay lazy)."""
    if selection.backend == "immediate":
        from .backends.immediate import ImmediateDriver

        return ImmediateDriver(settings, reason=selection.reason)
    if selection.backend == "dramatiq":
        from .backends.dramatiq import DramatiqDriver

        return DramatiqDriver(settings, redis_url=secret_url(selection.redis_url),
                              reason=selection.reason)
    from .backends.huey import HueyDriver

    verify_huey_directory(selection.path or "")
    return HueyDriver(settings, path=selection.path, reason=selection.reason,
                      verify_path=verify_huey_directory)


_drivers: dict[str | None, Any] = {}
_drivers_lock = threading.Lock()


def get_queue_driver(force_backend: str | None = None) -> QueueDriver:
    """The process-wide driver (``force_backend`` picks huey/dramatiq/immediate)."""
    driver = _drivers.get(force_backend)
    if driver is not None:
        return driver
    with _drivers_lock:
        if force_backend not in _drivers:
            settings = get_settings()
            selection = choose_backend(settings, force_backend)
            logger.info("coati_queue backend: %s (%s)", selection.backend, selection.reason)
            _drivers[force_backend] = build_driver(selection, settings)
        return _drivers[force_backend]


def reset_drivers() -> None:
    with _drivers_lock:
        _drivers.clear()


def reset_on_setting_changed(setting: str, **kwargs: Any) -> None:
    if setting in {"COATI_QUEUE", "DATABASES", "TASKS"}:  # TASKS: its coati backends' QUEUES
        reset_settings()
        reset_drivers()
