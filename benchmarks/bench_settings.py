"""Django settings of the benchmarks: the test settings on a throw-away database.

``tests.settings`` already has everything the benchmarks need (coati_queue, the
example payroll app with its ``COATI_QUEUE["PAYROLL"]`` hooks, and
``tests.testapp`` with the ``tests.noop`` task). Only the database moves, to
the file named by ``COATI_BENCH_DB`` (set by ``benchmarks/throughput.py`` and
``benchmarks/payroll.py`` to a fresh temporary file), with the same SQLite
options as the project (WAL, synchronous=NORMAL, IMMEDIATE, 30 s timeout), or
to the PostgreSQL database ``COATI_BENCH_DATABASE_URL`` names (``payroll.py
--db postgres``).

Workers started by the harness inherit ``DJANGO_SETTINGS_MODULE`` and these
variables through their environment, so they use the same database.
"""

import os
import tempfile

from tests.settings import *  # noqa: F401,F403
from example_project.database import database_settings
from tests.settings import LOGGING

BENCH_DB = os.environ.get("COATI_BENCH_DB") or os.path.join(tempfile.gettempdir(),
                                                            "coati_bench.sqlite3")
# ``--db postgres``: COATI_BENCH_DATABASE_URL names the benchmark's PostgreSQL database.
DATABASES = {"default": database_settings(os.environ.get("COATI_BENCH_DATABASE_URL"), BENCH_DB)}
DATABASES["default"]["TEST"] = {"NAME": DATABASES["default"]["NAME"]}

# INFO lines of every worker start would only clutter the harness output.
LOGGING = dict(LOGGING, loggers={"coati_queue": {"handlers": ["console"], "level": "WARNING"}})
