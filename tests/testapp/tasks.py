"""Tasks the contract suite runs on every backend (imported by autodiscovery)."""

import time

from django.db import connection

import coati_queue
from coati_queue import Retry

from .models import Mark


@coati_queue.task(name="tests.add")
def add(a, b):
    return a + b


@coati_queue.task(name="tests.noop")
def noop():
    return None


@coati_queue.task(name="tests.mark", queue="default")
def mark(label, queue_name="default"):
    """Leaves a row so tests can see what ran, in which order, from any process."""
    Mark.objects.create(label=label, queue=queue_name, started=time.time())
    return label


@coati_queue.task(name="tests.always_fails", max_retries=2, min_backoff=50, max_backoff=200)
def always_fails():
    raise RuntimeError("boom: always fails")


@coati_queue.task(name="tests.fails_then_succeeds", max_retries=3, min_backoff=50, max_backoff=100)
def fails_then_succeeds(label):
    attempts = Mark.objects.filter(label=label).count()
    Mark.objects.create(label=label, queue="retry", started=time.time())
    if attempts < 2:
        raise Retry(f"attempt {attempts + 1} not yet", delay=0.05)
    return attempts + 1


@coati_queue.task(name="tests.returns_object")
def returns_object():
    return object()


@coati_queue.task(name="tests.sees_row")
def sees_row(label):
    """True when the row committed by the sender is visible to the task."""
    return Mark.objects.filter(label=label).exists()


@coati_queue.task(name="tests.db_vendor")
def db_vendor():
    return connection.vendor


@coati_queue.task(name="tests.sleep", max_retries=0)
def sleep(seconds):
    """Stays in flight for a while (graceful-shutdown tests)."""
    time.sleep(seconds)
    return seconds


# -- payroll batch callbacks (tests/test_payroll.py) ---------------------------------------
def _payroll_mark(kind, batch_id):
    Mark.objects.create(label=f"payroll:{kind}:{batch_id}", queue="callbacks",
                        started=time.time())


@coati_queue.task(name="tests.payroll_on_complete")
def payroll_on_complete(batch_id):
    _payroll_mark("complete", batch_id)


@coati_queue.task(name="tests.payroll_on_success")
def payroll_on_success(batch_id):
    _payroll_mark("success", batch_id)


@coati_queue.task(name="tests.payroll_on_failure")
def payroll_on_failure(batch_id):
    _payroll_mark("failure", batch_id)


def payroll_plain_complete(batch_id):
    """A plain function (not a task): a callback given as a dotted path."""
    _payroll_mark("complete", batch_id)


def payroll_plain_success(batch_id):
    _payroll_mark("success", batch_id)


def payroll_plain_failure(batch_id):
    _payroll_mark("failure", batch_id)


# -- the fault battery (tests/test_faults.py) ----------------------------------------------
@coati_queue.task(name="tests.fault_kill_self", max_retries=5)
def fault_kill_self(label):
    """SIGKILLs its own worker process on every attempt (after leaving a Mark per run)."""
    import os
    import signal

    Mark.objects.create(label=label, queue="fault", started=time.time())
    os.kill(os.getpid(), signal.SIGKILL)


@coati_queue.task(name="tests.fault_system_exit", max_retries=0)
def fault_system_exit(label):
    Mark.objects.create(label=label, queue="fault", started=time.time())
    raise SystemExit(3)


@coati_queue.task(name="tests.fault_keyboard_interrupt", max_retries=0)
def fault_keyboard_interrupt(label):
    Mark.objects.create(label=label, queue="fault", started=time.time())
    raise KeyboardInterrupt("raised inside a task")


@coati_queue.task(name="tests.fault_slow_once", max_retries=0)
def fault_slow_once(label, seconds):
    """Sleeps ``seconds`` on its first run only (a Mark per run), so a re-run after a
    worker was stopped hard finishes at once."""
    first = not Mark.objects.filter(label=label).exists()
    Mark.objects.create(label=label, queue="fault", started=time.time())
    if first:
        time.sleep(seconds)
    return label


# -- Huey leases (tests/test_huey_leases.py) ------------------------------------------------
@coati_queue.task(name="tests.lease_slow", max_retries=0)
def lease_slow(label, seconds):
    """A Mark per run; sleeps ``seconds`` on the first run only, so the run that
    follows a killed worker finishes at once. Returns how many runs there were."""
    runs = Mark.objects.filter(label=label).count() + 1
    Mark.objects.create(label=label, queue="lease", started=time.time())
    if runs == 1:
        time.sleep(seconds)
    return runs


# -- time limits and the supervisor (tests/test_time_limits.py, tests/test_supervisor.py) ---
def _limits_mark(label, what="run"):
    Mark.objects.create(label=label, queue=what, started=time.time())


@coati_queue.task(name="tests.limits_soft_cleanup", soft_time_limit=300, time_limit=20_000,
                  max_retries=3)
def limits_soft_cleanup(label):
    """Works in small steps until the soft limit; cleans up (a Mark) and re-raises. Its
    retry_on is the default (Exception,): a time limit is still final."""
    _limits_mark(label)
    try:
        while True:
            time.sleep(0.01)
    except coati_queue.SoftTimeLimitExceeded:
        _limits_mark(label, "cleanup")
        raise


@coati_queue.task(name="tests.limits_soft_retried", soft_time_limit=200, time_limit=20_000,
                  max_retries=1, min_backoff=50, max_backoff=100,
                  retry_on=(coati_queue.SoftTimeLimitExceeded,))
def limits_soft_retried(label):
    """Overruns its soft limit on every attempt; its retry_on names the limit."""
    _limits_mark(label)
    while True:
        time.sleep(0.01)


@coati_queue.task(name="tests.limits_ignores_soft", soft_time_limit=200, time_limit=2_000,
                  max_retries=3)
def limits_ignores_soft(label):
    """Catches the soft limit and goes on sleeping: only the hard limit ends it (1.8 s
    after the soft one, so the "soft-ignored" mark is written even on a loaded machine)."""
    _limits_mark(label)
    while True:
        try:
            while True:
                time.sleep(0.01)
        except coati_queue.SoftTimeLimitExceeded:
            _limits_mark(label, "soft-ignored")


@coati_queue.task(name="tests.limits_blocks_in_c", soft_time_limit=200, time_limit=1_000,
                  max_retries=3)
def limits_blocks_in_c(label):
    """Stuck in C code holding the GIL (catastrophic regex backtracking): no Python
    exception can reach it, no other thread of its process runs."""
    import re

    _limits_mark(label)
    return bool(re.fullmatch(r"(a|aa)+b", "a" * 60))


@coati_queue.task(name="tests.limits_hard_retried", soft_time_limit=0, time_limit=700,
                  max_retries=1, min_backoff=50, max_backoff=100,
                  retry_on=(coati_queue.TimeLimitExceeded,))
def limits_hard_retried(label):
    """Sleeps past its hard limit on every attempt (no soft limit); retry_on names it."""
    _limits_mark(label)
    time.sleep(60)


@coati_queue.task(name="tests.limits_default", max_retries=0)
def limits_default(label, seconds):
    """No limits of its own: COATI_QUEUE's apply."""
    _limits_mark(label)
    deadline = time.monotonic() + seconds
    try:
        while time.monotonic() < deadline:
            time.sleep(0.01)
    except coati_queue.SoftTimeLimitExceeded:
        _limits_mark(label, "cleanup")
        raise
    return label


@coati_queue.task(name="tests.limits_no_limits", time_limit=0, soft_time_limit=0,
                  max_retries=0)
def limits_no_limits():
    return "unlimited"


@coati_queue.task(name="tests.limits_pid", max_retries=0)
def limits_pid(label):
    """Which worker process ran it."""
    import os

    _limits_mark(label)
    return os.getpid()


_limits_ballast = []


@coati_queue.task(name="tests.limits_allocate", max_retries=0)
def limits_allocate(mib, hold):
    """Keeps ``mib`` MiB resident in its process (a leak), then stays ``hold`` seconds."""
    import os

    _limits_ballast.append(b"\x01" * (mib * 2 ** 20))
    time.sleep(hold)
    return os.getpid()


@coati_queue.task(name="tests.limits_slow_once", max_retries=0)
def limits_slow_once(label, seconds):
    """Sleeps ``seconds`` on its first run only (a Mark per run)."""
    first = not Mark.objects.filter(label=label).exists()
    _limits_mark(label)
    if first:
        time.sleep(seconds)
    return label
