"""The ``runworkers`` parent: N forked worker processes, watched and replaced.

Like Celery's prefork pool or Gunicorn's arbiter, the parent runs no task. It

* forks ``--processes`` children (one included), each a ``WorkerProcess`` with a
  pipe back to the parent (``coati_queue.time_limits``), and replaces any that dies,
  at once, or with a growing delay while children die before they could start; after
  ``CRASH_LOOP_LIMIT`` such failures in a row it stops and exits non-zero;
* enforces **hard time limits**: at a job's deadline it writes the task's record
  (failed, or pending for a retry), SIGKILLs the child, gives the records of the
  child's other jobs back to ``pending`` (their messages return through the
  broker's leases) and starts a new child;
* **recycles** a child after ``--max-tasks-per-child`` tasks or above
  ``--max-memory-per-child`` MiB of resident memory: a graceful stop, the child finishes
  what it runs and exits 0, a new one starts;
* passes stops on: a first SIGTERM/SIGINT as ``SUPERVISOR_STOP`` (SIGUSR1: graceful;
  children ignore SIGTERM/SIGINT, which reach them too when the whole process group is
  signalled), a second (or a SIGQUIT) as SIGQUIT (exit now); ``--shutdown-timeout``
  bounds the graceful stop;
* in ``--burst`` mode, does not replace children that exit 0 (their queues are empty).

Children are forked, not started as new interpreters: Django is loaded once, a
replacement is ready in milliseconds, and the parent holds no thread or
connection when it forks (it closes its database connections first).
"""

from __future__ import annotations

import logging
import os
import select
import signal
import sys
import time
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from django.db import connections

from .core.exceptions import BackendUnavailable
from .sqlite import prepare_worker_databases
from .time_limits import (ChildFeed, ChildJob, DeferredWrites, give_back_records,
                          hard_limit_outcome, seconds)
from .worker import SUPERVISOR_STOP, WorkerOptions, run_child

logger = logging.getLogger("coati_queue.supervisor")

#: Children that die before they are ready, in a row, before the supervisor gives up.
CRASH_LOOP_LIMIT = 5
#: Delay before replacing a child that failed at start: doubled per failure, capped. A
#: child that dies within QUICK_DEATH seconds after it was ready waits RESTART_DELAY
#: (no hot loop of forks); any other is replaced at once.
RESTART_DELAY, MAX_RESTART_DELAY, QUICK_DEATH = 0.2, 5.0, 2.0
#: Seconds a child told to exit now (SIGQUIT) gets before SIGKILL.
KILL_AFTER = 10.0
MEMORY_CHECK_INTERVAL = 0.5
STOP_SIGNALS = {signal.SIGTERM, signal.SIGINT, signal.SIGQUIT}
#: Blocked while forking: a child handles none of them before it has its own handlers.
FORK_BLOCKED = STOP_SIGNALS | {SUPERVISOR_STOP}


class CrashLoop(Exception):
    """Children keep failing at start: more restarts would not help."""


@dataclass(kw_only=True)
class Child(ChildFeed):
    pid: int
    fd: int
    spawned: float = field(default_factory=time.monotonic)
    eof: bool = False
    recycling: str = ""  # why the supervisor stopped it and will replace it
    # Stopped hard by the supervisor's own rule (a neighbour's hard limit, the shutdown
    # timeout): its tasks were not at fault, so their records go back to pending. An
    # operator's "exit now" (second signal) counts as a lost run, like any other death.
    given_back: bool = False
    expected: bool = False  # stopped by the supervisor's own rule: not a failure
    told: int | None = None  # the last stop signal sent to it
    next_memory_check: float = 0.0


class Supervisor:
    def __init__(self, driver: Any, options: WorkerOptions, *, processes: int,
                 max_memory_mib: int = 0, shutdown_timeout: float | None = None):
        self.driver = driver
        self.options = options
        self.processes = processes
        self.max_memory_mib = max_memory_mib
        self.shutdown_timeout = shutdown_timeout
        self.children: dict[int, Child] = {}
        self.spawn_at: list[float] = []
        self.start_failures = 0
        self.signals = 0
        self.stopping_since: float | None = None
        self.quit_since: float | None = None
        self.worst = 0
        self.crash: str | None = None
        self.deferred = DeferredWrites()
        settings = driver.settings
        self.lease_every = min(settings.HEARTBEAT_INTERVAL, settings.REDIS_HEARTBEAT_TIMEOUT / 3)
        self.next_lease_beat = 0.0

    # -- the loop -------------------------------------------------------------
    def run(self) -> int:
        """Supervise until stopped (or, in burst mode, until the queues are empty);
        returns the exit status. Raises ``CrashLoop``."""
        # Django's default SQLite settings are for one process: WAL for the file, and
        # a busy timeout and IMMEDIATE transactions in the children (coati_queue.sqlite).
        prepare_worker_databases()
        for signum in STOP_SIGNALS:
            signal.signal(signum, self._on_signal)
        self.spawn_at = [time.monotonic()] * self.processes
        while self.children or self.deferred or (self.spawn_at and self.stopping_since is None):
            self._spawn_due()
            self._wait(self._timeout())
            self._reap()
            self._enforce_hard_limits()
            self.deferred.run()
            self._keep_leases()
            self._recycle_if_due()
            self._escalate_stop()
        for signum in STOP_SIGNALS:  # nothing left to stop: a late signal must not turn
            signal.signal(signum, signal.SIG_IGN)  # a clean exit into "killed by SIGTERM"
        if self.crash:
            raise CrashLoop(self.crash)
        return self.worst

    def _timeout(self) -> float:
        now = time.monotonic()
        due = [now + 0.5, self.next_lease_beat] + self.spawn_at
        due += [self.deferred.next_due()] if self.deferred else []
        due += [job.deadline for child in self.children.values() for job in child.jobs.values()
                if job.deadline is not None]
        if self.max_memory_mib:
            due += [child.next_memory_check for child in self.children.values()
                    if child.ready and not child.recycling]
        if any(child.eof for child in self.children.values()):
            due.append(now + 0.005)  # its pipe closed: it is exiting, reap it soon
        return min(max(min(due) - now, 0.0), 0.5)

    def _wait(self, timeout: float) -> None:
        fds = {child.fd: child for child in self.children.values() if not child.eof}
        if not fds:
            time.sleep(timeout)
            return
        readable, _, _ = select.select(list(fds), [], [], timeout)
        for fd in readable:
            self._read(fds[fd])

    # -- children -------------------------------------------------------------
    def _spawn_due(self) -> None:
        now = time.monotonic()
        due = [when for when in self.spawn_at if when <= now]
        if not due or self.stopping_since is not None:
            return
        self.spawn_at = [when for when in self.spawn_at if when > now]
        for _ in due:
            self._spawn()

    def _spawn(self) -> None:
        connections.close_all()  # no connection may be shared with a child
        sys.stdout.flush()
        sys.stderr.flush()
        read_fd, write_fd = os.pipe()
        parent = os.getpid()
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, FORK_BLOCKED)
        try:
            pid = os.fork()
        except OSError as exc:  # out of processes or memory: try again in a while
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
            os.close(read_fd)
            os.close(write_fd)
            logger.error("Cannot start a worker process (%s); trying again in %s.", exc,
                         seconds(MAX_RESTART_DELAY * 1000))
            self.spawn_at.append(time.monotonic() + MAX_RESTART_DELAY)
            return
        if pid == 0:  # the child: never returns into this loop
            try:
                run_child(self.options, write_fd, parent, blocked,
                          [read_fd] + [child.fd for child in self.children.values()])
            finally:
                os._exit(1)
        os.close(write_fd)
        os.set_blocking(read_fd, False)
        self.children[pid] = Child(pid=pid, fd=read_fd)
        if self.stopping_since is not None:  # a signal came while we were forking
            self._tell(self.children[pid],
                       signal.SIGQUIT if self.quit_since is not None else SUPERVISOR_STOP)
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
        logger.info("Started worker process %d.", pid)

    def _read(self, child: Child) -> None:
        while not child.eof:
            try:
                data = os.read(child.fd, 65536)
            except BlockingIOError:
                return
            except OSError:
                data = b""
            child.eof = not data
            kinds = child.feed(data)
            if kinds & {"start", "ready"}:
                self.start_failures = 0  # a child started: no crash loop
            if "recycle" in kinds and not child.recycling:  # it stopped taking work itself
                child.recycling, child.expected = child.recycle_reason, True

    def _reap(self) -> None:
        for child in list(self.children.values()):
            try:
                pid, status = os.waitpid(child.pid, os.WNOHANG)
            except ChildProcessError:
                pid, status = child.pid, 0
            if pid:
                self._exited(child, os.waitstatus_to_exitcode(status))

    def _exited(self, child: Child, code: int) -> None:
        self._read(child)  # what it wrote before it died
        os.close(child.fd)
        del self.children[child.pid]
        now = time.monotonic()
        described = _describe_exit(code)
        if child.given_back or code:
            self._release(child)
        if self.stopping_since is not None:
            if not child.expected:  # the final status: what the stop did to the children
                self.worst = max(self.worst, code if code > 0 else (1 if code else 0))
            logger.info("Worker process %d stopped (%s).", child.pid, described)
            return
        if child.recycling:
            logger.info("Worker process %d %s (%s); starting another.", child.pid, described,
                        child.recycling)
            self.spawn_at.append(now)
            return
        if self.options.burst and code == 0:
            logger.info("Worker process %d finished: its queues are empty.", child.pid)
            return
        if not child.ready:
            self.start_failures += 1
        logger.error("Worker process %d %s%s; %d task(s) it was running come back through the "
                     "broker.", child.pid, described,
                     "" if child.ready else " before it was ready", len(child.jobs))
        if self.start_failures >= CRASH_LOOP_LIMIT:
            self.crash = (f"{self.start_failures} worker processes in a row failed to start "
                          f"(the last {described} after {now - child.spawned:.1f} s); giving "
                          "up. Their output above says why.")
            logger.error(self.crash)
            self._stop(SUPERVISOR_STOP)
            return
        if not child.ready:
            delay = min(RESTART_DELAY * 2 ** (self.start_failures - 1), MAX_RESTART_DELAY)
        else:
            delay = RESTART_DELAY if now - child.spawned < QUICK_DEATH else 0.0
        self.spawn_at.append(now + delay)

    # -- hard time limits ---------------------------------------------------------
    def _enforce_hard_limits(self) -> None:
        now = time.monotonic()
        for child in list(self.children.values()):
            if not any(job.deadline is not None and job.deadline <= now
                       for job in child.jobs.values()):
                continue
            self._read(child)  # an "end" may be waiting: then nothing is overdue
            overdue = [job for job in child.jobs.values()
                       if job.deadline is not None and job.deadline <= now]
            if overdue and child.pid in self.children:
                self._kill_for_limits(child, overdue)

    def _kill_for_limits(self, child: Child, overdue: list[ChildJob]) -> None:
        """Discard the overdue jobs' messages (nothing gives them back), SIGKILL, then
        write their records: deferred, as a frozen child may hold a database lock."""
        for job in overdue:
            try:
                self.driver.discard_reserved(child.lease, child.pid, job.job_id, job.queue)
            except BackendUnavailable as exc:
                logger.warning("Could not discard the message of job %s (%s); its record "
                               "still refuses a rerun.", job.job_id, exc)
        killed_at = time.monotonic()
        _kill(child.pid, signal.SIGKILL)
        try:
            _, status = os.waitpid(child.pid, 0)
        except ChildProcessError:
            status = 0
        for job in overdue:
            child.jobs.pop(job.job_id, None)
            ran = killed_at - job.started_mono
            logger.error("Job %s (%s) exceeded its hard time limit of %s after %.2f s: worker "
                         "process %d killed (SIGKILL).", job.job_id, job.task,
                         seconds(job.hard_ms or 0), ran, child.pid)
            self.deferred.add(f"the record of job {job.job_id}", partial(
                hard_limit_outcome, self.driver, job, ran, child.worker_id, child.pid))
        child.given_back = child.expected = True
        child.recycling = "killed at a hard time limit"
        self._exited(child, os.waitstatus_to_exitcode(status))

    def _release(self, child: Child) -> None:
        """A dead child's lease is released (its messages come back at once). If we killed
        it, its jobs were not at fault: their records go back to pending first (the
        redelivery then counts no lost run)."""
        if child.given_back and child.jobs and child.worker_id:
            self.deferred.add(f"the records of worker process {child.pid}'s other tasks",
                              partial(give_back_records, list(child.jobs), child.worker_id))
        if child.lease:
            self.deferred.add(f"the lease of worker process {child.pid}",
                              partial(self.driver.release_dead_worker, child.lease))

    def _keep_leases(self) -> None:
        """Renew the broker leases of live children (``QueueDriver.keep_alive``)."""
        now = time.monotonic()
        if now < self.next_lease_beat:
            return
        self.next_lease_beat = now + self.lease_every
        tokens = [child.lease for child in self.children.values() if child.lease]
        try:
            self.driver.keep_alive(tokens)
        except BackendUnavailable as exc:
            logger.warning("Could not renew the leases of the worker processes: %s", exc)

    # -- recycling and stopping ---------------------------------------------------
    def _recycle_if_due(self) -> None:
        """``--max-memory-per-child`` (``--max-tasks-per-child`` is counted by each child,
        which stops taking work after its N-th task and says so on its pipe)."""
        if self.stopping_since is not None or not self.max_memory_mib:
            return
        now = time.monotonic()
        for child in self.children.values():
            if child.recycling or not child.ready or now < child.next_memory_check:
                continue
            child.next_memory_check = now + MEMORY_CHECK_INTERVAL
            resident = resident_mib(child.pid)
            if resident is not None and resident > self.max_memory_mib:
                child.recycling = (f"{resident:.0f} MiB resident, --max-memory-per-child "
                                   f"{self.max_memory_mib}")
                child.expected = True
                logger.info("Recycling worker process %d after its current task(s): %s.",
                            child.pid, child.recycling)
                self._tell(child, SUPERVISOR_STOP)

    def _on_signal(self, signum: int, frame: Any) -> None:
        self.signals += 1
        quit_now = signum == signal.SIGQUIT or self.signals > 1
        logger.info("%s received: %s.", signal.Signals(signum).name,
                    "worker processes exit now, in-flight tasks are given back" if quit_now
                    else "worker processes finish their tasks, then exit")
        self._stop(signal.SIGQUIT if quit_now else SUPERVISOR_STOP)

    def _stop(self, passed_on: int) -> None:
        now = time.monotonic()
        self.stopping_since = self.stopping_since or now
        self.spawn_at = []
        if passed_on == signal.SIGQUIT:
            self.quit_since = self.quit_since or now
        for child in list(self.children.values()):
            self._tell(child, passed_on)

    @staticmethod
    def _tell(child: Child, signum: int) -> None:
        """Send a stop once: a second graceful stop would mean "exit now" to the child."""
        if child.told != signum and child.told != signal.SIGQUIT:
            child.told = signum
            _kill(child.pid, signum)

    def _escalate_stop(self) -> None:
        """``--shutdown-timeout`` over: exit now (work given back); SIGKILL what ignores it."""
        if self.stopping_since is None or not self.children:
            return
        now = time.monotonic()
        if (self.quit_since is None and self.shutdown_timeout is not None
                and now - self.stopping_since >= self.shutdown_timeout):
            running = sum(len(child.jobs) for child in self.children.values())
            logger.warning("Shutdown timeout of %s reached: %d task(s) still running are given "
                           "back and run again later.", seconds(self.shutdown_timeout * 1000),
                           running)
            self.quit_since = now
            for child in self.children.values():
                child.given_back = child.expected = True
                self._tell(child, signal.SIGQUIT)
        elif self.quit_since is not None and now - self.quit_since >= KILL_AFTER:
            for child in self.children.values():
                _kill(child.pid, signal.SIGKILL)
            self.quit_since = now


def _kill(pid: int, signum: int) -> None:
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        pass  # already gone: reaped by the loop


def _describe_exit(code: int) -> str:
    if code < 0:
        return f"was killed by {signal.Signals(-code).name}"
    return f"exited with status {code}"


def resident_mib(pid: int) -> float | None:
    """Resident memory of ``pid`` in MiB (Linux ``/proc``), or None when unknown."""
    try:
        with open(f"/proc/{pid}/statm") as handle:
            pages = int(handle.read().split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return pages * os.sysconf("SC_PAGE_SIZE") / 2 ** 20
