"""``manage.py runworkers``: a supervisor and N worker processes of M threads."""

from __future__ import annotations

import logging
import os
import sys
from argparse import ArgumentTypeError
from typing import Any

from django.core.management.base import BaseCommand, CommandError

from coati_queue.conf import get_settings

LOG_LEVELS = {0: logging.WARNING, 1: logging.INFO, 2: logging.DEBUG, 3: logging.DEBUG}


def _number(text: str, kind: type, lowest: float, expected: str, too_low: str) -> Any:
    """One argparse type for counts and durations: the error names the bad value."""
    try:
        value = kind(text)
    except ValueError:
        raise ArgumentTypeError(f"expected {expected}, got {text!r}") from None
    if value < lowest:
        raise ArgumentTypeError(too_low.format(value=value))
    return value


def positive_int(text: str) -> int:
    return _number(text, int, 1, "a whole number", "must be at least 1, got {value}")


def non_negative_int(text: str) -> int:
    return _number(text, int, 0, "a whole number", "cannot be negative, got {value} (0: off)")


def non_negative_float(text: str) -> float:
    return _number(text, float, 0, "a number of seconds", "cannot be negative, got {value}")


def queue_list(text: str) -> list[str]:
    queues = [q.strip() for q in text.split(",") if q.strip()]
    if not queues:
        raise ArgumentTypeError("name at least one queue, e.g. high,default,low")
    if len(set(queues)) != len(queues):
        raise ArgumentTypeError(f"a queue is named twice in {text!r}")
    return queues


def worker_type(text: str) -> str:
    if text != "thread":
        raise ArgumentTypeError(
            f"{text!r} is not supported: workers are threads (--threads) inside supervised "
            "processes (--processes); time limits, leases and tracking rely on that")
    return text


class Command(BaseCommand):
    help = ("Run background workers for the selected backend: a supervisor that starts "
            "--processes worker processes of --threads threads, replaces any that dies, and "
            "enforces hard time limits. Queues are consumed in the order given (first first).")

    def add_arguments(self, parser):
        parser.add_argument("--processes", type=positive_int, default=None,
                            help="worker processes (default: COATI_QUEUE WORKER_PROCESSES or CPUs)")
        parser.add_argument("--threads", type=positive_int, default=None,
                            help="threads per process (default: COATI_QUEUE WORKER_THREADS)")
        parser.add_argument("--queues", type=queue_list, default=None,
                            help="comma-separated queues, consumed in this order: the first "
                                 "before the second... (default: all, in QUEUES order)")
        parser.add_argument("--burst", action="store_true",
                            help="exit when the queues are empty (nothing queued, delayed or running)")
        parser.add_argument("--backend", choices=["huey", "dramatiq"], default=None,
                            help="force a backend instead of COATI_QUEUE['BACKEND']")
        parser.add_argument("--poll-ms", type=positive_int, default=None,
                            help="idle polling interval in milliseconds")
        parser.add_argument("--max-tasks-per-child", type=non_negative_int, default=None,
                            metavar="N", help="replace a worker process after it ran N tasks "
                            "(default: COATI_QUEUE WORKER_MAX_TASKS_PER_CHILD; 0: never)")
        parser.add_argument("--max-memory-per-child", type=non_negative_int, default=None,
                            metavar="MiB", help="replace a worker process, after its current "
                            "tasks, once its resident memory is above MiB (default: COATI_QUEUE "
                            "WORKER_MAX_MEMORY_PER_CHILD; 0: never)")
        parser.add_argument("--shutdown-timeout", type=non_negative_float, default=None,
                            metavar="S", help="seconds a graceful stop waits for in-flight "
                            "tasks; then they are given back and run again later (default: "
                            "COATI_QUEUE WORKER_SHUTDOWN_TIMEOUT; none: until they end)")
        parser.add_argument("--verbose", action="store_true",
                            help="log debug messages (same as -v 2; -v 3 adds Dramatiq's and "
                                 "Huey's)")
        # Accepted so existing command lines keep working; nothing else is real.
        parser.add_argument("--worker-type", type=worker_type, default="thread",
                            help="only 'thread' (the default)")

    def handle(self, *args, **options):
        from coati_queue.selection import get_queue_driver
        from coati_queue.supervisor import CrashLoop, Supervisor
        from coati_queue.worker import WorkerOptions

        settings = get_settings()
        verbosity = max(options["verbosity"], 2 if options["verbose"] else 0)
        configure_logging(verbosity)
        processes = options["processes"] or settings.WORKER_PROCESSES or os.cpu_count() or 1
        threads = options["threads"] or settings.WORKER_THREADS
        queues = options["queues"] or list(settings.QUEUES)
        unknown = [q for q in queues if q not in settings.QUEUES]
        if unknown:
            raise CommandError(f"Unknown queue(s) {', '.join(unknown)}; COATI_QUEUE['QUEUES'] "
                               f"is {settings.QUEUES}.")
        max_tasks = _default(options["max_tasks_per_child"], settings.WORKER_MAX_TASKS_PER_CHILD)
        max_memory = _default(options["max_memory_per_child"],
                              settings.WORKER_MAX_MEMORY_PER_CHILD)
        if max_memory and not os.path.exists(f"/proc/{os.getpid()}/statm"):
            raise CommandError("--max-memory-per-child reads /proc (Linux); this system has "
                               "none.")
        shutdown_timeout = _default(options["shutdown_timeout"], settings.WORKER_SHUTDOWN_TIMEOUT)
        try:
            driver = get_queue_driver(options["backend"])
        except Exception as exc:
            raise CommandError(f"Cannot start workers: {exc}") from exc
        if driver.runs_in_caller:
            raise CommandError("The queue is disabled (QUEUE_ENABLED=0 or BACKEND='immediate'): "
                               "tasks run in the caller and there is nothing for workers to do.")
        if verbosity >= 1:
            self.stderr.write(f"runworkers: {driver.name} ({driver.reason}), queues "
                              f"{','.join(queues)}, {processes} process(es) x {threads} "
                              f"thread(s), supervisor pid {os.getpid()}")
        supervisor = Supervisor(
            driver, WorkerOptions(driver.name, queues, threads, burst=options["burst"],
                                  poll_ms=options["poll_ms"], max_tasks=max_tasks),
            processes=processes, max_memory_mib=max_memory, shutdown_timeout=shutdown_timeout)
        try:
            code = supervisor.run()
        except CrashLoop as exc:
            raise CommandError(f"runworkers stopped: {exc}") from None
        if code:
            sys.exit(code)


def _default(given, setting):
    return setting if given is None else given


def configure_logging(verbosity: int) -> None:
    """``-v 0`` warnings, ``1`` info, ``2`` (``--verbose``) debug, ``3`` debug from
    Dramatiq and Huey too. A logger no configuration handles gets one on stderr."""
    level = LOG_LEVELS.get(verbosity, logging.DEBUG)
    names = ["coati_queue"] + (["dramatiq", "huey"] if verbosity >= 3 else [])
    for name in names:
        logger = logging.getLogger(name)
        logger.setLevel(level)
        if not logger.hasHandlers() or not _handles(logger, level):
            handler = logging.StreamHandler(sys.stderr)
            handler.setFormatter(logging.Formatter(
                "%(asctime)s %(levelname)s %(name)s [%(process)d] %(message)s"))
            logger.addHandler(handler)
            logger.propagate = False


def _handles(logger: logging.Logger, level: int) -> bool:
    """Some handler on the way up shows records of ``level`` (the last resort does not)."""
    current: logging.Logger | None = logger
    while current is not None:
        if any(handler.level <= level for handler in current.handlers):
            return True
        current = current.parent if current.propagate else None
    return False
