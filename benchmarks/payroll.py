"""Wall time of a payroll batch: coati_queue vs. plain per-employee tasks, a loop and a bulk pass.

Usage (from the repository root, nothing else heavy running; ~2-3 minutes)::

    .venv/bin/python benchmarks/payroll.py                     # 1,000 and 10,000 employees
    .venv/bin/python benchmarks/payroll.py --sizes 1000 --skip-raw
    .venv/bin/python benchmarks/payroll.py --backends dramatiq --variants sync,bulk
    .venv/bin/python benchmarks/payroll.py --db postgres        # a throw-away PostgreSQL

Setup: a fresh temporary SQLite file (WAL, the project's options, through
``benchmarks/bench_settings.py``; with ``--db postgres`` a throw-away PostgreSQL
cluster from ``tests/pg_cluster.py``, fsync off, or ``--database-url``), a
dedicated ``redis-server`` on a free port (stopped at the end), and ``seed_demo``
planillas ``bench_<size>`` of ``<size>`` employees (seed 42) plus a 50-employee
``bench_warm`` planilla for warm-ups. The period is 2024-01-01..2024-01-15
(biweekly); a batch pays the employees ``active_employee_ids`` returns for it (a
little under ``<size>``: inactive employees and those not employed in the period
are not paid).

Variants, for each size, each on fresh lines (a new batch, or standalone lines
deleted beforehand, not timed):

* ``coati huey`` / ``coati dramatiq``: ``manage.py runworkers --processes 2
  --threads 8`` started beforehand and warmed up (one 50-employee batch); the
  harness calls ``coati_queue.payroll.start_payroll_batch`` and the time is
  ``batch.finished_at - <harness clock just before the call>``: fan-out task,
  items, chunk tasks, per-employee items and task records (tracking on), lines.
  Targets: 10,000 employees <= 4 s on Dramatiq+Redis, <= 6 s on Huey+files.
* ``plain dramatiq``: a plain ``@dramatiq.actor`` per employee calling
  ``example_project.payroll.services.calculate_and_store`` (no tracking, no
  items, standalone lines), ``dramatiq benchmarks.raw_workers --processes 2
  --threads 8``; the harness lists the employees and sends one message each;
  the time runs to the last task's end (stamped in Redis by the task).
* ``plain huey``: the same task on ``FileHuey`` (Huey's own FileStorage), two
  ``huey_consumer benchmarks.raw_workers.file_huey -k thread -w 8`` processes.
* ``sync``: one process, a loop calling ``calculate_and_store`` per employee
  (the floor of doing it one by one, no queue).
* ``bulk``: one call of ``services.calculate_many`` over all employees (one
  read, bulk upserts), into a holder batch.

Output: a table, ratios, and ``benchmarks/results/payroll.json``.
"""

from __future__ import annotations

import argparse
import datetime
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

from benchmarks._common import (BIN, CpuMonitor, RedisServer, checkpoint,  # noqa: E402
                                database_label, fmt, log,
                                ratio, raw_sql, runworkers_command, setup_django,
                                publish, remove_workdir, spawn, stop, table, use_backend,
                                wait_for)

START, END = "2024-01-01", "2024-01-15"
WARM = "bench_warm"
WARM_SIZE = 50
VARIANTS = ("coati-huey", "coati-dramatiq", "plain-dramatiq", "plain-huey", "sync", "bulk")
TARGETS = {("coati-dramatiq", 10_000): 4.0, ("coati-huey", 10_000): 6.0}


def planilla(size: int) -> str:
    return f"bench_{size}"


def seed(sizes: list[int]) -> None:
    from django.core.management import call_command

    for code, size in [(WARM, WARM_SIZE)] + [(planilla(s), s) for s in sizes]:
        call_command("seed_demo", employees=size, planilla=code, seed=42, stdout=open(os.devnull, "w"))


def employee_ids(code: str) -> list[str]:
    from example_project.payroll.services import active_employee_ids

    return active_employee_ids(code, datetime.date.fromisoformat(START),
                               datetime.date.fromisoformat(END))


def delete_standalone_lines() -> None:
    raw_sql("DELETE FROM payroll_payrollline WHERE batch_id IS NULL")
    checkpoint()


def standalone_lines(code: str) -> int:
    from example_project.payroll.models import PayrollLine

    return PayrollLine.objects.filter(batch__isnull=True, planilla__code=code,
                                      period_start=START, period_end=END).count()


# -- coati_queue ----------------------------------------------------------------------------
def run_batch(code: str, timeout: float) -> dict:
    """Start a batch like a user would and wait for it; returns its figures."""
    from coati_queue.models import ACTIVE_BATCH_STATES, PayrollBatch
    from coati_queue.payroll import start_payroll_batch
    from example_project.payroll.models import PayrollLine

    t0 = time.time()
    batch = start_payroll_batch(code, START, END, usuario="bench")
    t_returned = time.time()
    finished = wait_for(lambda: PayrollBatch.objects.filter(pk=batch.pk).exclude(
        status__in=ACTIVE_BATCH_STATES).exists(), timeout=timeout, interval=0.02)
    t_seen = time.time()
    batch.refresh_from_db()
    end = batch.finished_at.timestamp() if batch.finished_at else None
    return {
        "batch_id": batch.pk, "status": batch.status, "finished": finished,
        "employees": batch.total, "succeeded": batch.succeeded, "failed": batch.failed,
        "lines": PayrollLine.objects.filter(batch_id=batch.pk).count(),
        "wall_s": (end - t0) if end else t_seen - t0,
        "start_call_s": t_returned - t0,
        "fanout_started_s": batch.started_at.timestamp() - t0 if batch.started_at else None,
        "seen_by_harness_s": t_seen - t0,
    }


def bench_coati(backend: str, sizes: list[int], args, redis: RedisServer, workdir: Path
                ) -> dict[int, dict]:
    from coati_queue.models import WorkerHeartbeat

    huey_path = workdir / f"huey-{backend}"
    huey_path.mkdir(mode=0o700, exist_ok=True)
    env = use_backend(backend, redis_url=redis.url if backend == "dramatiq" else None,
                      huey_path=str(huey_path) if backend == "huey" else None)
    if backend == "dramatiq":
        redis.client().flushall()
    logs = workdir / f"coati-{backend}.log"
    monitor: CpuMonitor = args.monitor
    results = {}
    WorkerHeartbeat.objects.all().delete()
    process = spawn(runworkers_command(backend, args.processes, args.threads, burst=False),
                    logs, env)
    try:
        alive = wait_for(lambda: WorkerHeartbeat.objects.filter(stopped_at__isnull=True).count()
                         >= args.processes, timeout=60, interval=0.1)
        assert alive, f"workers did not start; see {logs}"
        warm = run_batch(WARM, timeout=60)
        assert warm["finished"], f"warm-up batch did not finish: {warm}; see {logs}"
        log(f"coati {backend}: workers up, warm-up batch of {warm['employees']} in "
            f"{warm['wall_s']:.2f}s")
        for size in sizes:
            checkpoint()
            quiet = monitor.wait_quiet(args.quiet_wait)
            phase = monitor.snapshot()
            result = run_batch(planilla(size), timeout=args.timeout)
            result["cpu"] = monitor.delta(phase, monitor.snapshot())
            result["quiet"] = quiet
            results[size] = result
            log(f"coati {backend} {size}: {result['status']} {result['succeeded']}+"
                f"{result['failed']}/{result['employees']} in {result['wall_s']:.2f}s "
                f"(fan-out started at {fmt(result['fanout_started_s'], '.2f')}s)")
    finally:
        code = stop(process, timeout=60)
    for result in results.values():
        result["workers_exit_code"] = code
    return results


# -- plain per-employee tasks ---------------------------------------------------------------
def bench_plain(kind: str, sizes: list[int], args, redis: RedisServer, workdir: Path
                ) -> dict[int, dict]:
    import benchmarks.raw_workers as rw

    client = redis.client()
    client.flushall()
    key = rw.KEY
    count = lambda: int(client.get(f"{key}:count") or 0)  # noqa: E731
    if kind == "dramatiq":
        commands = [[str(BIN / "dramatiq"), "benchmarks.raw_workers", "--processes",
                     str(args.processes), "--threads", str(args.threads)]]
        send = rw.payroll_employee.send
    else:
        rw.file_huey.storage.flush_queue()
        commands = [[str(BIN / "huey_consumer"), "benchmarks.raw_workers.file_huey", "-k",
                     "thread", "-w", str(args.threads), "-n", "-q", "-d", "0.005", "-b", "1.15",
                     "-m", "0.05"]] * args.processes
        send = rw.file_huey_payroll
    env = {"dramatiq_worker_timeout": "100"}
    logs = workdir / f"plain-{kind}.log"
    monitor: CpuMonitor = args.monitor

    def reset():
        client.delete(f"{key}:count", f"{key}:first", f"{key}:last")

    results = {}
    delete_standalone_lines()
    processes = [spawn(command, logs, env) for command in commands]
    try:
        warm = employee_ids(WARM)
        for employee in warm:
            send(employee, WARM, START, END)
        assert wait_for(lambda: count() >= len(warm), timeout=60), f"warm-up failed; see {logs}"
        for size in sizes:
            delete_standalone_lines()
            reset()
            quiet = monitor.wait_quiet(args.quiet_wait)
            phase = monitor.snapshot()
            t0 = time.time()
            ids = employee_ids(planilla(size))
            for employee in ids:
                send(employee, planilla(size), START, END)
            t_sent = time.time()
            done = wait_for(lambda: count() >= len(ids), timeout=args.raw_timeout, interval=0.01)
            t_seen = time.time()
            last = float(client.get(f"{key}:last") or 0) or None
            result = {
                "employees": len(ids), "finished": done, "tasks_done": count(),
                "lines": standalone_lines(planilla(size)),
                "wall_s": (last - t0) if (done and last) else t_seen - t0,
                "enqueue_s": t_sent - t0, "seen_by_harness_s": t_seen - t0,
                "cpu": monitor.delta(phase, monitor.snapshot()), "quiet": quiet,
            }
            results[size] = result
            log(f"plain {kind} {size}: {result['lines']}/{len(ids)} lines in "
                f"{result['wall_s']:.2f}s (enqueue {result['enqueue_s']:.2f}s)"
                + ("" if done else f" TIMED OUT after {args.raw_timeout}s"))
            if not done:
                if kind == "dramatiq":
                    rw.broker.flush_all()
                else:
                    rw.file_huey.storage.flush_queue()
    finally:
        codes = [stop(p, timeout=30) for p in processes]
    for result in results.values():
        result["workers_exit_code"] = max(codes)
    return results


# -- in-process -----------------------------------------------------------------------------
def bench_sync(sizes: list[int], args) -> dict[int, dict]:
    from example_project.payroll.services import calculate_and_store

    monitor: CpuMonitor = args.monitor
    for employee in employee_ids(WARM)[:5]:  # warm caches and the connection
        calculate_and_store(employee, WARM, START, END)
    results = {}
    for size in sizes:
        delete_standalone_lines()
        quiet = monitor.wait_quiet(args.quiet_wait)
        phase = monitor.snapshot()
        t0 = time.time()
        ids = employee_ids(planilla(size))
        failed = 0
        for employee in ids:
            try:
                calculate_and_store(employee, planilla(size), START, END)
            except LookupError:
                failed += 1
        wall = time.time() - t0
        results[size] = {"employees": len(ids), "failed": failed, "wall_s": wall,
                         "lines": standalone_lines(planilla(size)), "finished": True,
                         "cpu": monitor.delta(phase, monitor.snapshot()), "quiet": quiet}
        log(f"sync {size}: {results[size]['lines']} lines in {wall:.2f}s")
    return results


def bench_bulk(sizes: list[int], args) -> dict[int, dict]:
    from coati_queue.models import BatchStatus, PayrollBatch
    from example_project.payroll.models import PayrollLine
    from example_project.payroll.services import calculate_many

    monitor: CpuMonitor = args.monitor
    results = {}
    for size in sizes:
        holder = PayrollBatch.objects.create(planilla_id=f"bulk-{planilla(size)}",
                                             periodo_inicio=START, periodo_fin=END,
                                             status=BatchStatus.COMPLETED)
        checkpoint()
        quiet = monitor.wait_quiet(args.quiet_wait)
        phase = monitor.snapshot()
        t0 = time.time()
        ids = employee_ids(planilla(size))
        done, errors = calculate_many(ids, planilla(size), START, END, batch_id=holder.pk)
        wall = time.time() - t0
        results[size] = {"employees": len(ids), "failed": len(errors), "wall_s": wall,
                         "lines": PayrollLine.objects.filter(batch_id=holder.pk).count(),
                         "finished": True, "cpu": monitor.delta(phase, monitor.snapshot()),
                         "quiet": quiet}
        log(f"bulk {size}: {results[size]['lines']} lines in {wall:.2f}s")
    return results


# -- report ---------------------------------------------------------------------------------
LABELS = {"coati-huey": "coati huey (files)", "coati-dramatiq": "coati dramatiq (redis)",
          "plain-dramatiq": "plain dramatiq actor/employee", "plain-huey": "plain FileHuey task/employee",
          "sync": "sync loop, 1 process", "bulk": "bulk calculate_many, 1 call"}


def report(results: dict[str, dict[int, dict]], sizes: list[int]) -> tuple[str, dict]:
    headers = ["variant"]
    for size in sizes:
        headers += [f"{size:,} wall s", f"{size:,} empl/s", "others %"]
    headers += ["notes"]
    rows = []
    for name in VARIANTS:
        if name not in results:
            continue
        row = [LABELS[name]]
        notes = []
        for size in sizes:
            r = results[name].get(size)
            if r is None:
                row += ["–", "–", "–"]
                continue
            ok = r.get("finished") and r.get("lines") == r["employees"] - r.get("failed", 0)
            row += [fmt(r["wall_s"], ".2f") + ("" if ok else "!"),
                    fmt(r["employees"] / r["wall_s"] if r["wall_s"] else None),
                    fmt(r["cpu"]["foreign_pct"], ".0f")]
            target = TARGETS.get((name, size))
            if target:
                notes.append(f"target <= {target:g} s: {'met' if r['wall_s'] <= target else 'MISSED'}")
            if r.get("status") and r["status"] != "completed":
                notes.append(f"{size}: {r['status']}")
        row.append("; ".join(notes))
        rows.append(row)
    text = table(headers, rows)
    pairs = [("coati-dramatiq", "plain-dramatiq"), ("coati-huey", "plain-huey"),
             ("coati-dramatiq", "sync"), ("coati-huey", "sync"), ("coati-dramatiq", "bulk"),
             ("coati-huey", "bulk"), ("coati-huey", "coati-dramatiq")]
    ratios: dict = {}
    lines = []
    for a, b in pairs:
        if a not in results or b not in results:
            continue
        for size in sizes:
            ra, rb = results[a].get(size), results[b].get(size)
            if ra and rb:
                value = ratio(ra["wall_s"], rb["wall_s"])
                ratios.setdefault(f"{a} / {b}", {})[size] = value
        parts = [f"{size:,}: x{fmt(ratios.get(f'{a} / {b}', {}).get(size), '.2f')}"
                 for size in sizes]
        lines.append(f"{a} / {b} (wall time; <1: {a} is faster): " + ", ".join(parts))
    employees = {size: next((r[size]["employees"] for r in results.values() if size in r), None)
                 for size in sizes}
    title = (f"Payroll batch, period {START}..{END}, {database_label()}, "
             f"workers 2 processes x 8 threads"
             f" ('!' = unfinished or lines missing; 'others %' = CPU share used by processes not"
             f" ours). Employees paid: "
             + ", ".join(f"{e:,} of {s:,} seeded" for s, e in employees.items() if e))
    return "\n".join([title, "", text, "", "Ratios:", *("  " + x for x in lines)]), ratios


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="1000,10000",
                        help="employees per batch, comma-separated (default 1000,10000)")
    parser.add_argument("--backends", default="dramatiq,huey",
                        help="coati_queue backends (comma-separated)")
    parser.add_argument("--variants", default=",".join(VARIANTS),
                        help=f"which of {','.join(VARIANTS)} to run")
    parser.add_argument("--skip-raw", action="store_true",
                        help="skip the plain Dramatiq/Huey per-employee variants")
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--timeout", type=float, default=120, help="coati batch timeout, s")
    parser.add_argument("--raw-timeout", type=float, default=120,
                        help="plain per-employee run timeout, s")
    parser.add_argument("--quiet-wait", type=float, default=30,
                        help="seconds to wait before each measurement for other processes on "
                             "the machine to quiet down (0: do not wait)")
    parser.add_argument("--json", default="payroll.json", help="file name under benchmarks/results/")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    parser.add_argument("--db", choices=("sqlite", "postgres"), default="sqlite",
                        help="a fresh SQLite file (default) or PostgreSQL: a throw-away "
                             "cluster (tests/pg_cluster.py), or --database-url")
    parser.add_argument("--database-url", default="",
                        help="with --db postgres: this (empty) database instead of a "
                             "throw-away cluster; its tables are created and filled")
    args = parser.parse_args()
    if args.database_url and args.db != "postgres":
        parser.error("--database-url needs --db postgres")
    sizes = [int(x) for x in args.sizes.split(",") if x]
    variants = [v for v in args.variants.split(",") if v]
    for v in variants:
        if v not in VARIANTS:
            parser.error(f"--variants {v!r}: choose from {', '.join(VARIANTS)}")
    backends = [b for b in args.backends.split(",") if b]
    variants = [v for v in variants if not (v.startswith("coati-") and v[6:] not in backends)]
    if args.skip_raw:
        variants = [v for v in variants if not v.startswith("plain-")]

    workdir = Path(tempfile.mkdtemp(prefix="coati-bench-payroll-"))
    redis = RedisServer(workdir / "redis")
    results: dict[str, dict[int, dict]] = {}
    began = time.time()
    cluster = None
    try:
        database_url = args.database_url or None
        if args.db == "postgres" and not database_url:
            from tests.pg_cluster import start_cluster

            cluster = start_cluster(database="coati_bench")
            database_url = cluster.url
        redis.start()
        args.monitor = CpuMonitor(also=[cluster.server_pid()] if cluster else [])
        os.environ["BENCH_REDIS_URL"] = redis.url
        os.environ["BENCH_FILEHUEY_PATH"] = str(workdir / "filehuey")
        setup_django(workdir / "bench.sqlite3", database_url)
        seed(sizes)
        checkpoint()
        log(f"work dir {workdir}, redis {redis.url}, seeded {', '.join(map(str, sizes))}")
        for name in variants:
            if name.startswith("coati-"):
                results[name] = bench_coati(name[6:], sizes, args, redis, workdir)
            elif name.startswith("plain-"):
                results[name] = bench_plain(name[6:], sizes, args, redis, workdir)
            elif name == "sync":
                results[name] = bench_sync(sizes, args)
            elif name == "bulk":
                results[name] = bench_bulk(sizes, args)
        text, ratios = report(results, sizes)
        publish("payroll", args, began, text, ratios,
                {name: {str(k): v for k, v in r.items()} for name, r in results.items()},
                period=[START, END])
    finally:
        redis.stop()
        remove_workdir(workdir, args.keep)
        if cluster is not None:
            from django.db import connections

            connections.close_all()
            cluster.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
