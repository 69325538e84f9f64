"""``runworkers`` as a supervisor: real processes, real signals, real SIGKILLs.

Children that die are replaced, a crash loop at start ends the supervisor, children
are recycled after N tasks or above a memory bound, a graceful stop is bounded, and
``--queues`` is the consumption order.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections import Counter

import pytest
from django.core.management import call_command

from coati_queue.core.middleware import Middleware
from coati_queue.models import TaskResult, WorkerHeartbeat
from coati_queue.selection import get_queue_driver
from coati_queue.supervisor import QUICK_DEATH
from tests.conftest import describe_failure, worker_pids
from tests.test_workers import wait_for, worker_backend  # noqa: F401 - a fixture
from tests.testapp.models import Mark

pytestmark = pytest.mark.django_db(transaction=True)


class CrashAtStart(Middleware):
    """Loaded by ``COATI_QUEUE['MIDDLEWARE']``: every worker process dies as it starts."""

    def worker_started(self, driver, worker):
        raise SystemExit(3)


@pytest.fixture
def huey(queue_env, huey_path):
    queue_env(COATI_QUEUE_BACKEND="huey", COATI_QUEUE_PATH=huey_path)
    return get_queue_driver("huey")


def overrides(**settings) -> dict[str, str]:
    return {"COATI_TEST_QUEUE_OVERRIDES": json.dumps(settings)}


def stop(process: subprocess.Popen, timeout: float = 60) -> str:
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=timeout)
    assert process.returncode == 0, output
    return output


def results(task_ids: list[str]) -> list:
    return [TaskResult.objects.get(pk=task_id).result for task_id in task_ids]


# -- replacing children -----------------------------------------------------------------------
def test_a_killed_child_is_replaced_at_once(huey, start_worker):
    process = start_worker("huey", "--processes", "2", threads=1,
                           env=overrides(HEARTBEAT_INTERVAL=0.2))
    wait_for(lambda: WorkerHeartbeat.objects.filter(pid__in=worker_pids(process.pid)).count()
             == 2, what="two ready worker processes", process=process)
    before = set(worker_pids(process.pid))
    victim = min(before)
    # Past QUICK_DEATH: a child dying right after it started is replaced only after a
    # short delay (no hot loop of forks); a child that ran a while is replaced at once.
    up_since = time.monotonic()
    wait_for(lambda: time.monotonic() - up_since >= QUICK_DEATH, what="the children to age")

    killed_at = time.monotonic()
    os.kill(victim, signal.SIGKILL)
    deadline = killed_at + 30
    while not set(worker_pids(process.pid)) - before:  # polled tightly: this is the measure
        assert time.monotonic() < deadline, "no replacement within 30 s"
        time.sleep(0.001)
    forked = time.monotonic() - killed_at
    (new,) = set(worker_pids(process.pid)) - before
    wait_for(lambda: WorkerHeartbeat.objects.filter(pid=new).exists(),
             what="the replacement's heartbeat", process=process)
    ready = time.monotonic() - killed_at
    print(f"\nkill-to-replacement: new process after {forked * 1000:.0f} ms, "
          f"consuming (first heartbeat) after {ready * 1000:.0f} ms")
    assert victim not in worker_pids(process.pid)
    assert len(worker_pids(process.pid)) == 2

    # The replacement works.
    task_id = huey.enqueue("tests.add", 2, 3)
    wait_for(lambda: TaskResult.objects.get(pk=task_id).status == "completed",
             what="a task after the replacement", process=process)
    output = stop(process)
    assert f"Worker process {victim} was killed by SIGKILL" in output


def test_children_that_crash_at_start_make_the_supervisor_give_up(huey, run_workers):
    completed = run_workers("huey", "--processes", "2", timeout=120, env=overrides(
        MIDDLEWARE=["tests.test_supervisor.CrashAtStart"]))
    assert completed.returncode == 1, describe_failure(completed)
    assert "runworkers stopped: 5 worker processes in a row failed to start" in completed.stderr
    assert "exited with status 3" in completed.stderr
    assert "giving up" in completed.stderr
    assert completed.stderr.count("before it was ready") == 5


def test_an_unknown_queue_is_refused_before_any_process_starts(huey, run_workers):
    completed = run_workers("huey", "--queues", "low,nope")
    assert completed.returncode == 1
    assert "Unknown queue(s) nope" in completed.stderr
    assert "Started worker process" not in completed.stderr


def test_burst_mode_with_several_children_drains_and_exits(huey, run_workers):
    task_ids = [huey.enqueue("tests.limits_pid", f"burst-{i}") for i in range(8)]
    completed = run_workers("huey", "--processes", "3", "--threads", "1")
    assert completed.returncode == 0, describe_failure(completed)
    assert all(isinstance(pid, int) for pid in results(task_ids))
    assert completed.stderr.count("finished: its queues are empty") == 3


# -- recycling --------------------------------------------------------------------------------
def test_max_tasks_per_child_recycles_the_process(huey, run_workers):
    task_ids = [huey.enqueue("tests.limits_pid", f"recycle-{i}") for i in range(14)]
    completed = run_workers("huey", "--max-tasks-per-child", "5", "--threads", "1")
    assert completed.returncode == 0, describe_failure(completed)
    per_process = Counter(results(task_ids))
    context = f"tasks per process: {per_process}\n{describe_failure(completed)}"
    assert sum(per_process.values()) == 14, context  # every task done, each once
    assert len(per_process) >= 3, context
    # One thread: the process stops taking work right after its 5th task (it counts).
    assert sorted(per_process.values(), reverse=True) == [5, 5, 4], context
    assert completed.stderr.count("(--max-tasks-per-child 5): finishing in-flight tasks") == 2
    assert completed.stderr.count("(5 tasks run, --max-tasks-per-child 5); starting another") \
        == 2
    assert Mark.objects.filter(label__startswith="recycle-").count() == 14


def test_max_memory_per_child_recycles_the_process_after_its_task(huey, run_workers):
    big = huey.enqueue("tests.limits_allocate", 120, 1.0)
    later = [huey.enqueue("tests.limits_pid", f"after-{i}") for i in range(3)]
    completed = run_workers("huey", "--max-memory-per-child", "100", "--threads", "1")
    assert completed.returncode == 0, describe_failure(completed)
    record = TaskResult.objects.get(pk=big)
    assert record.status == "completed"  # it finished; the process was replaced after it
    assert record.result not in results(later), describe_failure(completed)
    assert "MiB resident, --max-memory-per-child 100" in completed.stderr


# -- stopping ---------------------------------------------------------------------------------
def test_shutdown_timeout_bounds_a_graceful_stop_and_gives_the_task_back(huey, start_worker,
                                                                        run_workers):
    process = start_worker("huey", "--shutdown-timeout", "1", threads=2)
    task_id = huey.enqueue("tests.limits_slow_once", "shutdown", 60)
    wait_for(lambda: Mark.objects.filter(label="shutdown").exists(), what="the task to start",
             process=process)
    wait_for(lambda: TaskResult.objects.filter(pk=task_id, status="processing").exists(),
             what="its record to say processing", process=process)

    signalled = time.monotonic()
    output = stop(process)  # exit status 0: the bound is the configured behaviour
    took = time.monotonic() - signalled
    assert took < 1 + 5, f"the stop took {took:.1f} s\n{output}"
    assert "Shutdown timeout of 1 s reached: 1 task(s) still running are given back" in output
    record = TaskResult.objects.get(pk=task_id)
    assert record.status == "pending"  # given back, not counted as a lost run

    completed = run_workers("huey")  # the next worker takes the reservation back
    assert completed.returncode == 0, describe_failure(completed)
    record.refresh_from_db()
    assert (record.status, record.lost_count) == ("completed", 0)
    assert Mark.objects.filter(label="shutdown").count() == 2


# -- options ----------------------------------------------------------------------------------
def test_verbose_and_verbosity_levels_set_the_log_level(huey, run_workers):
    debug_line = "Huey consumer in pid"  # coati_queue's, at DEBUG
    huey_line = "Huey consumer started with"  # Huey's own, at INFO
    normal = run_workers("huey")
    assert normal.returncode == 0, describe_failure(normal)
    assert debug_line not in normal.stderr and huey_line not in normal.stderr

    verbose = run_workers("huey", "--verbose")
    assert verbose.returncode == 0, describe_failure(verbose)
    assert debug_line in verbose.stderr and huey_line not in verbose.stderr

    everything = run_workers("huey", "-v", "3")
    assert everything.returncode == 0, describe_failure(everything)
    assert debug_line in everything.stderr and huey_line in everything.stderr

    quiet = run_workers("huey", "-v", "0")
    assert quiet.returncode == 0, describe_failure(quiet)
    assert "Started worker process" not in quiet.stderr

    refused = run_workers("huey", "--worker-type", "greenlet")
    assert refused.returncode != 0
    assert "'greenlet' is not supported" in refused.stderr


def test_queues_are_consumed_in_the_order_given(worker_backend, run_workers):
    name, driver = worker_backend
    # Sent in QUEUES order (high first): only the worker's own order can put low first.
    for queue in ("high", "low"):
        driver.enqueue_many("tests.mark", [((f"{queue}-{i}", queue), {}) for i in range(2)],
                            queue=queue)
    completed = run_workers(name, "--queues", "low,high", "--threads", "1")
    assert completed.returncode == 0, describe_failure(completed)
    order = list(Mark.objects.order_by("started", "id").values_list("queue", flat=True))
    assert order == ["low", "low", "high", "high"]


# -- what each worker runs --------------------------------------------------------------------
def test_queuestats_shows_the_running_task_and_its_age(huey, start_worker):
    from io import StringIO

    process = start_worker("huey", threads=2, env=overrides(HEARTBEAT_INTERVAL=0.2))
    task_id = huey.enqueue("tests.limits_slow_once", "stats", 60)
    beat = wait_for(lambda: WorkerHeartbeat.objects.filter(
        current_task_id=task_id, current_task_started_at__isnull=False).first(),
        what="the heartbeat to name the running task", process=process)
    assert (beat.current_task_name, beat.running_tasks) == ("tests.limits_slow_once", 1)
    wait_for(lambda: beat.current_task_seconds() >= 1.0, what="the task to run a second")

    out = StringIO()
    call_command("queuestats", "--json", stdout=out)
    (row,) = [w for w in json.loads(out.getvalue())["workers"] if w["pid"] == beat.pid]
    assert row["running_tasks"] == 1
    assert row["current_task"]["id"] == task_id
    assert row["current_task"]["name"] == "tests.limits_slow_once"
    assert row["current_task"]["running_seconds"] >= 1.0

    table = StringIO()
    call_command("queuestats", stdout=table)
    assert f"running tests.limits_slow_once ({task_id}) for " in table.getvalue()
    assert process.poll() is None


def test_the_heartbeat_of_an_idle_worker_names_no_task(huey, start_worker):
    process = start_worker("huey", threads=1, env=overrides(HEARTBEAT_INTERVAL=0.2))
    task_id = huey.enqueue("tests.add", 1, 1)
    wait_for(lambda: TaskResult.objects.get(pk=task_id).status == "completed",
             what="the task", process=process)
    wait_for(lambda: WorkerHeartbeat.objects.filter(
        pid__in=worker_pids(process.pid), running_tasks=0, current_task_id__isnull=True,
        processed=1).exists(), what="an idle heartbeat", process=process)
    stop(process)
