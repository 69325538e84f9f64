"""The ``default`` database from a ``DATABASE_URL``, or the SQLite file of the demo.

Shared by the example project's, the tests' and the benchmarks' settings, so the
SQLite options live in one place. The callers read the environment; this only
turns a URL (or its absence) into a ``DATABASES["default"]`` dict.
"""

from __future__ import annotations

import os
from typing import Any

# SQLite tuned for several worker processes writing at once: WAL lets readers
# proceed during writes, IMMEDIATE takes the write lock at BEGIN (no deadlock
# on lock upgrade) and the 30 s timeout waits for the lock instead of failing.
SQLITE_OPTIONS = {
    "timeout": 30,
    "transaction_mode": "IMMEDIATE",
    "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
}


def database_settings(url: str | None, sqlite_path: str | os.PathLike[str]) -> dict[str, Any]:
    """``url`` parsed by dj-database-url (PostgreSQL, SQLite...), else SQLite at ``sqlite_path``.

    Any SQLite database gets ``SQLITE_OPTIONS``; other engines keep what the URL says.
    """
    if not url:
        return {"ENGINE": "django.db.backends.sqlite3", "NAME": str(sqlite_path),
                "OPTIONS": dict(SQLITE_OPTIONS)}
    import dj_database_url

    database: dict[str, Any] = dict(dj_database_url.parse(url))
    if database["ENGINE"] == "django.db.backends.sqlite3":
        database["OPTIONS"] = {**SQLITE_OPTIONS, **database.get("OPTIONS", {})}
    return database
