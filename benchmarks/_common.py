"""Shared plumbing of the benchmark scripts: redis-server, Django, worker processes.

Not a benchmark itself; see ``benchmarks/throughput.py`` and ``benchmarks/payroll.py``.
"""

from __future__ import annotations

import json
import math
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
SETTINGS = "benchmarks.bench_settings"
RESULTS = REPO / "benchmarks" / "results"


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# -- redis-server ---------------------------------------------------------------------------
class RedisServer:
    """A dedicated redis-server on a free port, no persistence; ``stop()`` ends it."""

    def __init__(self, workdir: Path):
        self.workdir = workdir
        self.process: subprocess.Popen | None = None
        self.url = ""

    def start(self) -> str:
        import redis

        binary = shutil.which("redis-server") or "/usr/bin/redis-server"
        self.workdir.mkdir(parents=True, exist_ok=True)
        for _ in range(3):
            port = free_port()
            self.process = subprocess.Popen(
                [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                 "--appendonly", "no", "--dir", str(self.workdir), "--daemonize", "no",
                 "--loglevel", "warning"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            self.url = f"redis://127.0.0.1:{port}/0"
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and self.process.poll() is None:
                try:
                    if redis.Redis.from_url(self.url, socket_timeout=0.5).ping():
                        return self.url
                except (redis.RedisError, OSError):
                    time.sleep(0.05)
            self.stop()
        raise RuntimeError("redis-server did not answer PING")

    def client(self):
        import redis

        return redis.Redis.from_url(self.url)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None


# -- Django in the harness ------------------------------------------------------------------
def setup_django(db_path: Path, database_url: str | None = None) -> None:
    """Point the benchmark settings at ``db_path`` (SQLite) or ``database_url``
    (PostgreSQL), set Django up and migrate."""
    os.environ["DJANGO_SETTINGS_MODULE"] = SETTINGS
    os.environ["COATI_BENCH_DB"] = str(db_path)
    if database_url:
        os.environ["COATI_BENCH_DATABASE_URL"] = database_url
    else:
        os.environ.pop("COATI_BENCH_DATABASE_URL", None)
    for name in ("REDIS_URL", "COATI_QUEUE_PATH", "QUEUE_ENABLED", "COATI_QUEUE_BACKEND"):
        os.environ.pop(name, None)
    import django
    from django.core.management import call_command

    django.setup()
    call_command("migrate", verbosity=0, interactive=False)


def use_backend(backend: str, *, redis_url: str | None = None,
                huey_path: str | None = None) -> dict[str, str]:
    """Select a coati_queue backend through the environment (as users do); returns that env."""
    from coati_queue.conf import reset_settings
    from coati_queue.selection import reset_drivers

    env = {"COATI_QUEUE_BACKEND": backend}
    if redis_url:
        env["REDIS_URL"] = redis_url
    if huey_path:
        env["COATI_QUEUE_PATH"] = huey_path
    for name in ("REDIS_URL", "COATI_QUEUE_PATH"):
        os.environ.pop(name, None)
    os.environ.update(env)
    reset_settings()
    reset_drivers()
    return env


def raw_sql(sql: str, params: Iterable[Any] = ()) -> None:
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute(sql, list(params))


def checkpoint() -> None:
    """Between phases (not timed): SQLite folds its WAL back into the database file,
    PostgreSQL refreshes its planner statistics after the bulk writes."""
    from django.db import connection

    raw_sql("PRAGMA wal_checkpoint(TRUNCATE)" if connection.vendor == "sqlite" else "ANALYZE")


def database_label() -> str:
    """The benchmark's database as its report names it (``SQLite WAL``, ``PostgreSQL 15.18``)."""
    from django.db import connection

    if connection.vendor == "sqlite":
        return "SQLite WAL"
    connection.ensure_connection()
    version = connection.pg_version if connection.vendor == "postgresql" else ""
    if version:
        return f"PostgreSQL {version // 10000}.{version % 10000}"
    return connection.display_name


# -- processes ------------------------------------------------------------------------------
def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env.update({
        "DJANGO_SETTINGS_MODULE": SETTINGS,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
        "PYTHONUNBUFFERED": "1",
    })
    env.update(extra or {})
    return env


def spawn(command: list[str], log_path: Path, env: dict[str, str] | None = None
          ) -> subprocess.Popen:
    """Start ``command`` in its own process group, output to ``log_path``."""
    handle = open(log_path, "ab")
    handle.write(f"$ {' '.join(command)}\n".encode())
    handle.flush()
    process = subprocess.Popen(command, cwd=REPO, env=child_env(env), stdout=handle,
                               stderr=subprocess.STDOUT, start_new_session=True)
    handle.close()
    return process


def runworkers_command(backend: str, processes: int, threads: int, burst: bool,
                       extra: Iterable[str] = ()) -> list[str]:
    command = [sys.executable, "-m", "django", "runworkers", "--backend", backend,
               "--processes", str(processes), "--threads", str(threads), "--verbosity", "0"]
    if burst:
        command.append("--burst")
    return command + list(extra)


def stop(process: subprocess.Popen, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
    """Signal the process we started, wait; SIGKILL its group if it does not exit in time."""
    if process.poll() is None:
        try:
            process.send_signal(sig)
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            log(f"pid {process.pid} did not stop in {timeout}s: SIGKILL to its group")
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    kill_group(process)
    return process.returncode


def kill_group(process: subprocess.Popen) -> None:
    """Children left in the group of a process we started (e.g. after a crash)."""
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def wait_for(predicate: Callable[[], bool], timeout: float, interval: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


def pace(count: int, rate: float, send: Callable[[int], None]) -> float:
    """Call ``send(i)`` ``count`` times at ``rate`` per second; returns the achieved rate."""
    start = time.perf_counter()
    for index in range(count):
        target = start + index / rate
        delay = target - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        send(index)
    return count / (time.perf_counter() - start)


# -- figures --------------------------------------------------------------------------------
def percentile(values: list[float], p: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, math.ceil(p / 100 * len(ordered)) - 1))
    return ordered[rank]


def latency_summary(seconds: list[float]) -> dict[str, Any]:
    ms = [s * 1000 for s in seconds]
    return {"n": len(ms), "p50_ms": percentile(ms, 50), "p90_ms": percentile(ms, 90),
            "p99_ms": percentile(ms, 99), "max_ms": max(ms) if ms else None,
            "mean_ms": sum(ms) / len(ms) if ms else None}


def fmt(value: Any, spec: str = ",.0f", missing: str = "–") -> str:
    if value is None:
        return missing
    if isinstance(value, str):
        return value
    return format(value, spec)


def ratio(a: float | None, b: float | None) -> float | None:
    return None if not a or not b else a / b


def table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(x)) for x in column) for column in zip(headers, *rows)]
    line = lambda cells: "  ".join(  # noqa: E731
        str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))
    out = [line(headers), "  ".join("-" * w for w in widths)]
    out += [line(row) for row in rows]
    return "\n".join(out)


def machine() -> dict[str, Any]:
    import django
    import dramatiq
    import huey
    import redis

    redis_version = subprocess.run([shutil.which("redis-server") or "/usr/bin/redis-server",
                                    "--version"], capture_output=True, text=True).stdout.strip()
    try:
        import sqlite3

        sqlite_version = sqlite3.sqlite_version
    except ImportError:  # pragma: no cover
        sqlite_version = None
    cpu = ""
    try:
        for text in Path("/proc/cpuinfo").read_text().splitlines():
            if text.startswith("model name"):
                cpu = text.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"python": platform.python_version(), "django": django.__version__,
            "dramatiq": dramatiq.__version__, "huey": huey.__version__,
            "redis_py": redis.__version__, "redis_server": redis_version,
            "sqlite": sqlite_version, "database": database_label(),
            "cpus": os.cpu_count(), "cpu": cpu,
            "platform": platform.platform()}


def write_json(name: str, data: dict[str, Any]) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / name
    path.write_text(json.dumps(data, indent=2, default=str) + "\n")
    return path


def remove_workdir(workdir: Path, keep: bool) -> None:
    if keep:
        log(f"kept {workdir}")
    else:
        shutil.rmtree(workdir, ignore_errors=True)


def publish(benchmark: str, args: Any, began: float, text: str, ratios: Any,
            results: dict[str, Any], **extra: Any) -> None:
    """Print the table and write it with the parameters and machine to results/<--json>."""
    print(text)
    path = write_json(args.json, {
        "benchmark": benchmark, "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "runtime_s": time.time() - began,
        "parameters": {k: v for k, v in vars(args).items() if k != "monitor"},
        "machine": machine(), **extra, "results": results, "ratios": ratios, "table": text})
    print(f"\nJSON: {path}  (total {time.time() - began:.0f}s)")


# -- interference from other processes -------------------------------------------------------
TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _system_busy() -> tuple[float, float, float]:
    """(busy, steal, total) CPU seconds of the whole machine since boot, from /proc/stat."""
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except OSError:
        return 0.0, 0.0, 0.0
    user, nice, system, idle, iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
    busy = user + nice + system + irq + softirq
    return busy / TICK, steal / TICK, (busy + idle + iowait + steal) / TICK


def _live_descendants_cpu(also: Iterable[int] = ()) -> float:
    """CPU seconds of our live descendants (own + their reaped children), from /proc,
    and of the processes ``also`` names with theirs (a daemonized database server)."""
    parents: dict[int, int] = {}
    cpu: dict[int, float] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            parts = Path(entry.path, "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        pid = int(entry.name)
        parents[pid] = int(parts[1])
        cpu[pid] = sum(int(x) for x in parts[11:15]) / TICK  # utime stime cutime cstime
    roots = {os.getpid()}
    total = sum(cpu.get(pid, 0.0) for pid in set(also))
    roots.update(also)
    for pid in cpu:
        if pid in roots:
            continue
        ancestor, hops = parents.get(pid), 0
        while ancestor and ancestor not in roots and hops < 64:
            ancestor, hops = parents.get(ancestor), hops + 1
        if ancestor in roots:
            total += cpu[pid]
    return total


class CpuMonitor:
    """How much CPU processes other than ours burned during a phase.

    Ours = this process, every child it has waited for (``os.times``) and every
    live descendant (workers, redis-server) read from /proc, plus the process
    trees of ``also`` (the throw-away PostgreSQL server, which ``pg_ctl``
    detaches). On a shared machine, a phase with a high ``foreign_pct`` is not
    a clean measurement; it is reported next to it.
    """

    def __init__(self, also: Iterable[int] = ()):
        self.also = list(also)

    def snapshot(self) -> dict[str, float]:
        busy, steal, total = _system_busy()
        t = os.times()
        ours = t.user + t.system + t.children_user + t.children_system
        ours += _live_descendants_cpu(self.also)
        return {"busy": busy, "steal": steal, "total": total, "ours": ours,
                "wall": time.monotonic()}

    @staticmethod
    def delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
        wall = max(after["wall"] - before["wall"], 1e-9)
        cores = os.cpu_count() or 1
        busy = after["busy"] - before["busy"]
        ours = after["ours"] - before["ours"]
        foreign = max(busy - ours, 0.0)
        return {"wall_s": wall, "busy_pct": 100 * busy / (wall * cores),
                "ours_pct": 100 * min(ours, busy) / (wall * cores),
                "foreign_pct": 100 * foreign / (wall * cores),
                "steal_pct": 100 * (after["steal"] - before["steal"]) / (wall * cores)}

    def wait_quiet(self, max_wait: float, threshold_pct: float = 15.0,
                   window: float = 1.0) -> dict[str, Any]:
        """Wait (up to ``max_wait`` s) for a ``window`` in which others use < threshold CPU."""
        start = time.monotonic()
        last: dict[str, float] = {}
        while True:
            before = self.snapshot()
            time.sleep(window)
            last = self.delta(before, self.snapshot())
            waited = time.monotonic() - start
            if last["foreign_pct"] < threshold_pct or waited >= max_wait:
                quiet = last["foreign_pct"] < threshold_pct
                if not quiet:
                    log(f"machine still busy after {waited:.0f}s "
                        f"(others use {last['foreign_pct']:.0f}% of the CPUs); measuring anyway")
                elif waited > window * 1.5:
                    log(f"waited {waited:.0f}s for other processes to quiet down")
                return {"waited_s": waited, "quiet": quiet,
                        "foreign_pct": last["foreign_pct"]}
