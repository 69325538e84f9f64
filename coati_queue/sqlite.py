"""SQLite as ``startproject`` sets it up, made fit for many worker processes.

Django's default SQLite settings (a rollback journal, a 5 s busy timeout, deferred
transactions) suit one process. ``runworkers`` runs several processes of several
threads writing to the one file, where they fail with "database is locked": a
reader blocks writers, and a deferred transaction that reads and then writes fails
at once whatever the timeout. So, for the worker processes only:

* the database file of coati's records is switched to WAL when ``runworkers``
  starts (the journal mode belongs to the file: one switch serves every process,
  the web process included, and readers then never block writers);
* their SQLite connections get a 30 s busy timeout and ``BEGIN IMMEDIATE``
  transactions (the write lock is taken, or waited for, at the start);
* coati's own writes that still meet a lock are retried with backoff
  (:func:`retry_locked`) instead of failing.

What a project sets itself is kept: a ``journal_mode`` in ``init_command``, a
``timeout``, a ``transaction_mode``. The system check ``coati_queue.W001`` names
the cases this module cannot fix (:func:`unfixable_reason`).
"""

from __future__ import annotations

import logging
import random
import time
from typing import Any, Callable, TypeVar

from django.db import DEFAULT_DB_ALIAS, OperationalError, connections

logger = logging.getLogger("coati_queue.sqlite")

T = TypeVar("T")

#: Busy timeout of worker processes' SQLite connections (milliseconds), unless
#: ``OPTIONS["timeout"]`` says otherwise.
WORKER_BUSY_TIMEOUT_MS = 30_000
#: How long :func:`retry_locked` keeps trying by default, in seconds.
LOCK_PATIENCE = 60.0
#: First and largest pause between two tries (seconds; each pause is jittered).
FIRST_PAUSE, LONGEST_PAUSE = 0.01, 1.0
#: A lock that lasts this long is worth a WARNING (shorter ones are logged at DEBUG).
WARN_AFTER = 5.0


def is_locked(exc: BaseException) -> bool:
    """SQLite's "database is locked" (or table/schema locked): another writer holds it."""
    return isinstance(exc, OperationalError) and "is locked" in str(exc)


def retry_locked(func: Callable[..., T], *args: Any, what: str, using: str | None = None,
                 patience: float = LOCK_PATIENCE, **kwargs: Any) -> T:
    """``func(*args, **kwargs)``, called again after a growing, jittered pause while
    SQLite reports a lock, for up to ``patience`` seconds; then the error is raised.

    Inside a transaction of the caller (on ``using``) the error is raised at once: the
    failed statement broke that transaction, and only its owner can start it again.
    """
    alias = using or _records_alias()
    started = time.monotonic()
    pause, tries, warned = FIRST_PAUSE, 0, False
    while True:
        in_transaction = connections[alias].in_atomic_block
        try:
            return func(*args, **kwargs)
        except OperationalError as exc:
            waited = time.monotonic() - started
            if not is_locked(exc) or in_transaction or waited + pause > patience:
                raise
            tries += 1
            if waited >= WARN_AFTER and not warned:
                warned = True
                logger.warning("%s: the database has been locked for %.1f s; still trying "
                               "(another process holds a long write transaction?)", what,
                               waited)
            else:
                logger.debug("%s: database is locked (try %d); trying again", what, tries)
        time.sleep(random.uniform(pause / 2, pause))
        pause = min(pause * 2, LONGEST_PAUSE)


def _records_alias() -> str:
    from django.db import router

    from .models import TaskResult

    return router.db_for_write(TaskResult) or DEFAULT_DB_ALIAS


def _options(connection: Any) -> dict[str, Any]:
    return connection.settings_dict.get("OPTIONS") or {}


def _chosen_journal_mode(connection_settings: dict[str, Any]) -> bool:
    init = (connection_settings.get("OPTIONS") or {}).get("init_command", "") or ""
    return "journal_mode" in init.lower()


def tune_worker_connection(sender: Any, connection: Any, **kwargs: Any) -> None:
    """``connection_created`` receiver of worker processes: a long busy timeout and
    ``BEGIN IMMEDIATE``, unless the project's ``OPTIONS`` set them."""
    if connection.vendor != "sqlite":
        return
    options = _options(connection)
    if "timeout" not in options:
        connection.connection.execute(f"PRAGMA busy_timeout = {WORKER_BUSY_TIMEOUT_MS}")
    if "transaction_mode" not in options and hasattr(connection, "transaction_mode"):
        connection.transaction_mode = "IMMEDIATE"


def prepare_worker_databases() -> None:
    """At ``runworkers`` start: tune this process's (and its future children's) SQLite
    connections, and switch the file of coati's records to WAL."""
    from django.db.backends.signals import connection_created

    connection_created.connect(tune_worker_connection, weak=False,
                               dispatch_uid="coati_queue_tune_sqlite")
    connections.close_all()  # connections opened before now get the settings too
    try:
        switch_to_wal(_records_alias())
    finally:
        connections.close_all()  # nothing open when the supervisor forks


def switch_to_wal(alias: str) -> str | None:
    """WAL for a file database whose settings choose no journal mode; returns the
    journal mode the file has afterwards (None: not a SQLite file, or not checked)."""
    connection = connections[alias]
    if connection.vendor != "sqlite" or _chosen_journal_mode(connection.settings_dict):
        return None  # not SQLite, or the project chose its journal mode itself
    if unfixable_reason(connection.settings_dict):
        return None  # in memory

    def switch() -> str:
        with connection.cursor() as cursor:
            cursor.execute("PRAGMA journal_mode")
            if str(cursor.fetchone()[0]).lower() == "wal":
                return "wal"
            cursor.execute("PRAGMA journal_mode = WAL")
            return str(cursor.fetchone()[0]).lower()

    try:
        mode = retry_locked(switch, what="Switching SQLite to WAL", using=alias)
    except OperationalError as exc:
        logger.warning("Could not switch the SQLite database %s to WAL (%s); workers will "
                       "retry writes that meet a lock.", connection.settings_dict["NAME"], exc)
        return None
    if mode != "wal":
        logger.warning("The SQLite database %s stays in journal mode %r (its file system may "
                       "not support WAL); workers will retry writes that meet a lock.",
                       connection.settings_dict["NAME"], mode)
    else:
        logger.debug("SQLite database %s is in WAL mode.", connection.settings_dict["NAME"])
    return mode


def unfixable_reason(connection_settings: dict[str, Any]) -> str | None:
    """Why coati cannot make this SQLite database fit for workers, or None (it can)."""
    init = ((connection_settings.get("OPTIONS") or {}).get("init_command", "") or "").lower()
    compact = init.replace(" ", "").replace("'", "").replace('"', "")
    if "journal_mode" in init and "journal_mode=wal" not in compact:
        return "its OPTIONS['init_command'] sets a journal mode other than WAL"
    name = str(connection_settings.get("NAME") or "")
    if name in ("", ":memory:") or "mode=memory" in name:
        return "it is an in-memory database, which worker processes cannot share"
    return None
