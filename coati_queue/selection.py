"""The one place that decides which backend runs, and where Huey keeps its files.

``get_queue_driver()`` builds the process-wide driver on first use (never at
import) and logs one INFO line saying which backend and why; the cache is
dropped on ``setting_changed`` so ``override_settings`` works.
"""

from __future__ import annotations

import logging
import os
import tempfile
import threading
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .conf import QueueSettings, get_settings, reset_settings
from .core.exceptions import BackendUnavailable, StorageUnavailable
from .redis_url import error_text, mask_redis_url

logger = logging.getLogger("coati_queue")

SYSTEM_PATH = "/var/lib/coati/queue"
USER_PATH = "~/.local/share/coati-queue/queue"
LOCAL_PATH = "./.coati_queue"
FORCEABLE = ("huey", "dramatiq", "immediate")


@dataclass(frozen=True)
class Selection:
    backend: str
    reason: str
    redis_url: str | None = None
    path: str | None = None


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


def check_directory(path: str) -> str | None:
    """None when ``path`` is usable, else why not. Creates it (0700) if missing."""
    target = Path(path)
    try:
        if target.is_symlink():
            return "it is a symlink (refused: it could point anywhere)"
        if not target.exists():
            target.mkdir(mode=0o700, parents=True)
        if not target.is_dir():
            return "it exists and is not a directory"
        if hasattr(os, "getuid") and target.stat().st_uid != os.getuid():
            return f"it is owned by uid {target.stat().st_uid}, not by this user ({os.getuid()})"
        probe = target / f".probe-{uuid.uuid4().hex}"
        probe.write_bytes(b"coati")
        try:
            if probe.read_bytes() != b"coati":
                return "a probe file read back differently"
        finally:
            probe.unlink()
    except OSError as exc:
        return f"{type(exc).__name__}: {exc.strerror or exc}"
    return None


def resolve_huey_path(settings: QueueSettings) -> str:
    for path, label in huey_path_candidates(settings):
        problem = check_directory(path)
        if problem is None:
            if label == "temporary":
                logger.warning("Huey storage is in the temporary directory %s: jobs may be lost "
                               "on reboot. Set COATI_QUEUE_PATH to a persistent directory.", path)
            return path
        logger.error("Refused Huey storage directory %s (%s): %s", path, label, problem)
    raise StorageUnavailable("No usable directory for Huey's file storage; set COATI_QUEUE_PATH "
                             "to a directory this user owns and can write.")


def choose_backend(settings: QueueSettings, force_backend: str | None = None) -> Selection:
    """Decide the backend: forced, then QUEUE_ENABLED, then BACKEND (auto probes Redis)."""
    if force_backend is not None and force_backend not in FORCEABLE:
        raise BackendUnavailable(
            f"force_backend={force_backend!r}; choose one of {', '.join(FORCEABLE)}.")
    wanted = force_backend or settings.BACKEND
    if force_backend is None and not settings.ENABLED:
        return Selection("immediate", "QUEUE_ENABLED is off: tasks run in the caller")
    if wanted == "immediate":
        return Selection("immediate", "forced" if force_backend else "BACKEND='immediate'")
    url = settings.REDIS_URL
    if wanted == "dramatiq":
        if not url:
            raise BackendUnavailable("The Dramatiq backend needs a Redis URL: set REDIS_URL or "
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

        return DramatiqDriver(settings, redis_url=selection.redis_url, reason=selection.reason)
    from .backends.huey import HueyDriver

    return HueyDriver(settings, path=selection.path, reason=selection.reason)


_drivers: dict[str | None, Any] = {}
_drivers_lock = threading.Lock()


def get_queue_driver(force_backend: str | None = None) -> Any:
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
    if setting in {"COATI_QUEUE", "DATABASES"}:
        reset_settings()
        reset_drivers()
