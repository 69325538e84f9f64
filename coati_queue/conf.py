"""Typed, lazy view of ``settings.COATI_QUEUE`` + environment variables + defaults.

Every value is read once per settings state: ``settings_changed`` (wired in
``apps.py``) drops the cache so ``override_settings`` works in tests.
Precedence for each key: the ``COATI_QUEUE`` dict, then its environment
variable (if it has one), then the default below.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from typing import Any, Callable

from django.core.exceptions import ImproperlyConfigured

BACKEND_CHOICES = ("auto", "dramatiq", "huey", "immediate")


def _to_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in {"1", "true", "yes", "on"}:
        return True
    if text in {"0", "false", "no", "off", ""}:
        return False
    raise ValueError(f"expected a boolean (1/0, true/false), got {value!r}")


def _to_list(value: Any) -> list[str]:
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return [str(part) for part in value]


def _optional_ms(value: Any) -> int | None:
    """Milliseconds, or None (also for 0 or an empty string): off."""
    return None if value in (None, "") else (int(value) or None)


def _optional_seconds(value: Any) -> float | None:
    return None if value in (None, "") else float(value)


def _optional_str(value: Any) -> str | None:
    return None if value in (None, "") else str(value)


def _redis_url(value: Any) -> str | None:
    """The URL as a ``str`` whose repr hides the password (DEBUG pages show locals)."""
    from .redis_url import secret_url

    return secret_url(_optional_str(value))


def _setting(default: Any, parse: Callable[[Any], Any] = lambda v: v, env: str | None = None,
             doc: str = "", secret: bool = False) -> Any:
    # A secret stays out of repr(): a DEBUG error page shows the locals that hold settings.
    return field(default=default, repr=not secret,
                 metadata={"parse": parse, "env": env, "doc": doc})


@dataclass(frozen=True)
class QueueSettings:
    """The resolved settings. Field order is the order of the README table."""

    BACKEND: str = _setting("auto", str, "COATI_QUEUE_BACKEND",
                            "auto, dramatiq, huey or immediate")
    ENABLED: bool = _setting(True, _to_bool, "QUEUE_ENABLED",
                             "False: tasks run synchronously in the caller, still tracked")
    REDIS_URL: str | None = _setting(None, _redis_url, "REDIS_URL",
                                     "Redis for the Dramatiq backend", secret=True)
    REDIS_TIMEOUT: float = _setting(0.5, float, "COATI_QUEUE_REDIS_TIMEOUT",
                                    "seconds auto waits for Redis PING")
    PATH: str | None = _setting(None, _optional_str, "COATI_QUEUE_PATH",
                                "Huey storage directory (first of a fallback chain)")
    QUEUES: list = _setting(("high", "default", "low"), _to_list, "COATI_QUEUE_QUEUES",
                            "queue names, highest priority first")
    DEFAULT_QUEUE: str = _setting("default", str, None, "queue of tasks that name none")
    ENQUEUE_ON_COMMIT: bool = _setting(True, _to_bool, None,
                                       "send after the surrounding transaction commits")
    MAX_RETRIES: int = _setting(3, int, None, "default retries after the first attempt")
    MIN_BACKOFF: int = _setting(15_000, int, None, "first retry delay, at most (jittered "
                                "between half and all of it), milliseconds")
    MAX_BACKOFF: int = _setting(3_600_000, int, None, "largest retry delay, milliseconds")
    TIME_LIMIT: int | None = _setting(
        300_000, _optional_ms, None, "default hard time limit, milliseconds: the supervisor "
        "kills the worker process running the task (None: off)")
    SOFT_TIME_LIMIT: int | None = _setting(
        240_000, _optional_ms, None, "default soft time limit, milliseconds: "
        "SoftTimeLimitExceeded is raised inside the task (None: off)")
    RESULT_TTL: int = _setting(7 * 86_400, int, None, "seconds to keep completed task records")
    FAILURE_TTL: int = _setting(30 * 86_400, int, None, "seconds to keep failed task records")
    TRACKING_FLUSH_INTERVAL: float = _setting(0.05, float, None,
                                              "seconds between bulk writes of task states")
    WORKER_PROCESSES: int = _setting(0, int, None, "runworkers --processes default (0: CPUs)")
    WORKER_THREADS: int = _setting(8, int, None, "runworkers --threads default")
    WORKER_MAX_TASKS_PER_CHILD: int = _setting(
        0, int, None, "runworkers --max-tasks-per-child default (0: never recycle)")
    WORKER_MAX_MEMORY_PER_CHILD: int = _setting(
        0, int, None, "runworkers --max-memory-per-child default, MiB of resident memory "
        "(0: never recycle)")
    WORKER_SHUTDOWN_TIMEOUT: float | None = _setting(
        None, _optional_seconds, None, "runworkers --shutdown-timeout default, seconds a "
        "graceful stop waits for in-flight tasks (None: until they end or hit their hard "
        "time limit)")
    HEARTBEAT_INTERVAL: float = _setting(5.0, float, None, "seconds between worker heartbeats")
    WORKER_LOST_AFTER: float = _setting(30.0, float, None,
                                        "seconds without a heartbeat before a worker is lost")
    CLEANUP_INTERVAL: float = _setting(300.0, float, "COATI_QUEUE_CLEANUP_INTERVAL",
                                       "seconds between a worker's deletions of expired "
                                       "task records (0: never)")
    REDIS_HEARTBEAT_TIMEOUT: float = _setting(
        60.0, float, None, "seconds without a worker's Redis heartbeat before its unacked "
        "messages go to other workers (Dramatiq)")
    RECONCILE_INTERVAL: float = _setting(
        30.0, float, None, "seconds between a worker's delivery checks: lost workers' tasks, "
        "unsent and vanished messages, expired batch claims (0: never)")
    RESEND_PENDING_AFTER: float = _setting(
        300.0, float, None, "seconds a pending record may wait before the reconciler checks "
        "that its message is still in the broker")
    WORKER_LOST_LIMIT: int = _setting(
        3, int, None, "worker deaths while running one task before it is marked failed")
    BATCH_CLAIM_TTL: float = _setting(
        600.0, float, None, "seconds a worker's claim on batch items lasts before another "
        "worker may take them (renewed while it runs)")
    MAX_MESSAGE_SIZE: int = _setting(
        512 * 1024, int, None, "largest encoded job in bytes, checked at send and in workers")
    DEAD_LETTER_PAYLOAD_LIMIT: int = _setting(
        64 * 1024, int, None, "bytes of a dead letter's raw payload that are kept")
    STRICT: bool = _setting(False, _to_bool, "COATI_QUEUE_STRICT",
                            "stricter checks: an evicting Redis maxmemory-policy is an error")
    METRICS_TOKEN: str | None = _setting(None, _optional_str, "COATI_QUEUE_METRICS_TOKEN",
                                         "bearer token for /metrics without a session",
                                         secret=True)
    MIDDLEWARE: list = _setting((), _to_list, None, "extra middleware classes (dotted paths)")
    PAYROLL: dict = _setting(None, lambda v: dict(v or {}), None,
                             "payroll hooks, see the payroll section")

    @classmethod
    def from_django(cls) -> "QueueSettings":
        from django.conf import settings

        user = getattr(settings, "COATI_QUEUE", {}) or {}
        if not isinstance(user, dict):
            raise ImproperlyConfigured("settings.COATI_QUEUE must be a dict.")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(user) - known)
        if unknown:
            raise ImproperlyConfigured(
                f"Unknown COATI_QUEUE key(s): {', '.join(unknown)}. "
                f"Known keys: {', '.join(sorted(known))}."
            )
        values = {}
        for f in fields(cls):
            env = f.metadata["env"]
            if f.name in user:
                raw, origin = user[f.name], f"COATI_QUEUE['{f.name}']"
            elif env and env in os.environ:
                raw, origin = os.environ[env], f"environment variable {env}"
            else:
                values[f.name] = f.metadata["parse"](f.default)
                continue
            try:
                values[f.name] = f.metadata["parse"](raw)
            except (TypeError, ValueError) as exc:
                raise ImproperlyConfigured(f"Invalid value for {origin}: {exc}") from exc
        extra = [name for name in django_task_queues() if name not in values["QUEUES"]]
        values["QUEUES"] = [*values["QUEUES"], *extra]  # consumed after coati's own
        resolved = cls(**values)
        resolved.validate()
        return resolved

    def validate(self) -> None:
        if self.BACKEND not in BACKEND_CHOICES:
            raise ImproperlyConfigured(
                f"COATI_QUEUE['BACKEND'] is {self.BACKEND!r}; choose one of "
                f"{', '.join(BACKEND_CHOICES)}."
            )
        if not self.QUEUES:
            raise ImproperlyConfigured("COATI_QUEUE['QUEUES'] must name at least one queue.")
        if self.DEFAULT_QUEUE not in self.QUEUES:
            raise ImproperlyConfigured(
                f"COATI_QUEUE['DEFAULT_QUEUE'] {self.DEFAULT_QUEUE!r} is not in QUEUES "
                f"{self.QUEUES}."
            )
        if not 0 < self.MIN_BACKOFF <= self.MAX_BACKOFF:
            raise ImproperlyConfigured("COATI_QUEUE needs 0 < MIN_BACKOFF <= MAX_BACKOFF.")
        if self.MAX_RETRIES < 0:
            raise ImproperlyConfigured("COATI_QUEUE['MAX_RETRIES'] cannot be negative.")
        if self.WORKER_LOST_LIMIT < 1:
            raise ImproperlyConfigured("COATI_QUEUE['WORKER_LOST_LIMIT'] must be at least 1.")
        for key in ("TIME_LIMIT", "SOFT_TIME_LIMIT"):
            value = getattr(self, key)
            if value is not None and not 0 < value <= 7 * 86_400_000:
                raise ImproperlyConfigured(f"COATI_QUEUE['{key}'] must be None (off) or "
                                           "1..604800000 milliseconds (a week).")
        for key in ("WORKER_MAX_TASKS_PER_CHILD", "WORKER_MAX_MEMORY_PER_CHILD"):
            if getattr(self, key) < 0:
                raise ImproperlyConfigured(f"COATI_QUEUE['{key}'] cannot be negative (0: off).")
        if self.WORKER_SHUTDOWN_TIMEOUT is not None and self.WORKER_SHUTDOWN_TIMEOUT < 0:
            raise ImproperlyConfigured("COATI_QUEUE['WORKER_SHUTDOWN_TIMEOUT'] cannot be "
                                       "negative (None: wait for in-flight tasks).")
        if self.MAX_MESSAGE_SIZE < 1024:
            raise ImproperlyConfigured("COATI_QUEUE['MAX_MESSAGE_SIZE'] must be at least 1024 "
                                       "bytes.")

    def queue_priority(self, queue: str) -> int:
        """Higher number = consumed first; ``QUEUES`` lists the highest first."""
        return len(self.QUEUES) - self.QUEUES.index(queue)


#: Where ``settings.TASKS`` names coati_queue as a backend of Django's tasks framework.
COATI_TASK_BACKEND = "coati_queue.django_tasks.CoatiTaskBackend"


def django_task_queues() -> list[str]:
    """The ``QUEUES`` of coati_queue's backends in ``settings.TASKS`` (Django 6+).

    Django accepts a task for such a queue, so it must be a real coati queue:
    ``QueueSettings.QUEUES`` appends them (after ``COATI_QUEUE["QUEUES"]``, so
    consumed last) and ``runworkers`` consumes them by default. A name the
    envelope cannot carry (not 1-64 characters) is left out; the backend's
    system check reports it. Matched by path, without importing anything (settings
    may be read before the apps are ready): a subclass of the backend lists its
    queues in ``COATI_QUEUE["QUEUES"]`` too.
    """
    from django.conf import settings

    tasks = getattr(settings, "TASKS", None)
    found: list[str] = []
    if not isinstance(tasks, dict):
        return found
    for params in tasks.values():
        if not isinstance(params, dict) or params.get("BACKEND") != COATI_TASK_BACKEND:
            continue
        for name in params.get("QUEUES") or ():
            if isinstance(name, str) and 0 < len(name) <= 64 and name not in found:
                found.append(name)
    return found


_cached: QueueSettings | None = None


def get_settings() -> QueueSettings:
    global _cached
    if _cached is None:
        _cached = QueueSettings.from_django()
    return _cached


def reset_settings(**_: Any) -> None:
    global _cached
    _cached = None


def documented_settings() -> list[tuple[str, Any, str | None, str]]:
    """(key, default, env var, description) rows for docs and ``queuestats``."""
    return [(f.name, f.default, f.metadata["env"], f.metadata["doc"]) for f in fields(QueueSettings)]
