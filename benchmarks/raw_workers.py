"""Plain Dramatiq and Huey tasks the benchmarks compare coati_queue against.

No coati_queue code runs here: a plain ``@dramatiq.actor`` on a ``RedisBroker``
(default middleware) and plain Huey tasks on ``RedisHuey`` and ``FileHuey``
(default pickle serializer, Huey's own ``FileStorage``). They are run by the
stock CLIs, started by ``benchmarks/throughput.py`` / ``benchmarks/payroll.py``::

    dramatiq benchmarks.raw_workers --processes 2 --threads 8
    huey_consumer benchmarks.raw_workers.redis_huey -k thread -w 8   # x2 processes
    huey_consumer benchmarks.raw_workers.file_huey -k thread -w 8    # x2 processes

Every task reports to Redis in ONE pipelined round trip: ``INCR`` a counter,
``SETNX`` the time of the first task, ``SET`` the time of the latest one and,
when the caller passed ``sent_at``, ``RPUSH`` the enqueue-to-start latency. The
harness polls the counter to know when a drain is over.

Environment: ``BENCH_REDIS_URL`` (broker, RedisHuey and counters),
``BENCH_FILEHUEY_PATH`` (FileHuey directory), ``BENCH_KEY`` (counter key prefix).
"""

from __future__ import annotations

import os
import tempfile
import threading
import time

import dramatiq
import redis
from dramatiq.brokers.redis import RedisBroker
from huey import FileHuey, RedisHuey

REDIS_URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")
FILEHUEY_PATH = os.environ.get("BENCH_FILEHUEY_PATH",
                               os.path.join(tempfile.gettempdir(), "coati_bench_filehuey"))
KEY = os.environ.get("BENCH_KEY", "bench")

counters = redis.Redis.from_url(REDIS_URL)


def report(sent_at: float | None = None, started: float | None = None) -> None:
    """Count one finished task (one Redis round trip)."""
    now = time.time()
    pipe = counters.pipeline(transaction=False)
    pipe.incr(f"{KEY}:count")
    pipe.setnx(f"{KEY}:first", started or now)
    pipe.set(f"{KEY}:last", now)
    if sent_at is not None:
        pipe.rpush(f"{KEY}:latency", (started or now) - sent_at)
    pipe.execute()


# -- Django, only for the payroll tasks --------------------------------------------------
_django_lock = threading.Lock()
_django_ready = False


def _django() -> None:
    global _django_ready
    if not _django_ready:
        with _django_lock:
            if not _django_ready:
                os.environ.setdefault("DJANGO_SETTINGS_MODULE", "benchmarks.bench_settings")
                import django

                django.setup()
                _django_ready = True


def _payroll_one(employee_id: str, planilla_id: str, inicio: str, fin: str) -> None:
    """One employee, no tracking: exactly what a hand-written task would do."""
    _django()
    from example_project.payroll.services import calculate_and_store

    try:
        calculate_and_store(employee_id, planilla_id, inicio, fin)
    finally:
        report()


def _noop(sent_at: float | None = None) -> None:
    started = time.time()
    report(sent_at, started)


# -- Dramatiq -----------------------------------------------------------------------------
broker = RedisBroker(url=REDIS_URL)
dramatiq.set_broker(broker)


@dramatiq.actor(max_retries=0)
def noop(sent_at: float | None = None) -> None:
    _noop(sent_at)


@dramatiq.actor(max_retries=0)
def payroll_employee(employee_id: str, planilla_id: str, inicio: str, fin: str) -> None:
    _payroll_one(employee_id, planilla_id, inicio, fin)


# -- Huey ---------------------------------------------------------------------------------
redis_huey = RedisHuey("rawbench", url=REDIS_URL)
file_huey = FileHuey("rawbench", path=FILEHUEY_PATH)

redis_huey_noop = redis_huey.task(name="noop")(_noop)
file_huey_noop = file_huey.task(name="noop")(_noop)
file_huey_payroll = file_huey.task(name="payroll_employee")(_payroll_one)
