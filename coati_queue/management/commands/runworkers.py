"""``manage.py runworkers``: N worker processes of M threads on the selected backend."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import argparse
from argparse import ArgumentTypeError

from django.core.management.base import BaseCommand, CommandError

from coati_queue.conf import get_settings
from coati_queue.worker import SUPERVISOR_STOP


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def queue_list(text: str) -> list[str]:
    queues = [q.strip() for q in text.split(",") if q.strip()]
    if not queues:
        raise ArgumentTypeError("name at least one queue, e.g. high,default,low")
    return queues


class Command(BaseCommand):
    help = ("Run background workers for the selected backend. Queues are consumed in the "
            "order given (highest priority first).")

    def add_arguments(self, parser):
        parser.add_argument("--processes", type=positive_int, default=None,
                            help="worker processes (default: COATI_QUEUE WORKER_PROCESSES or CPUs)")
        parser.add_argument("--threads", type=positive_int, default=None,
                            help="threads per process (default: COATI_QUEUE WORKER_THREADS)")
        parser.add_argument("--queues", type=queue_list, default=None,
                            help="comma-separated queues, highest priority first (default: all)")
        parser.add_argument("--burst", action="store_true",
                            help="exit when the queues are empty (nothing queued, delayed or running)")
        parser.add_argument("--backend", choices=["huey", "dramatiq"], default=None,
                            help="force a backend instead of COATI_QUEUE['BACKEND']")
        parser.add_argument("--worker-type", choices=["thread", "greenlet"], default="thread",
                            help="Huey worker type inside each process (default thread)")
        parser.add_argument("--poll-ms", type=positive_int, default=None,
                            help="idle polling interval in milliseconds")
        # Set by the supervisor on its children: repeated SIGTERM/SIGINT mean one stop.
        parser.add_argument("--supervised", action="store_true", help=argparse.SUPPRESS)

    def handle(self, *args, **options):
        from coati_queue.selection import get_queue_driver

        settings = get_settings()
        processes = options["processes"] or settings.WORKER_PROCESSES or os.cpu_count() or 1
        threads = options["threads"] or settings.WORKER_THREADS
        queues = options["queues"] or list(settings.QUEUES)
        try:
            driver = get_queue_driver(options["backend"])
        except Exception as exc:
            raise CommandError(f"Cannot start workers: {exc}") from exc
        if driver.runs_in_caller:
            raise CommandError("The queue is disabled (QUEUE_ENABLED=0 or BACKEND='immediate'): "
                               "tasks run in the caller and there is nothing for workers to do.")
        if processes > 1:
            return self._supervise(processes, driver.name, options, queues, threads)
        from coati_queue.worker import WorkerProcess

        try:
            worker = WorkerProcess(driver, queues, threads, burst=options["burst"],
                                   worker_type=options["worker_type"], poll_ms=options["poll_ms"],
                                   supervised=options["supervised"])
        except ValueError as exc:
            raise CommandError(str(exc)) from exc
        if options["verbosity"] >= 1:
            self.stderr.write(f"runworkers: {driver.name} ({driver.reason}), queues "
                              f"{','.join(queues)}, {threads} thread(s), pid {os.getpid()}")
        code = worker.run()
        if code:
            sys.exit(code)

    def _supervise(self, processes, backend, options, queues, threads):
        """Start one child per process and pass signals on; exit with the worst status.

        A first SIGTERM/SIGINT is passed on as SIGUSR1 (graceful: children finish
        in-flight tasks); a second one as SIGQUIT (children exit at once, their
        in-flight work is given back by the broker). Children ignore SIGTERM and
        SIGINT, which reach them too when the whole process group is signalled.
        """
        command = [sys.executable, "-m", "django", "runworkers", "--processes", "1",
                   "--threads", str(threads), "--queues", ",".join(queues),
                   "--backend", backend, "--worker-type", options["worker_type"],
                   "--verbosity", str(options["verbosity"]), "--skip-checks", "--supervised"]
        if options["burst"]:
            command.append("--burst")
        if options["poll_ms"]:
            command += ["--poll-ms", str(options["poll_ms"])]
        if options.get("settings"):
            command += ["--settings", options["settings"]]
        env = dict(os.environ)
        env.setdefault("PYTHONPATH", os.getcwd())
        children = [subprocess.Popen(command, env=env) for _ in range(processes)]
        received = []

        def forward(signum, frame):
            received.append(signum)
            passed_on = SUPERVISOR_STOP if len(received) == 1 else signal.SIGQUIT
            for child in children:
                if child.poll() is None:
                    child.send_signal(passed_on)

        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, forward)
        while any(child.poll() is None for child in children):
            time.sleep(0.1)
        worst = max(child.returncode for child in children)
        if worst:
            sys.exit(worst if worst > 0 else 1)
