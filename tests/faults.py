"""Machinery of the fault battery (tests/test_faults.py): real processes, real faults.

* ``RedisServer``: a redis-server of the test's own (own port, own directory),
  started with or without an append-only file, SIGKILLed and restarted on the
  same port. Never the session ``redis_server`` other tests share.
* ``WorkerGroup``: one real ``runworkers`` command in its own session (process
  group), output in a log file; its children are found through ``/proc``.
* ``wait_until``: a condition with a deadline; on timeout the failure message
  holds the batch/record/broker state and every worker's output.
* ``FaultStack``: the backend (through the environment, as users configure it),
  the shortened delivery settings given to workers through
  ``COATI_TEST_QUEUE_OVERRIDES``, the seeded planilla and the invariant checks.
* ``hostile_messages``: bytes to plant straight into the broker.

Recovery comes from the settings below, never from sleeps: every wait is a
condition with a generous deadline.
"""

from __future__ import annotations

import datetime
import io
import json
import os
import pickle
import secrets
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import pytest

from tests.conftest import REPO_ROOT, free_port, worker_env

START, END = "2024-01-01", "2024-01-15"
START_DATE, END_DATE = datetime.date(2024, 1, 1), datetime.date(2024, 1, 15)
CHUNK_TASK = "coati.payroll.calculate_chunk"
FANOUT_TASK = "process_payroll_parallel"
CALLBACKS = {"on_complete": "tests.payroll_on_complete",
             "on_success": "tests.payroll_on_success",
             "on_failure": "tests.payroll_on_failure"}

#: seed_demo leaves out inactive and departed people: 330 seeded give 300+ to pay.
SEEDED_EMPLOYEES = 330
MIN_ACTIVE = 300
CHUNK_SIZE = 10
#: Milliseconds of "calculation" per employee (tests/testapp/payroll_hooks.py): with 2
#: processes x 2 threads a 300-employee batch lasts a few seconds, so a fault triggered
#: between 10 % and 60 % of it lands mid-batch.
PACE_MS = 20
PACED_HOOK = "tests.testapp.payroll_hooks.paced_per_employee"
#: Delivery settings shortened for the tests (README "Delivery guarantees").
DELIVERY_OVERRIDES = {
    "HEARTBEAT_INTERVAL": 0.2,
    "WORKER_LOST_AFTER": 1.5,
    "RECONCILE_INTERVAL": 0.5,
    "RESEND_PENDING_AFTER": 2,
    "REDIS_HEARTBEAT_TIMEOUT": 2,
    "BATCH_CLAIM_TTL": 3,
    "WORKER_LOST_LIMIT": 3,
}
DEADLINE = 120.0          # seconds any recovery may take before the test fails
POLL = 0.02


# -- redis-server of our own ----------------------------------------------------------------
class RedisServer:
    """A redis-server on a fixed port and directory that a test may kill and restart."""

    def __init__(self, workdir: Path):
        self.binary = "/usr/bin/redis-server"
        if not os.path.exists(self.binary):
            message = "redis-server is not installed (apt-get install redis-server)"
            if os.environ.get("CI") == "true":
                pytest.fail(message)
            pytest.skip(message)
        self.workdir = workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.password = "pw-" + secrets.token_hex(12)
        self.process: subprocess.Popen | None = None
        self.log = self.workdir / "redis.log"

    @property
    def url(self) -> str:
        return f"redis://:{self.password}@127.0.0.1:{self.port}/0"

    def start(self, persistent: bool = False, timeout: float = 20) -> None:
        assert self.process is None or self.process.poll() is not None, "already running"
        persistence = (["--appendonly", "yes", "--appendfsync", "always", "--save", ""]
                       if persistent else ["--appendonly", "no", "--save", ""])
        command = [self.binary, "--port", str(self.port), "--bind", "127.0.0.1",
                   "--requirepass", self.password, "--dir", str(self.workdir),
                   "--daemonize", "no", "--loglevel", "warning", "--logfile", str(self.log),
                   *persistence]
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                pytest.fail(f"redis-server exited {self.process.returncode} at start on port "
                            f"{self.port}:\n{self.log_text()}")
            if self.ping():
                return
            time.sleep(0.05)
        pytest.fail(f"redis-server on port {self.port} did not answer PING in {timeout} s")

    def ping(self) -> bool:
        import redis

        client = redis.Redis(host="127.0.0.1", port=self.port, password=self.password,
                             socket_timeout=0.5, socket_connect_timeout=0.5)
        try:
            return bool(client.ping())
        except (redis.RedisError, OSError):
            return False
        finally:
            client.close()

    def client(self) -> Any:
        import redis

        return redis.Redis.from_url(self.url, socket_timeout=10)

    def kill(self) -> None:
        """SIGKILL, as the OOM killer or a power cut would; waits until it is gone."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(timeout=30)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.kill()

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")[-4000:] if self.log.exists() else ""


# -- real runworkers processes --------------------------------------------------------------
class WorkerGroup:
    """One ``runworkers`` command in a session of its own, so it can be ``killpg``-ed."""

    def __init__(self, command: list[str], env: dict[str, str], log_path: Path, label: str):
        self.command = command
        self.label = label
        self.log_path = log_path
        self._log = open(log_path, "ab")
        self.process = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=self._log,
                                        stderr=subprocess.STDOUT, start_new_session=True)
        self.pid = self.process.pid
        self.started = time.monotonic()

    def __repr__(self) -> str:
        return f"<WorkerGroup {self.label} pid {self.pid}>"

    @property
    def running(self) -> bool:
        return self.process.poll() is None

    @property
    def returncode(self) -> int | None:
        return self.process.poll()

    def children(self) -> list[int]:
        """Live (not zombie) children of the ``runworkers`` parent (``--processes N``)."""
        found: list[int] = []
        task_dir = Path(f"/proc/{self.pid}/task")
        try:
            for task in task_dir.iterdir():
                try:
                    found += [int(p) for p in (task / "children").read_text().split()]
                except OSError:
                    continue
        except OSError:
            return []
        return sorted(pid for pid in set(found) if not is_zombie_or_gone(pid))

    def processes(self) -> str:
        """Every process of the group: pid, parent, state, kernel wait channel, threads."""
        rows = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                stat = (entry / "stat").read_text()
                fields = stat.rsplit(") ", 1)[1].split()
                state, ppid, pgid = fields[0], int(fields[1]), int(fields[2])
                if pgid != self.pid:
                    continue
                wchan = (entry / "wchan").read_text().strip()
                threads = len(list((entry / "task").iterdir()))
                rows.append(f"pid {entry.name} ppid {ppid} state {state} wchan {wchan} "
                            f"threads {threads}")
            except (OSError, IndexError, ValueError):
                continue
        return "\n".join(rows) or "(no process left in the group)"

    def group_alive(self) -> bool:
        """Any process left in the group (the parent may be gone, children not)."""
        try:
            os.killpg(self.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True

    def signal_parent(self, signum: int) -> None:
        self.process.send_signal(signum)

    def signal_group(self, signum: int) -> None:
        try:
            os.killpg(self.pid, signum)
        except ProcessLookupError:
            pass

    def wait(self, timeout: float) -> int | None:
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None

    def wait_group_gone(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.process.poll()  # reap the parent
            if not self.group_alive():
                return True
            time.sleep(POLL)
        return False

    def output(self, tail: int = 150, width: int = 600) -> str:
        self._log.flush()
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(line[:width] + (" [...]" if len(line) > width else "")
                         for line in lines[-tail:])

    def full_output(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def stop(self, timeout: float = 30) -> int | None:
        """SIGTERM to the parent (graceful); SIGKILL to the group if it does not exit."""
        if self.running:
            self.signal_parent(signal.SIGTERM)
            if self.wait(timeout) is None:
                self.signal_group(signal.SIGKILL)
                self.wait(10)
        self.destroy()
        return self.returncode

    def destroy(self) -> None:
        """Whatever is left of the group dies (only this group, by its id)."""
        if self.group_alive():
            self.signal_group(signal.SIGKILL)
            self.wait_group_gone(10)
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(timeout=10)
        self._log.close()


def is_zombie_or_gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(") ", 1)[1].startswith(("Z", "X"))
    except (OSError, IndexError):
        return True


def runworkers_command(backend: str | None, *, processes: int = 2, threads: int = 2,
                       burst: bool = False, extra: tuple[str, ...] = ()) -> list[str]:
    command = [sys.executable, "-m", "django", "runworkers", "--processes", str(processes),
               "--threads", str(threads), "--poll-ms", "20", "--skip-checks"]
    if backend is not None:  # None: the backend COATI_QUEUE_BACKEND selects (auto)
        command += ["--backend", backend]
    if burst:
        command.append("--burst")
    return command + list(extra)


# -- waiting --------------------------------------------------------------------------------
def wait_until(condition: Callable[[], Any], what: str, *, timeout: float = DEADLINE,
               describe: Callable[[], str] = lambda: "", poll: float = POLL,
               fail_if: Callable[[], str | None] | None = None) -> Any:
    """Poll ``condition`` until truthy; fail after ``timeout`` with ``describe()``."""
    started = time.monotonic()
    deadline = started + timeout
    while True:
        value = condition()
        if value:
            return value
        if fail_if is not None:
            reason = fail_if()
            if reason:
                pytest.fail(f"while waiting for {what}: {reason}\n{describe()}")
        if time.monotonic() >= deadline:
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}\n{describe()}")
        time.sleep(poll)


# -- hostile messages -----------------------------------------------------------------------
class _Pwn:
    """Unpickling this runs ``touch <path>``: proof that nobody unpickles a message."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


@dataclass
class Hostile:
    """One message to plant: ``body`` is the coati envelope JSON text (None: ``raw``)."""

    kind: str
    marker: str                  # a string its stored payload must contain
    job_id: str | None = None    # the envelope's id, when it has one
    body: str | None = None      # envelope text, wrapped in the backend's message format
    raw: bytes | None = None     # bytes planted as the whole broker message
    label: str | None = None     # tests.mark label: must never appear as a Mark
    refusable: bool = True       # a failed record (not only a dead letter) is acceptable


def _envelope(task: str, args: list | None = None, kwargs: dict | None = None, **fields) -> dict:
    from coati_queue.core.jobs import Job

    job = Job(task=task, args=list(args or []), kwargs=dict(kwargs or {}), queue="default",
              max_retries=0)
    data = job.to_dict()
    ordered = {"id": data.pop("id"), "task": data.pop("task")}  # first: kept when truncated
    ordered.update(data)
    ordered.update(fields)
    return ordered


def hostile_messages(sentinel_dir: Path, hostile_planilla: str) -> list[Hostile]:
    """Every hostile message of scenario 8; none of them may run anything."""
    messages = []
    tag = secrets.token_hex(4)
    marker = f"garbage-{tag}"
    messages.append(Hostile("garbage bytes", marker,
                            raw=b"\xff\xfe\x00" + marker.encode() + b" {not json"))
    pwned = sentinel_dir / f"unpickled-{tag}"
    messages.append(Hostile("pickle", str(pwned), raw=pickle.dumps(_Pwn(str(pwned)))))

    def envelope_message(kind: str, envelope: dict, label: str | None = None,
                         refusable: bool = True) -> Hostile:
        text = json.dumps(envelope, separators=(",", ":"))
        return Hostile(kind, envelope["id"], job_id=envelope["id"], body=text, label=label,
                       refusable=refusable)

    for kind, fields in (("max_retries -1", {"max_retries": -1}),
                         ("unknown batch_id", {"batch_id": 987_654_321}),
                         ("unknown field", {"evil": "field"})):
        label = f"hostile-{kind.replace(' ', '_')}-{tag}"
        messages.append(envelope_message(kind, _envelope("tests.mark", [label], **fields),
                                         label=label))
    label = f"hostile-20MB-{tag}"
    big = _envelope("tests.mark", [label, "x" * (20 * 1024 * 1024)])
    messages.append(envelope_message("20 MB argument", big, label=label))
    # 10,000-deep nesting cannot go through json.dumps: written by hand.
    label = f"hostile-deep-{tag}"
    deep = _envelope("tests.mark", [label, "@DEEP@"])
    text = json.dumps(deep, separators=(",", ":")).replace('"@DEEP@"',
                                                           "[" * 10_000 + "]" * 10_000)
    messages.append(Hostile("10,000-deep JSON", deep["id"], job_id=deep["id"], body=text,
                            label=label))
    pwned_system = sentinel_dir / f"os-system-{tag}"
    messages.append(envelope_message("task os.system",
                                     _envelope("os.system", [f"touch {pwned_system}"])))
    messages.append(envelope_message("payroll on_complete=builtins.print", _envelope(
        FANOUT_TASK, kwargs={"planilla_id": hostile_planilla, "periodo_inicio": START,
                             "periodo_fin": END, "on_complete": "builtins.print"})))
    return messages


def plant_huey(driver: Any, message: Hostile) -> str:
    """Write a file into Huey's queue directory, named like the storage names its own."""
    from coati_queue.backends import huey as huey_backend

    storage = driver.huey.storage
    priority = driver.settings.queue_priority("default")
    if message.raw is not None:
        data = message.raw
    else:
        fields = {"id": message.job_id, "name": f"{huey_backend.MODULE}."
                  f"{huey_backend.EXECUTE_TASK}", "eta": None, "retries": 0,
                  "retry_delay": 0, "priority": priority, "args": ["@BODY@"], "kwargs": {}}
        data = json.dumps({"huey": fields}, separators=(",", ":")).replace(
            '"@BODY@"', message.body).encode()
    plant_huey.sequence += 1
    name = "%04x-%012x-%010x-%d" % (storage.MAX_PRIORITY - priority, int(time.time() * 1000),
                                    plant_huey.sequence, 424242)
    path = os.path.join(storage.queue_path, name)
    with open(path + ".tmp", "wb") as handle:
        handle.write(data)
    os.rename(path + ".tmp", path)
    return name


plant_huey.sequence = 0


def plant_dramatiq(client: Any, message: Hostile, queue: str = "default") -> str:
    """``HSET coati:<queue>.msgs <id> <bytes>`` + ``RPUSH coati:<queue> <id>``, as
    Dramatiq's dispatch.lua enqueues."""
    redis_id = str(uuid.uuid4())
    if message.raw is not None:
        data = message.raw
    else:
        fields = {"queue_name": queue, "actor_name": f"coati.{queue}", "args": ["@BODY@"],
                  "kwargs": {}, "options": {"redis_message_id": redis_id},
                  "message_id": message.job_id,
                  "message_timestamp": int(time.time() * 1000)}
        data = json.dumps(fields, separators=(",", ":")).replace('"@BODY@"',
                                                                 message.body).encode()
    pipe = client.pipeline(transaction=True)
    pipe.hset(f"coati:{queue}.msgs", redis_id, data)
    pipe.rpush(f"coati:{queue}", redis_id)
    pipe.execute()
    return redis_id


# -- the stack under test -------------------------------------------------------------------
@dataclass
class FaultStack:
    backend: str
    tmp_path: Path
    huey_path: str
    redis: RedisServer | None
    worker_extra_env: dict[str, str]
    groups: list[WorkerGroup] = field(default_factory=list)
    employee_ids: list[str] = field(default_factory=list)
    planilla: str = ""

    # -- setup --------------------------------------------------------------------------
    @property
    def driver(self) -> Any:
        from coati_queue.selection import get_queue_driver

        return get_queue_driver()

    def seed(self, code: str = "faults", employees: int = SEEDED_EMPLOYEES) -> list[str]:
        from django.core.management import call_command

        from example_project.payroll import services

        call_command("seed_demo", employees=employees, seed=2024, planilla=code,
                     company=f"Company {code}", stdout=io.StringIO())
        services.clear_caches()
        self.planilla = code
        self.employee_ids = services.active_employee_ids(code, START_DATE, END_DATE)
        assert len(self.employee_ids) >= MIN_ACTIVE, len(self.employee_ids)
        return self.employee_ids

    def start_batch(self) -> Any:
        from coati_queue.payroll import start_payroll_batch

        return start_payroll_batch(self.planilla, START, END, usuario="faults", **CALLBACKS)

    def start_workers(self, backend: str | None = "default", *, processes: int = 2,
                      threads: int = 2, burst: bool = False, env: dict | None = None,
                      label: str | None = None) -> WorkerGroup:
        backend = self.backend if backend == "default" else backend
        command = runworkers_command(backend, processes=processes, threads=threads,
                                     burst=burst)
        label = label or f"runworkers#{len(self.groups) + 1}"
        log_path = self.tmp_path / f"{label.replace('#', '-')}.log"
        group = WorkerGroup(command, worker_env({**self.worker_extra_env, **(env or {})}),
                            log_path, label)
        self.groups.append(group)
        return group

    def teardown(self) -> None:
        for group in self.groups:
            group.destroy()
        if self.redis is not None:
            self.redis.kill()

    # -- observing ----------------------------------------------------------------------
    def worker_output(self) -> str:
        return "\n".join(f"--- {g.label} (pid {g.pid}, exit {g.returncode}) ---\n"
                         f"{g.processes() if g.group_alive() else ''}\n{g.output()}"
                         for g in self.groups)

    def state(self, batch: Any = None) -> str:
        from django.db.models import Count

        from coati_queue.models import DeadLetter, PayrollItem, TaskResult, WorkerHeartbeat

        parts = []
        try:
            if batch is not None:
                batch.refresh_from_db()
                parts.append(f"batch #{batch.pk}: {batch.status} total={batch.total} "
                             f"succeeded={batch.succeeded} failed={batch.failed}")
                items = dict(PayrollItem.objects.filter(batch=batch).values_list("status")
                             .annotate(n=Count("id")).order_by())
                parts.append(f"items: {items}")
            records = list(TaskResult.objects.values_list("task_name", "status", "unsent")
                           .annotate(n=Count("id")).order_by("task_name", "status"))
            parts.append("records (task, status, unsent, n): " + repr(records))
            stuck = list(TaskResult.objects.filter(status__in=["pending", "processing"])
                         .values("id", "task_name", "status", "attempts", "worker_id",
                                 "lost_count", "resends", "unsent")[:10])
            parts.append(f"unfinished records (first 10): {stuck}")
            letters = [(task, reason[:160], payload[:80]) for task, reason, payload in
                       DeadLetter.objects.values_list("task_name", "reason", "payload")[:12]]
            parts.append(f"dead letters ({DeadLetter.objects.count()}; task, reason, payload "
                         f"head): {letters}")
            beats = list(WorkerHeartbeat.objects.values_list("worker_id", "last_seen",
                                                             "stopped_at"))
            parts.append(f"heartbeats: {beats}")
        except Exception as exc:  # the description must never hide the real failure
            parts.append(f"(state unavailable: {exc!r})")
        parts.append(f"broker leftovers: {self.leftovers()}")
        if self.redis is not None and self.redis.process is not None:
            running = self.redis.process.poll() is None
            parts.append(f"redis-server: {'running' if running else 'down'}")
        return "\n".join(parts) + "\n" + self.worker_output()

    def progress(self, batch: Any) -> int:
        batch.refresh_from_db()
        return batch.succeeded + batch.failed

    def wait_mid_batch(self, batch: Any, extra: Callable[[], Any] = lambda: True) -> Any:
        """Until 10 %..60 % of the batch is processed (and ``extra()`` holds); the
        fault is triggered then. Past 60 % the test cannot prove a mid-batch fault."""
        n = len(self.employee_ids)

        def ready():
            done = self.progress(batch)
            if done >= n * 0.10:
                return extra()
            return None

        def overshot():
            done = self.progress(batch)
            if done > n * 0.60:
                return (f"the batch reached {done}/{n} before the fault could land mid-batch "
                        f"(raise PACE_MS in tests/faults.py)")
            return None

        return wait_until(ready, "the batch to be between 10 % and 60 %", fail_if=overshot,
                          describe=lambda: self.state(batch))

    def broker_empty(self) -> bool:
        return not self.leftovers()

    def leftovers(self) -> dict[str, int]:
        """Messages still anywhere in the broker: queued, delayed, reserved by a worker
        (Huey reservation folders, Dramatiq ack sets) or in Dramatiq's dead-letter set.
        Once everything has run and the workers are idle, there must be none."""
        found: dict[str, int] = {}
        try:
            depths = self.driver.queue_depths()
        except Exception as exc:
            return {f"broker unavailable ({type(exc).__name__})": 1}
        for queue, depth in depths.items():
            for kind in ("queued", "delayed"):
                if depth[kind]:
                    found[f"{queue} {kind}"] = depth[kind]
        found.update(huey_leftovers(self.huey_path))
        if self.redis is not None and self.redis.process is not None \
                and self.redis.process.poll() is None:
            try:
                found.update(redis_leftovers(self.redis.client()))
            except Exception as exc:
                found[f"redis unavailable ({type(exc).__name__})"] = 1
        return found

    def settled(self, batch: Any) -> bool:
        """The batch ended, its callbacks ran, no record is unfinished, the broker is empty."""
        from coati_queue.models import TaskResult
        from tests.testapp.models import Mark

        batch.refresh_from_db()
        if batch.status not in ("completed", "completed_with_errors", "failed", "cancelled"):
            return False
        if not Mark.objects.filter(label=f"payroll:complete:{batch.pk}").exists():
            return False
        if TaskResult.objects.filter(status__in=["pending", "processing"]).exists():
            return False
        if TaskResult.objects.filter(unsent=True).exists():
            return False
        return self.broker_empty()

    def wait_settled(self, batch: Any, what: str = "the batch to complete and everything "
                     "to settle", timeout: float = DEADLINE, **kwargs) -> float:
        started = time.monotonic()
        wait_until(lambda: self.settled(batch), what, timeout=timeout,
                   describe=lambda: self.state(batch), **kwargs)
        return time.monotonic() - started

    # -- the invariant ------------------------------------------------------------------
    def assert_invariant(self, batch: Any) -> None:
        """Nothing lost, nothing run twice, nothing stuck."""
        from django.db.models import Count

        from coati_queue.models import PayrollItem, TaskResult
        from example_project.payroll.models import PayrollLine
        from tests.testapp.models import Mark

        batch.refresh_from_db()
        n = len(self.employee_ids)
        context = self.state(batch)
        assert batch.status == "completed", context
        assert (batch.total, batch.succeeded, batch.failed) == (n, n, 0), context
        lines = PayrollLine.objects.filter(batch=batch)
        assert lines.count() == n, context
        assert set(lines.values_list("employee__code", flat=True)) == set(self.employee_ids)
        duplicated = list(lines.values("employee").annotate(k=Count("id")).filter(k__gt=1))
        assert not duplicated, duplicated
        items = PayrollItem.objects.filter(batch=batch)
        assert items.count() == n, context
        assert not items.exclude(status="succeeded").exists(), context
        callbacks = {kind: Mark.objects.filter(label=f"payroll:{kind}:{batch.pk}").count()
                     for kind in ("complete", "success", "failure")}
        assert callbacks == {"complete": 1, "success": 1, "failure": 0}, context
        unfinished = list(TaskResult.objects.filter(status__in=["pending", "processing"])
                          .values_list("task_name", "status", "id"))
        assert not unfinished, context
        assert not TaskResult.objects.filter(unsent=True).exists(), context
        assert not self.leftovers(), context
        if self.redis is not None and self.redis.process is not None \
                and self.redis.process.poll() is None:
            orphans = redis_orphan_ids(self.redis.client())
            assert not orphans, (
                "message ids left in Dramatiq ack sets without a message body (one Redis "
                f"message id was pushed twice): {orphans}\n{context}")


def huey_leftovers(path: str) -> dict[str, int]:
    """Files in a Huey directory's queue, schedule and reservation folders."""
    found: dict[str, int] = {}
    root = Path(path)
    for kind in ("queue", "schedule"):
        directory = root / kind
        if directory.is_dir():
            names = [p for p in directory.rglob("*") if p.is_file()
                     and not p.name.endswith(".tmp")]
            if names:
                found[f"huey {kind} files"] = len(names)
    reserved = root / "reserved"
    if reserved.is_dir():
        held = [p for folder in reserved.iterdir() if folder.is_dir()
                for p in folder.iterdir() if p.is_file()]
        if held:
            found["huey reserved files"] = len(held)
    return found


def redis_leftovers(client: Any) -> dict[str, int]:
    """Dramatiq keys holding messages: queues, delay queues, dead-letter sets, and ack
    sets (fetched, not yet acked) whose message body still exists."""
    found: dict[str, int] = {}
    for key in client.scan_iter("coati:*"):
        name = key.decode()
        if name.endswith(".msgs") or name == "coati:__heartbeats__":
            continue
        kind = client.type(key).decode()
        if name.startswith("coati:__acks__."):
            queue = name.rsplit(".", 1)[-1] if not name.endswith(".DQ") else \
                ".".join(name.rsplit(".", 2)[-2:])
            held = [m for m in client.smembers(key) if client.hexists(f"coati:{queue}.msgs", m)]
            if held:
                found[f"redis {name}"] = len(held)
            continue
        size = {"list": client.llen, "set": client.scard, "zset": client.zcard}.get(
            kind, lambda _: 0)(key)
        if size:
            found[f"redis {name}"] = size
    return found


def redis_orphan_ids(client: Any) -> dict[str, list[str]]:
    """Message ids in Dramatiq ack sets with no message body: a message id pushed twice
    (the first ack deleted the body; the second fetch got None, dramatiq issue #266) and
    never removed from the ack set."""
    orphans: dict[str, list[str]] = {}
    for key in client.scan_iter("coati:__acks__.*"):
        name = key.decode()
        queue = name.rsplit(".", 1)[-1] if not name.endswith(".DQ") else \
            ".".join(name.rsplit(".", 2)[-2:])
        missing = [m.decode() for m in client.smembers(key)
                   if not client.hexists(f"coati:{queue}.msgs", m)]
        if missing:
            orphans[name] = missing
    return orphans


def delivery_summary(batch: Any) -> str:
    """What recovery did, for the printed report: re-sends, lost workers, item attempts."""
    from django.db.models import Count, Max, Sum

    from coati_queue.models import PayrollItem, TaskResult

    records = TaskResult.objects.filter(batch=batch).aggregate(
        resends=Sum("resends"), lost=Sum("lost_count"), attempts=Max("attempts"))
    chunks = dict(TaskResult.objects.filter(batch=batch, task_name=CHUNK_TASK)
                  .values_list("status").annotate(n=Count("id")).order_by())
    retried = PayrollItem.objects.filter(batch=batch, attempts__gt=1).count()
    attempts = dict(PayrollItem.objects.filter(batch=batch).values_list("attempts")
                    .annotate(n=Count("id")).order_by())
    return (f"chunks={chunks} resends={records['resends']} lost={records['lost']} "
            f"max_task_attempt={records['attempts']} items_recomputed={retried} "
            f"item_attempts={attempts}")


def report(name: str, seconds: float, batch: Any = None) -> None:
    print(f"RECOVERY {name}: {seconds:.1f}s" + (f" ({delivery_summary(batch)})"
                                                if batch is not None else ""))
