"""Django settings of the benchmarks: the test settings on a throw-away SQLite file.

``tests.settings`` already has everything the benchmarks need (coati_queue, the
example payroll app with its ``COATI_QUEUE["PAYROLL"]`` hooks, and
``tests.testapp`` with the ``tests.noop`` task). Only the database moves, to
the file named by ``COATI_BENCH_DB`` (set by ``benchmarks/throughput.py`` and
``benchmarks/payroll.py`` to a fresh temporary file), with the same SQLite
options as the project (WAL, synchronous=NORMAL, IMMEDIATE, 30 s timeout).

Workers started by the harness inherit ``DJANGO_SETTINGS_MODULE`` and
``COATI_BENCH_DB`` through their environment, so they use the same file.
"""

import os
import tempfile

from tests.settings import *  # noqa: F401,F403
from tests.settings import DATABASES, LOGGING

BENCH_DB = os.environ.get("COATI_BENCH_DB") or os.path.join(tempfile.gettempdir(),
                                                            "coati_bench.sqlite3")
DATABASES = {"default": dict(DATABASES["default"], NAME=BENCH_DB, TEST={"NAME": BENCH_DB})}
DATABASES["default"]["OPTIONS"] = {
    "timeout": 30,
    "transaction_mode": "IMMEDIATE",
    "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
}

# INFO lines of every worker start would only clutter the harness output.
LOGGING = dict(LOGGING, loggers={"coati_queue": {"handlers": ["console"], "level": "WARNING"}})
