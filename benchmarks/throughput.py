"""Throughput and latency of no-op tasks: coati_queue vs. plain Dramatiq and Huey.

Usage (from the repository root, nothing else heavy running; ~2-4 minutes)::

    .venv/bin/python benchmarks/throughput.py                      # everything
    .venv/bin/python benchmarks/throughput.py --tasks 2000 --skip-raw
    .venv/bin/python benchmarks/throughput.py --backends dramatiq --raw dramatiq

What it measures, for ``--tasks`` (10,000) no-op tasks, with tracking on (the
default: a ``TaskResult`` row per task) on a fresh temporary SQLite file (WAL,
the project's options, via ``benchmarks/bench_settings.py``) and a dedicated
``redis-server`` on a free port, stopped at the end:

(a) enqueue: ``tests.noop.send()`` one by one from this process (tasks/s), then
    ``driver.enqueue_many`` of all of them at once (seconds; target <= 1 s).
(b) drain: with the ``enqueue_many`` batch queued, start
    ``manage.py runworkers --processes 2 --threads 8 --burst`` and time until
    it exits AND every record is ``completed`` in the database. Reported as
    wall time (process start-up and burst shutdown included) and as the
    processing window (first ``started_at`` to last ``finished_at``).
(c) latency: workers already running (non-burst, warmed up), ``--latency-tasks``
    (2,000) tasks sent one by one at ``--rate`` (500/s); p50/p90/p99 of
    ``started_at - enqueued_at`` from the ``TaskResult`` rows; then SIGTERM.

The same, in the same run, for plain tasks (``benchmarks/raw_workers.py``) that
only ``INCR`` a Redis counter (one pipelined round trip per task):

* raw Dramatiq: ``dramatiq benchmarks.raw_workers --processes 2 --threads 8``
  (RedisBroker, default middleware, env ``dramatiq_worker_timeout=100`` = the
  idle poll coati's Dramatiq worker uses; the stock default is 1000 ms);
* raw Huey on Redis and on files: two ``huey_consumer ... -k thread -w 8``
  processes on the same storage. Huey's consumer is one process, so two of them
  with 8 threads each is the exact equivalent of ``runworkers --processes 2
  --threads 8`` (which runs one Huey consumer of 8 threads per process);
  ``-k process -w 2`` would give 2-way concurrency, ``-w 16`` a single GIL.
  FileHuey polls with ``-d 0.005 -b 1.15 -m 0.05``, the intervals coati's Huey
  worker uses (stock defaults 0.1 s / 10 s would only add idle sleep);
  RedisHuey blocks on BRPOP.

A raw drain ends when the counter reaches N and the queue is empty (then the
CLI is stopped, not timed). Raw enqueue is one by one (``actor.send()``,
calling the Huey task); neither library has a bulk enqueue.

coati's Huey backend gets a fresh storage directory for each phase (one-by-one,
bulk + drain, latency). Creating files where thousands were just deleted can
cost several times more on some file systems (on a journal-less ext4, the inode
allocator skips recently deleted inodes: measured 0.7 s -> 4.5 s of kernel time
for 10,000 files), which would measure the file system rather than coati. That
case is still reported, separately: ``enqueue_many`` again into the directory
the drain has just emptied ("after churn"). Machine load from other processes
is measured per phase (``others %``); ``--quiet-wait`` waits for a quiet window
before each variant.

Output: a table on stdout, ratios, and ``benchmarks/results/throughput.json``.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
if sys.path and Path(sys.path[0]).resolve() == HERE:
    sys.path[0] = str(HERE.parent)  # import as ``benchmarks.*``, never shadow a library
elif str(HERE.parent) not in sys.path:
    sys.path.insert(0, str(HERE.parent))

from benchmarks._common import (  # noqa: E402
    BIN, CpuMonitor, RedisServer, checkpoint, fmt, latency_summary, log, pace, publish, ratio,
    raw_sql, remove_workdir, runworkers_command, setup_django, spawn, stop, table, use_backend,
    wait_for)

RAW_CHOICES = ("dramatiq", "huey-redis", "huey-file")


# -- coati_queue ----------------------------------------------------------------------------
def clear_records() -> None:
    raw_sql("DELETE FROM coati_queue_taskresult")
    checkpoint()


def completed_count() -> int:
    from coati_queue.models import TaskResult

    return TaskResult.objects.filter(status="completed").count()


class PartTimer:
    """Times the tracking INSERT and the broker send inside one ``enqueue_many`` call.

    Instrumentation of the harness only: instance attributes shadow the two
    methods for the duration of the call; coati_queue's code is unchanged.
    """

    def __init__(self, driver):
        from coati_queue.tracking import TrackingMiddleware

        self.driver = driver
        self.tracking = next(m for m in driver.middleware.middleware
                             if isinstance(m, TrackingMiddleware))
        self.parts: dict[str, dict[str, float]] = {}

    def _wrap(self, obj, attr: str, label: str) -> None:
        original = getattr(obj, attr)

        def timed(*a, **k):
            cpu, started = os.times(), time.perf_counter()
            try:
                return original(*a, **k)
            finally:
                self.parts[label] = {"s": time.perf_counter() - started,
                                     "sys_cpu_s": os.times().system - cpu.system}

        setattr(obj, attr, timed)

    def __enter__(self) -> "PartTimer":
        self._wrap(self.tracking, "before_enqueue", "db")
        self._wrap(self.driver, "send", "broker")
        return self

    def __exit__(self, *exc) -> None:
        del self.tracking.before_enqueue
        del self.driver.send


def bench_coati(backend: str, args, redis: RedisServer, workdir: Path) -> dict:
    from django.db.models import Max, Min

    from coati_queue.core.tasks import registry
    from coati_queue.models import TaskResult, WorkerHeartbeat
    from coati_queue.selection import get_queue_driver

    n = args.tasks

    def select(phase_name: str):
        """The backend, on a fresh Huey directory per phase (see the module docstring)."""
        huey_path = workdir / f"huey-{backend}-{phase_name}"
        if backend == "huey":
            huey_path.mkdir(mode=0o700)
        env = use_backend(backend, redis_url=redis.url if backend == "dramatiq" else None,
                          huey_path=str(huey_path) if backend == "huey" else None)
        driver = get_queue_driver()
        assert driver.name == backend, driver
        return env, driver

    redis.client().flushall()
    env, driver = select("one-by-one")
    noop = registry.get("tests.noop")
    logs = workdir / f"coati-{backend}.log"
    out: dict = {"variant": f"coati {backend}", "tasks": n, "cpu": {}}
    monitor: CpuMonitor = args.monitor
    out["quiet"] = monitor.wait_quiet(args.quiet_wait)

    # (a) enqueue -------------------------------------------------------------------------
    noop.send()  # builds the client and the DB connection
    driver.purge()
    clear_records()
    phase = monitor.snapshot()
    started = time.perf_counter()
    for _ in range(n):
        noop.send()
    elapsed = time.perf_counter() - started
    out["enqueue_one_by_one_s"] = elapsed
    out["enqueue_one_by_one_per_s"] = n / elapsed
    log(f"coati {backend}: {n} one-by-one enqueues in {elapsed:.2f}s ({n / elapsed:,.0f}/s)")
    driver.purge()
    clear_records()
    env, driver = select("bulk")
    noop.send()  # builds the client
    driver.purge()
    clear_records()

    calls = [((), {})] * n
    with PartTimer(driver) as parts:
        started = time.perf_counter()
        driver.enqueue_many(noop, calls)
        elapsed = time.perf_counter() - started
    out["enqueue_many_s"] = elapsed
    out["enqueue_many_parts"] = parts.parts
    out["cpu"]["enqueue"] = monitor.delta(phase, monitor.snapshot())
    depth = sum(d["queued"] for d in driver.queue_depths().values())
    assert depth == n and TaskResult.objects.count() == n, (depth, TaskResult.objects.count())
    log(f"coati {backend}: enqueue_many({n}) in {elapsed:.3f}s: tracking INSERT "
        f"{parts.parts['db']['s']:.3f}s, broker send {parts.parts['broker']['s']:.3f}s "
        f"(kernel {parts.parts['broker']['sys_cpu_s']:.2f}s)")

    # (b) drain ----------------------------------------------------------------------------
    checkpoint()
    phase = monitor.snapshot()
    t0 = time.time()
    process = spawn(runworkers_command(backend, args.processes, args.threads, burst=True),
                    logs, env)
    try:
        code = process.wait(timeout=args.timeout)
    except Exception:
        stop(process)
        raise
    t_exit = time.time()
    done = wait_for(lambda: completed_count() >= n, timeout=15, interval=0.05)
    t_done = max(t_exit, time.time() if completed_count() >= n else t_exit)
    out["cpu"]["drain"] = monitor.delta(phase, monitor.snapshot())
    agg = TaskResult.objects.aggregate(first=Min("started_at"), last=Max("finished_at"))
    window = (agg["last"] - agg["first"]).total_seconds() if agg["first"] and agg["last"] else None
    out.update({
        "drain_exit_code": code, "drain_all_completed": done,
        "drain_completed": completed_count(),
        "drain_wall_s": t_done - t0, "drain_per_s": n / (t_done - t0),
        "drain_startup_s": agg["first"].timestamp() - t0 if agg["first"] else None,
        "drain_window_s": window, "drain_window_per_s": n / window if window else None,
        "drain_exit_after_last_s": t_exit - agg["last"].timestamp() if agg["last"] else None,
    })
    log(f"coati {backend}: drain {out['drain_wall_s']:.2f}s wall "
        f"({out['drain_per_s']:,.0f}/s), window {fmt(window, '.2f')}s, exit code {code}, "
        f"{out['drain_completed']} completed")
    if backend == "huey":
        # The same bulk enqueue into the directory the drain has just emptied of n files.
        clear_records()
        with PartTimer(driver) as parts:
            started = time.perf_counter()
            driver.enqueue_many(noop, calls)
            out["enqueue_many_after_churn_s"] = time.perf_counter() - started
        out["enqueue_many_after_churn_parts"] = parts.parts
        log(f"coati {backend}: enqueue_many({n}) into the just-drained directory in "
            f"{out['enqueue_many_after_churn_s']:.3f}s: tracking INSERT "
            f"{parts.parts['db']['s']:.3f}s, broker send {parts.parts['broker']['s']:.3f}s "
            f"(kernel {parts.parts['broker']['sys_cpu_s']:.2f}s)")
        driver.purge()

    # (c) latency --------------------------------------------------------------------------
    clear_records()
    driver.purge()
    env, driver = select("latency")
    WorkerHeartbeat.objects.all().delete()
    process = spawn(runworkers_command(backend, args.processes, args.threads, burst=False),
                    logs, env)
    try:
        alive = wait_for(lambda: WorkerHeartbeat.objects.filter(stopped_at__isnull=True).count()
                         >= args.processes, timeout=60, interval=0.1)
        assert alive, f"workers did not start; see {logs}"
        driver.enqueue_many(noop, [((), {})] * 200)  # warm-up
        assert wait_for(lambda: completed_count() >= 200, timeout=60), "warm-up did not finish"
        clear_records()
        m = args.latency_tasks
        phase = monitor.snapshot()
        achieved = pace(m, args.rate, lambda i: noop.send())
        finished = wait_for(lambda: completed_count() >= m, timeout=60, interval=0.05)
    finally:
        code = stop(process)
    out["cpu"]["latency"] = monitor.delta(phase, monitor.snapshot())
    rows = list(TaskResult.objects.filter(status="completed").values_list("enqueued_at",
                                                                          "started_at"))
    latencies = [(s - e).total_seconds() for e, s in rows]
    out["latency"] = dict(latency_summary(latencies), rate=args.rate, achieved_rate=achieved,
                          all_completed=finished, stop_exit_code=code)
    log(f"coati {backend}: latency p50 {fmt(out['latency']['p50_ms'], '.1f')} ms, "
        f"p99 {fmt(out['latency']['p99_ms'], '.1f')} ms at {achieved:,.0f}/s")
    driver.purge()
    clear_records()
    return out


# -- raw Dramatiq / Huey ---------------------------------------------------------------------
def raw_commands(kind: str, args) -> list[list[str]]:
    if kind == "dramatiq":
        return [[str(BIN / "dramatiq"), "benchmarks.raw_workers", "--processes",
                 str(args.processes), "--threads", str(args.threads)]]
    instance = "redis_huey" if kind == "huey-redis" else "file_huey"
    command = [str(BIN / "huey_consumer"), f"benchmarks.raw_workers.{instance}", "-k", "thread",
               "-w", str(args.threads), "-n", "-q"]
    if kind == "huey-file":
        command += ["-d", "0.005", "-b", "1.15", "-m", "0.05"]
    return [command] * args.processes


def bench_raw(kind: str, args, redis: RedisServer, workdir: Path) -> dict:
    import benchmarks.raw_workers as rw

    n = args.tasks
    client = redis.client()
    client.flushall()
    if kind == "huey-file":
        rw.file_huey.storage.flush_queue()
    env = {"dramatiq_worker_timeout": "100"}
    logs = workdir / f"raw-{kind}.log"
    key = rw.KEY
    send = {"dramatiq": rw.noop.send, "huey-redis": rw.redis_huey_noop,
            "huey-file": rw.file_huey_noop}[kind]
    pending = {"dramatiq": lambda: client.llen("dramatiq:default"),
               "huey-redis": rw.redis_huey.pending_count,
               "huey-file": rw.file_huey.pending_count}[kind]
    count = lambda: int(client.get(f"{key}:count") or 0)  # noqa: E731
    out: dict = {"variant": f"raw {kind}", "tasks": n, "cpu": {}}
    monitor: CpuMonitor = args.monitor
    out["quiet"] = monitor.wait_quiet(args.quiet_wait)

    def reset_counters():
        client.delete(f"{key}:count", f"{key}:first", f"{key}:last", f"{key}:latency")

    def start_all():
        return [spawn(command, logs, env) for command in raw_commands(kind, args)]

    def stop_all(processes):
        return [stop(p, timeout=30) for p in processes]

    # (a) enqueue one by one -----------------------------------------------------------------
    send()  # connection warm-up, not timed: n + 1 messages are queued
    phase = monitor.snapshot()
    started = time.perf_counter()
    for _ in range(n):
        send()
    elapsed = time.perf_counter() - started
    out["enqueue_one_by_one_s"] = elapsed
    out["enqueue_one_by_one_per_s"] = n / elapsed
    out["enqueue_many_s"] = None
    out["cpu"]["enqueue"] = monitor.delta(phase, monitor.snapshot())
    log(f"raw {kind}: {n} one-by-one enqueues in {elapsed:.2f}s ({n / elapsed:,.0f}/s)")

    # (b) drain ----------------------------------------------------------------------------
    total = n + 1
    phase = monitor.snapshot()
    t0 = time.time()
    processes = start_all()
    try:
        done = wait_for(lambda: count() >= total, timeout=args.raw_timeout, interval=0.01)
        t_done = time.time()
        empty = wait_for(lambda: pending() == 0, timeout=5, interval=0.02)
    finally:
        codes = stop_all(processes)
    out["cpu"]["drain"] = monitor.delta(phase, monitor.snapshot())
    first = float(client.get(f"{key}:first") or 0) or None
    last = float(client.get(f"{key}:last") or 0) or None
    finished = count()
    window = (last - first) if first and last else None
    out.update({
        "drain_exit_code": max(codes), "drain_all_completed": done and empty,
        "drain_completed": finished, "drain_timed_out": not done,
        "drain_wall_s": t_done - t0, "drain_per_s": finished / (t_done - t0),
        "drain_startup_s": first - t0 if first else None,
        "drain_window_s": window, "drain_window_per_s": finished / window if window else None,
    })
    log(f"raw {kind}: drain {out['drain_wall_s']:.2f}s wall ({out['drain_per_s']:,.0f}/s), "
        f"window {fmt(window, '.2f')}s, {finished}/{total} done"
        + ("" if done else f" (TIMED OUT after {args.raw_timeout}s)"))
    if not done:
        if kind == "huey-file":
            rw.file_huey.storage.flush_queue()
        else:
            client.flushall()

    # (c) latency --------------------------------------------------------------------------
    reset_counters()
    processes = start_all()
    try:
        for _ in range(100):
            send()
        assert wait_for(lambda: count() >= 100, timeout=60), f"warm-up did not finish; {logs}"
        reset_counters()
        m = args.latency_tasks
        phase = monitor.snapshot()
        achieved = pace(m, args.rate, lambda i: send(time.time()))
        finished = wait_for(lambda: count() >= m, timeout=60, interval=0.05)
    finally:
        codes = stop_all(processes)
    out["cpu"]["latency"] = monitor.delta(phase, monitor.snapshot())
    latencies = [float(x) for x in client.lrange(f"{key}:latency", 0, -1)]
    out["latency"] = dict(latency_summary(latencies), rate=args.rate, achieved_rate=achieved,
                          all_completed=finished, stop_exit_code=max(codes))
    log(f"raw {kind}: latency p50 {fmt(out['latency']['p50_ms'], '.1f')} ms, "
        f"p99 {fmt(out['latency']['p99_ms'], '.1f')} ms at {achieved:,.0f}/s")
    client.flushall()
    return out


# -- report ---------------------------------------------------------------------------------
def report(results: dict[str, dict], args) -> tuple[str, dict]:
    headers = ["variant", "enqueue 1-by-1/s", "enqueue_many s", "(DB s", "broker s)",
               "drain wall s", "drain/s",
               "window/s", "startup s", "lat p50 ms", "p90 ms", "p99 ms", "max ms",
               "others %"]
    rows = []
    for r in results.values():
        lat = r.get("latency", {})
        rows.append([r["variant"], fmt(r.get("enqueue_one_by_one_per_s")),
                     fmt(r.get("enqueue_many_s"), ".3f", "n/a"),
                     fmt(r.get("enqueue_many_parts", {}).get("db", {}).get("s"), ".3f"),
                     fmt(r.get("enqueue_many_parts", {}).get("broker", {}).get("s"), ".3f"),
                     fmt(r.get("drain_wall_s"), ".2f") + ("" if r.get("drain_all_completed")
                                                          else "!"),
                     fmt(r.get("drain_per_s")), fmt(r.get("drain_window_per_s")),
                     fmt(r.get("drain_startup_s"), ".2f"), fmt(lat.get("p50_ms"), ".1f"),
                     fmt(lat.get("p90_ms"), ".1f"), fmt(lat.get("p99_ms"), ".1f"),
                     fmt(lat.get("max_ms"), ".1f"),
                     fmt(max((c["foreign_pct"] for c in r.get("cpu", {}).values()),
                             default=None), ".0f")])
    text = table(headers, rows)
    pairs = [("coati-dramatiq", "raw-dramatiq"), ("coati-huey", "raw-huey-file"),
             ("coati-huey", "raw-huey-redis"), ("coati-huey", "coati-dramatiq")]
    ratios = {}
    lines = []
    for a, b in pairs:
        if a in results and b in results:
            ra, rb = results[a], results[b]
            entry = {
                "drain_wall_rate": ratio(ra["drain_per_s"], rb["drain_per_s"]),
                "drain_window_rate": ratio(ra["drain_window_per_s"], rb["drain_window_per_s"]),
                "enqueue_one_by_one_rate": ratio(ra["enqueue_one_by_one_per_s"],
                                                 rb["enqueue_one_by_one_per_s"]),
                "latency_p50": ratio(ra["latency"]["p50_ms"], rb["latency"]["p50_ms"]),
                "latency_p99": ratio(ra["latency"]["p99_ms"], rb["latency"]["p99_ms"]),
            }
            ratios[f"{a} / {b}"] = entry
            lines.append(f"{a} / {b}: drain rate x{fmt(entry['drain_wall_rate'], '.2f')} "
                         f"(window x{fmt(entry['drain_window_rate'], '.2f')}), enqueue "
                         f"1-by-1 x{fmt(entry['enqueue_one_by_one_rate'], '.2f')}, latency p50 "
                         f"x{fmt(entry['latency_p50'], '.2f')}, p99 x{fmt(entry['latency_p99'], '.2f')}")
    targets = []
    for name in ("coati-dramatiq", "coati-huey"):
        if name in results:
            s = results[name]["enqueue_many_s"]
            targets.append(f"{name}: enqueue_many({args.tasks}) {s:.3f}s "
                           f"({'meets' if s <= 1.0 else 'MISSES'} the <= 1 s target)")
            churn = results[name].get("enqueue_many_after_churn_s")
            if churn is not None:
                parts = results[name]["enqueue_many_after_churn_parts"]
                targets.append(f"{name}: enqueue_many({args.tasks}) into the directory the "
                               f"drain had just emptied: {churn:.3f}s (DB {parts['db']['s']:.3f}s,"
                               f" files {parts['broker']['s']:.3f}s of which kernel "
                               f"{parts['broker']['sys_cpu_s']:.2f}s)")
    title = (f"{args.tasks:,} no-op tasks, workers {args.processes} processes x {args.threads} "
             f"threads, tracking on, SQLite WAL; latency: {args.latency_tasks:,} tasks at "
             f"{args.rate:,.0f}/s ('!' = not all tasks completed; 'others %' = highest share of "
             f"the machine's CPU used by processes not ours during a phase)")
    full = "\n".join([title, "", text, "", "Ratios (>1: first is faster; latency >1: first "
                      "is slower):", *("  " + x for x in lines), "", *targets])
    return full, ratios


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=int, default=10_000)
    parser.add_argument("--latency-tasks", type=int, default=2_000)
    parser.add_argument("--rate", type=float, default=500.0, help="latency send rate, tasks/s")
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--backends", default="dramatiq,huey",
                        help="coati_queue backends to run (comma-separated)")
    parser.add_argument("--raw", default=",".join(RAW_CHOICES),
                        help=f"raw variants to run, from {','.join(RAW_CHOICES)}")
    parser.add_argument("--skip-raw", action="store_true", help="no raw Dramatiq/Huey runs")
    parser.add_argument("--timeout", type=float, default=180, help="coati drain timeout, s")
    parser.add_argument("--raw-timeout", type=float, default=90,
                        help="raw drain timeout, s (Huey's FileStorage is O(n) per dequeue)")
    parser.add_argument("--quiet-wait", type=float, default=30,
                        help="seconds to wait, before each variant, for other processes on "
                             "the machine to quiet down (0: do not wait)")
    parser.add_argument("--json", default="throughput.json",
                        help="file name under benchmarks/results/")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    args = parser.parse_args()
    backends = [b for b in args.backends.split(",") if b]
    raws = [] if args.skip_raw else [r for r in args.raw.split(",") if r]
    for r in raws:
        if r not in RAW_CHOICES:
            parser.error(f"--raw {r!r}: choose from {', '.join(RAW_CHOICES)}")

    workdir = Path(tempfile.mkdtemp(prefix="coati-bench-throughput-"))
    redis = RedisServer(workdir / "redis")
    results: dict[str, dict] = {}
    began = time.time()
    try:
        redis.start()
        args.monitor = CpuMonitor()
        os.environ["BENCH_REDIS_URL"] = redis.url
        os.environ["BENCH_FILEHUEY_PATH"] = str(workdir / "filehuey")
        setup_django(workdir / "bench.sqlite3")
        log(f"work dir {workdir}, redis {redis.url}")
        for backend in backends:
            results[f"coati-{backend}"] = bench_coati(backend, args, redis, workdir)
        for kind in raws:
            results[f"raw-{kind}"] = bench_raw(kind, args, redis, workdir)
    finally:
        redis.stop()
        remove_workdir(workdir, args.keep)
    text, ratios = report(results, args)
    publish("throughput", args, began, text, ratios, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
