"""System checks: catch bad configuration at ``manage.py check``, not at 3 a.m.

Two kinds, with one rule for when each runs:

* **Configuration** (every ``manage.py`` command, ``check`` included): settings
  that do not parse or import, SQLite that coati cannot switch to WAL, and the Huey
  directory the configuration would use (missing and not creatable, not writable, or
  unsafe).
  They read settings and the file system only.
* **Runtime** (``manage.py check --deploy`` only): Redis reachable, its
  ``maxmemory-policy`` and persistence, a worker heartbeat, unapplied
  migrations. They ask a running system (one Redis connection with a short
  timeout, three small queries), which a plain ``check`` before ``migrate``, a
  developer's ``runserver`` or ``make test`` do not have and should not wait for.

:func:`health_findings` runs every check of both kinds and returns plain data,
for the queue overview and ``queuestats``.
"""

from __future__ import annotations

import datetime
import logging
import os
from typing import Any, Iterable

from django.conf import settings
from django.core.checks import CRITICAL, DEBUG, ERROR, INFO, WARNING, CheckMessage, Error, Info
from django.core.checks import Warning, register
from django.core.exceptions import ImproperlyConfigured
from django.utils.module_loading import import_string

from .redis_url import error_text, mask_redis_url

logger = logging.getLogger("coati_queue")

TAG = "coati_queue"
#: Longest wait for Redis in a check, whatever ``REDIS_TIMEOUT`` says.
CHECK_TIMEOUT = 1.0
LEVEL_NAMES = {DEBUG: "debug", INFO: "info", WARNING: "warning", ERROR: "error",
               CRITICAL: "critical"}


def _queue_settings() -> Any:
    from .conf import get_settings

    try:
        return get_settings()
    except ImproperlyConfigured:
        return None  # reported by check_queue_settings (E001)


def _strict(queue_settings: Any) -> bool:
    return bool(getattr(queue_settings, "STRICT", False))


# -- configuration -----------------------------------------------------------------------------
@register(TAG)
def check_queue_settings(app_configs: Any = None, **kwargs: Any) -> list[CheckMessage]:
    from .conf import get_settings

    try:
        queue_settings = get_settings()
    except ImproperlyConfigured as exc:
        return [Error(str(exc), id="coati_queue.E001")]
    problems: list[CheckMessage] = []
    for key in ("ACTIVE_EMPLOYEES", "CALCULATE_EMPLOYEE"):
        path = queue_settings.PAYROLL.get(key)
        if path:
            try:
                import_string(path)
            except ImportError as exc:
                problems.append(Error(f"COATI_QUEUE['PAYROLL']['{key}'] = {path!r} cannot be "
                                      f"imported: {exc}", id="coati_queue.E002"))
    for path in queue_settings.MIDDLEWARE:
        try:
            import_string(path)
        except ImportError as exc:
            problems.append(Error(f"COATI_QUEUE['MIDDLEWARE'] entry {path!r} cannot be imported: "
                                  f"{exc}", id="coati_queue.E003"))
    problems.extend(sqlite_messages(queue_settings))
    return problems


def sqlite_messages(queue_settings: Any) -> list[CheckMessage]:
    """W001 only where coati cannot fix SQLite itself: ``runworkers`` switches a file
    database to WAL and gives its connections a busy timeout and IMMEDIATE transactions
    (``coati_queue.sqlite``), so Django's default settings need nothing."""
    from django.db import router

    from .models import TaskResult
    from .sqlite import unfixable_reason

    alias = router.db_for_write(TaskResult) or "default"
    database = settings.DATABASES.get(alias, {})
    if not database.get("ENGINE", "").endswith("sqlite3") or queue_settings.BACKEND == "immediate":
        return []
    reason = unfixable_reason(database)
    if reason is None:
        return []
    return [Warning(
        f"SQLite database {alias!r} cannot be switched to WAL: {reason}. Worker processes "
        "writing task records will often wait for, or fail on, 'database is locked'.",
        hint="coati_queue switches a file database to WAL itself when runworkers starts, "
             "unless OPTIONS['init_command'] sets another journal_mode (remove it, or set "
             "'PRAGMA journal_mode=WAL;') or the database is in memory (use a file, or "
             "PostgreSQL).",
        id="coati_queue.W001")]


def _built_huey_path() -> str | None:
    """The directory of the Huey driver this process already runs on, if any."""
    from .selection import _drivers

    for driver in list(_drivers.values()):
        if getattr(driver, "name", None) == "huey" and getattr(driver, "path", None):
            return str(driver.path)
    return None


def _huey_expected(queue_settings: Any, redis_down: bool = False) -> bool:
    """Would this configuration run on Huey files?"""
    if not queue_settings.ENABLED:
        return False
    if queue_settings.BACKEND == "huey":
        return True
    return queue_settings.BACKEND == "auto" and (not queue_settings.REDIS_URL or redis_down)


def _directory_message(path: str, problem: Any, why: str) -> CheckMessage:
    if problem.unsafe:
        return Error(
            f"Huey directory {path} is refused as unsafe: {problem.reason}. {why}",
            hint="Use a directory owned by the user that runs the web process and the workers, "
                 "mode 0700, whose parents only that user or root can write (or that are "
                 "sticky, like /tmp), and set COATI_QUEUE_PATH to it.",
            id="coati_queue.E021")
    return Error(
        f"Huey directory {path} is not usable: {problem.reason}. {why}",
        hint="Create it (mkdir -m 700) as the user that runs the web process and the workers, "
             "or set COATI_QUEUE_PATH to a directory that user owns and can write.",
        id="coati_queue.E020")


def huey_directory_messages(queue_settings: Any, redis_down: bool = False) -> list[CheckMessage]:
    """The Huey directory this process uses, or that the configuration would pick.

    Nothing is created: a missing directory is fine when it can be created
    (the driver makes it, mode 0700, on first use), except the directory of a
    driver already running in this process, which must still exist.
    """
    from .selection import directory_problem, huey_path_candidates

    built = _built_huey_path()
    if built is not None:
        problem = directory_problem(built, create=False)
        if problem is None and not os.path.isdir(built):
            from .selection import DirectoryProblem

            problem = DirectoryProblem("it no longer exists")
        if problem is None:
            return []
        return [_directory_message(built, problem, "This process queues jobs there: jobs "
                                   "sent now fail, and workers cannot take them.")]
    if not _huey_expected(queue_settings, redis_down):
        return []
    refused = []
    for path, label in huey_path_candidates(queue_settings):
        problem = directory_problem(path, create=False)
        if problem is None:
            break
        if label == "COATI_QUEUE_PATH":
            return [_directory_message(path, problem, "Processes would fall back to another "
                                       "directory, and a web process and its workers may "
                                       "then use different ones.")]
        refused.append(f"{path}: {problem.reason}")
    else:
        return [Error("No usable directory for Huey's file storage: "
                      + "; ".join(refused) + ".",
                      hint="Set COATI_QUEUE_PATH to a directory (mode 0700) owned by the user "
                           "that runs the web process and the workers.",
                      id="coati_queue.E020")]
    return []


@register(TAG)
def check_huey_directory(app_configs: Any = None, **kwargs: Any) -> list[CheckMessage]:
    queue_settings = _queue_settings()
    if queue_settings is None:
        return []
    return huey_directory_messages(queue_settings)


# -- runtime: Redis ----------------------------------------------------------------------------
def _redis_expected(queue_settings: Any) -> bool:
    return bool(queue_settings.ENABLED and queue_settings.REDIS_URL
                and queue_settings.BACKEND in ("auto", "dramatiq"))


def redis_messages(queue_settings: Any) -> tuple[list[CheckMessage], bool]:
    """(messages, reachable) for the configured Redis: one connection, short timeouts."""
    if not _redis_expected(queue_settings):
        return [], True
    import redis
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    url = queue_settings.REDIS_URL
    shown = mask_redis_url(url)
    timeout = max(0.05, min(float(queue_settings.REDIS_TIMEOUT), CHECK_TIMEOUT))
    try:
        client = redis.Redis.from_url(url, socket_timeout=timeout,
                                      socket_connect_timeout=timeout, retry=Retry(NoBackoff(), 0))
    except (ValueError, TypeError) as exc:
        return [Warning(f"REDIS_URL {shown} cannot be used: {error_text(exc, url)}",
                        hint="Fix the URL: redis://[:password@]host[:port][/db].",
                        id="coati_queue.W030")], False
    try:
        try:
            client.ping()
        except (redis.RedisError, OSError) as exc:
            fallback = (" BACKEND is 'auto': processes started now run on Huey files instead."
                        if queue_settings.BACKEND == "auto" else
                        " BACKEND is 'dramatiq': sends fail (inside a transaction they wait in "
                        "the outbox) and workers take nothing.")
            return [Warning(f"Redis at {shown} does not answer within {timeout:g} s: "
                            f"{error_text(exc, url)}.{fallback}",
                            hint="Start Redis or fix REDIS_URL (host, port, password); check with "
                                 "redis-cli -u \"$REDIS_URL\" ping.",
                            id="coati_queue.W030")], False
        return _redis_config_messages(client, queue_settings, shown), True
    finally:
        client.close()


def _redis_config_messages(client: Any, queue_settings: Any, shown: str) -> list[CheckMessage]:
    import redis

    messages: list[CheckMessage] = []
    try:
        memory = client.info("memory")
    except redis.RedisError:
        memory = {}
    policy = str(memory.get("maxmemory_policy", "noeviction") or "noeviction")
    if policy != "noeviction":
        limit = int(memory.get("maxmemory", 0) or 0)
        limit_text = (f"maxmemory is {limit} bytes" if limit else
                      "maxmemory is 0 today (no limit), but a limit set later, or by a managed "
                      "Redis, starts the evictions")
        text = (f"Redis at {shown} has maxmemory-policy {policy} ({limit_text}): under memory "
                "pressure it silently deletes keys, queued jobs and acknowledgement sets "
                "included; the reconciler re-sends lost jobs only after RESEND_PENDING_AFTER.")
        hint = ("Run CONFIG SET maxmemory-policy noeviction (and put maxmemory-policy noeviction "
                "in redis.conf, or your provider's parameter group): a full Redis then refuses "
                "writes, which coati_queue reports, instead of losing jobs.")
        if _strict(queue_settings):
            messages.append(Error(text, hint=hint, id="coati_queue.E031"))
        else:
            messages.append(Warning(text, hint=hint, id="coati_queue.W031"))
    if queue_settings.PAYROLL.get("ACTIVE_EMPLOYEES"):
        persistence = _redis_persistence(client)
        if persistence is False:
            messages.append(Info(
                f"Redis at {shown} keeps no data on disk (no AOF, no RDB save points): a "
                "restart loses every queued payroll chunk. Nothing is lost for good (the "
                "reconciler re-sends pending records from the database), but recovery waits "
                "RESEND_PENDING_AFTER seconds.",
                hint="Enable the AOF (appendonly yes, appendfsync everysec) or RDB save points "
                     "(save 60 1000) for faster recovery after a Redis restart.",
                id="coati_queue.I032"))
    return messages


def _redis_persistence(client: Any) -> bool | None:
    """True/False, or None when Redis does not say (CONFIG disabled on managed Redis)."""
    import redis

    try:
        if int(client.info("persistence").get("aof_enabled", 0) or 0):
            return True
        save = client.config_get("save").get("save", "")
    except redis.RedisError:
        return None
    return bool(str(save or "").strip())


# -- runtime: database -------------------------------------------------------------------------
def _alias(model: Any, databases: Iterable[str] | None) -> str | None:
    """The database of ``model``; None when the caller excluded it (``--database``)."""
    from django.db import router

    alias = router.db_for_read(model) or "default"
    if databases is not None and alias not in databases:
        return None
    return alias


#: Databases where every coati_queue migration was found applied (they stay applied).
_migrated: set[str] = set()


def unapplied_migrations(alias: str) -> list[str]:
    """coati_queue migrations not applied to database ``alias``.

    A SQLite file that does not exist is not created by looking: all are unapplied.
    """
    from django.db import connections
    from django.db.migrations.executor import MigrationExecutor
    from django.db.migrations.loader import MigrationLoader

    connection = connections[alias]
    name = str(connection.settings_dict.get("NAME") or "")
    if connection.vendor == "sqlite" and not connection.is_in_memory_db() \
            and not os.path.exists(name):
        graph = MigrationLoader(None, ignore_no_migrations=True).graph
        return [migration for app, migration in sorted(graph.nodes)
                if app == "coati_queue"]
    executor = MigrationExecutor(connection)
    targets = executor.loader.graph.leaf_nodes()
    return [migration.name for migration, _backwards in executor.migration_plan(targets)
            if migration.app_label == "coati_queue"]


def migration_messages(databases: Iterable[str] | None) -> tuple[list[CheckMessage], bool]:
    """(messages, tables ready)."""
    from django.db import DatabaseError

    from .models import WorkerHeartbeat

    alias = _alias(WorkerHeartbeat, databases)
    if alias is None:
        return [], False
    if alias in _migrated:
        return [], True
    try:
        missing = unapplied_migrations(alias)
    except DatabaseError as exc:
        logger.debug("coati_queue checks: migrations of %s unknown: %s", alias, exc)
        return [], False
    if not missing:
        _migrated.add(alias)
        return [], True
    return [Warning(
        f"{len(missing)} coati_queue migration(s) not applied to database {alias!r}: "
        f"{', '.join(missing)}. Task records cannot be written as this code expects.",
        hint=f"Run python manage.py migrate coati_queue --database {alias}.",
        id="coati_queue.W050")], False


def heartbeat_messages(queue_settings: Any, databases: Iterable[str] | None,
                       now: datetime.datetime | None = None) -> list[CheckMessage]:
    """No worker alive: nothing is processed. Only on a real backend with the tables."""
    from django.db import DatabaseError
    from django.utils import timezone

    from .models import WorkerHeartbeat

    if not queue_settings.ENABLED or queue_settings.BACKEND == "immediate":
        return []
    alias = _alias(WorkerHeartbeat, databases)
    if alias is None:
        return []
    now = now or timezone.now()
    lost_after = datetime.timedelta(seconds=queue_settings.WORKER_LOST_AFTER)
    try:
        beats = WorkerHeartbeat.objects.using(alias)
        if beats.filter(stopped_at__isnull=True, last_seen__gte=now - lost_after).exists():
            return []
        last = beats.order_by("-last_seen").values_list("last_seen", "stopped_at").first()
    except DatabaseError as exc:
        logger.debug("coati_queue checks: heartbeats unreadable: %s", exc)
        return []
    if last is None:
        seen = "no worker has ever sent one"
    else:
        seen = (f"the last heartbeat was {int((now - last[0]).total_seconds())} s ago"
                + (", from a worker that stopped" if last[1] else ""))
    return [Warning(
        f"No worker heartbeat within WORKER_LOST_AFTER ({queue_settings.WORKER_LOST_AFTER:g} s): "
        f"{seen}. Queued tasks and payroll batches are not processed.",
        hint="Start workers (python manage.py runworkers) under a supervisor (systemd, "
             "Kubernetes) that restarts them, and check their logs.",
        id="coati_queue.W040")]


@register(TAG, deploy=True)
def check_runtime(app_configs: Any = None, databases: Iterable[str] | None = None,
                  **kwargs: Any) -> list[CheckMessage]:
    """Redis, workers and migrations: ``manage.py check --deploy`` (see module docstring).

    ``databases``: as Django passes it (``--database``); when it is None (a plain
    ``check --deploy``) coati's own database is asked.
    """
    queue_settings = _queue_settings()
    if queue_settings is None:
        return []
    messages, reachable = redis_messages(queue_settings)
    if not reachable and queue_settings.BACKEND == "auto" and _built_huey_path() is None:
        # auto falls back to Huey while Redis is down: that directory must work too
        # (a driver already built in this process is checked by check_huey_directory).
        messages += huey_directory_messages(queue_settings, redis_down=True)
    migrations, tables_ready = migration_messages(databases)
    messages += migrations
    if tables_ready:
        messages += heartbeat_messages(queue_settings, databases)
    return messages


# -- the same findings as data -----------------------------------------------------------------
def as_finding(message: CheckMessage) -> dict[str, str]:
    return {"id": message.id or "", "level": LEVEL_NAMES.get(message.level, str(message.level)),
            "message": str(message.msg), "hint": str(message.hint or "")}


def health_findings(databases: Iterable[str] | None = None) -> list[dict[str, str]]:
    """Every coati_queue check (configuration and runtime) as plain data, worst first.

    ``[{"id": "coati_queue.W030", "level": "warning", "message": ..., "hint": ...}]``:
    what ``manage.py check --deploy`` reports for coati_queue, for the queue
    overview and ``queuestats``. Bounded: one Redis connection (timeouts of at
    most ``CHECK_TIMEOUT``), a few ``lstat`` calls and three small queries.
    """
    messages: list[CheckMessage] = []
    for check in (check_queue_settings, check_huey_directory, check_runtime):
        try:
            messages += check(None, databases=databases)
        except Exception as exc:  # noqa: BLE001 - a health page must not 500 on a check
            logger.warning("coati_queue check %s failed: %s", check.__name__, exc)
    messages.sort(key=lambda m: -m.level)
    return [as_finding(message) for message in messages]
