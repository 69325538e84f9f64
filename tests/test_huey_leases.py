"""Huey file backend leases: a claimed job stays on disk until it ran, and comes back
when its worker dies. Real ``runworkers`` processes, real SIGKILLs, real flocks."""

from __future__ import annotations

import datetime
import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid

import pytest

from coati_queue.backends.huey_storage import QueueFileStorage
from coati_queue.models import DeadLetter, TaskResult
from coati_queue.selection import get_queue_driver
from tests.conftest import REPO_ROOT, describe_failure, sigkill_runworkers, worker_env
from tests.test_workers import wait_for
from tests.testapp.models import Mark

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def driver(queue_env, huey_path):
    queue_env(COATI_QUEUE_BACKEND="huey", COATI_QUEUE_PATH=huey_path)
    return get_queue_driver("huey")


def queue_names(path: str) -> list[str]:
    return sorted(os.listdir(os.path.join(path, "queue")))


def reserved_files(path: str) -> dict[str, str]:
    """``{file name: reservation token}`` over every reservation folder."""
    root = os.path.join(path, "reserved")
    found = {}
    for token in os.listdir(root):
        if os.path.isdir(os.path.join(root, token)):
            found.update({name: token for name in os.listdir(os.path.join(root, token))})
    return found


def stop_hard(process: subprocess.Popen) -> None:
    """SIGTERM until the worker exits: the first is a graceful stop (the task keeps
    running), a later one makes it ``os._exit`` without acking."""
    deadline = time.monotonic() + 30
    while process.poll() is None:
        if time.monotonic() > deadline:
            pytest.fail("the worker ignored repeated SIGTERMs")
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=0.2)
        except subprocess.TimeoutExpired:
            continue


@pytest.mark.parametrize("stop, reclaim_by", [("sigkill", "maintain"),
                                               ("sigterm_twice", "worker_start")])
def test_a_killed_workers_job_stays_reserved_and_runs_again(stop, reclaim_by, driver, huey_path,
                                                            start_worker, run_workers):
    label = f"lease-{stop}"
    process = start_worker("huey", threads=2)
    job_id = driver.enqueue("tests.lease_slow", label, 120)
    (queued_name,) = queue_names(huey_path)
    assert queued_name.endswith(job_id)
    wait_for(lambda: Mark.objects.filter(label=label).exists(), what="the task to start",
             process=process)
    wait_for(lambda: TaskResult.objects.filter(pk=job_id, status="processing").exists(),
             what="its record to say processing", process=process)

    reserved = reserved_files(huey_path)
    assert list(reserved) == [queued_name]  # claimed under its own name, not deleted
    assert queue_names(huey_path) == []
    assert driver.missing_jobs([(job_id, 1, "default")]) == set()
    assert driver.maintain() == 0  # its worker is alive

    if stop == "sigkill":
        sigkill_runworkers(process)
    else:
        stop_hard(process)
        assert process.returncode == 1
    assert reserved_files(huey_path) == reserved  # still on disk, still reserved
    assert driver.missing_jobs([(job_id, 1, "default")]) == set()
    assert Mark.objects.filter(label=label).count() == 1

    if reclaim_by == "maintain":
        assert driver.maintain() == 1
        assert queue_names(huey_path) == [queued_name]  # back, same place in the order
        assert os.listdir(os.path.join(huey_path, "reserved")) == []  # folder and lock gone
        assert driver.maintain() == 0
    completed = run_workers("huey")  # a burst worker reclaims at start when not done above
    assert completed.returncode == 0, describe_failure(completed)

    assert Mark.objects.filter(label=label).count() == 2  # run again by the new worker
    assert queue_names(huey_path) == []
    assert os.listdir(os.path.join(huey_path, "reserved")) == []
    record = TaskResult.objects.get(pk=job_id)
    assert (record.status, record.result) == ("completed", 2), describe_failure(completed)
    # Given back marked as a redelivery: the new worker claimed the record and counted
    # the loss (at WORKER_LOST_LIMIT losses it would have failed it instead).
    assert (record.lost_count, record.attempts) == (1, 1)


def test_graceful_stop_acks_and_removes_the_reservation_folder(driver, huey_path, start_worker):
    process = start_worker("huey", threads=2)
    job_id = driver.enqueue("tests.lease_slow", "lease-graceful", 1)
    wait_for(lambda: Mark.objects.filter(label="lease-graceful").exists(),
             what="the task to start", process=process)
    assert len(reserved_files(huey_path)) == 1
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=30)
    assert process.returncode == 0, output
    assert TaskResult.objects.get(pk=job_id).status == "completed", output
    assert queue_names(huey_path) == []
    assert os.listdir(os.path.join(huey_path, "reserved")) == []


HOLDER = """
import sys, threading
from coati_queue.backends.huey_storage import QueueFileStorage
storage = QueueFileStorage("coati", sys.argv[1])
threads = [threading.Thread(target=storage.dequeue) for _ in range(int(sys.argv[2]))]
for thread in threads:
    thread.start()
for thread in threads:
    thread.join()
print("held", flush=True)
sys.stdin.read()
"""

RECLAIMER = """
import sys
from coati_queue.backends.huey_storage import QueueFileStorage
storage = QueueFileStorage("coati", sys.argv[1])
print("ready", flush=True)
sys.stdin.readline()
print(storage.reclaim_lost(), flush=True)
"""


def python(script: str, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", script, *args], cwd=REPO_ROOT,
                            env=worker_env(), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True)


def test_concurrent_reclaims_give_back_each_file_exactly_once(huey_path):
    storage = QueueFileStorage("coati", huey_path)
    ids = [str(uuid.uuid4()) for _ in range(60)]
    storage.enqueue_many([(b"{}", 0, job_id) for job_id in ids])
    names = set(queue_names(huey_path))

    holders = [python(HOLDER, huey_path, "20") for _ in range(2)]  # two workers to kill
    for holder in holders:
        assert holder.stdout.readline().strip() == "held"
    mine = threading.Thread(target=storage.dequeue)  # a live reservation: never reclaimed
    mine.start()
    mine.join()
    (held_here,) = [n for n, token in reserved_files(huey_path).items()
                    if token.startswith(f"{os.getpid()}-")]
    assert len(reserved_files(huey_path)) == 41
    for holder in holders:
        holder.kill()
        holder.communicate(timeout=30)

    reclaimers = [python(RECLAIMER, huey_path) for _ in range(2)]
    for reclaimer in reclaimers:
        assert reclaimer.stdout.readline().strip() == "ready"
    for reclaimer in reclaimers:  # released together
        reclaimer.stdin.write("go\n")
        reclaimer.stdin.flush()
    counts = []
    for reclaimer in reclaimers:
        output, _ = reclaimer.communicate(timeout=60)
        assert reclaimer.returncode == 0, output
        counts.append(int(output.strip()))

    assert sum(counts) == 40, counts
    assert set(queue_names(huey_path)) == names - {held_here}
    assert list(reserved_files(huey_path)) == [held_here]
    assert storage.reclaim_lost() == 0
    assert storage.release_reservations() == 1  # a graceful exit gives its own back
    assert set(queue_names(huey_path)) == names
    assert os.listdir(os.path.join(huey_path, "reserved")) == []


def test_stray_files_are_ignored_by_depths_dequeue_purge_and_workers(driver, huey_path,
                                                                     run_workers):
    storage = driver.huey.storage  # makes the directories
    queue_dir, schedule_dir = (os.path.join(huey_path, d) for d in ("queue", "schedule"))
    strays = [os.path.join(queue_dir, name) for name in
              (".fffd-notes.swp", "zzzz-not-ours", "fffd-000000000000-0000000000-1.tmp")]
    strays += [os.path.join(schedule_dir, "notes.swp"),
               os.path.join(huey_path, "reserved", "README")]
    for stray in strays:
        with open(stray, "wb") as handle:
            handle.write(b"not a message")
    for folder in (os.path.join(queue_dir, "fffd-subdir"), os.path.join(schedule_dir, "sub")):
        os.mkdir(folder)
        strays.append(folder)

    queued = driver.enqueue("tests.add", 1, 2)
    delayed = driver.enqueue("tests.add", 3, 4, delay=3600)
    depths = driver.queue_depths()
    assert depths["default"] == {"queued": 1, "delayed": 1}
    assert storage.queue_size() == 1
    assert driver.missing_jobs([(queued, 1, "default"), (delayed, 1, "default")]) == set()
    assert driver.purge() == 2
    assert all(os.path.exists(stray) for stray in strays)
    assert storage.dequeue() is None

    task_id = driver.enqueue("tests.add", 20, 1)
    completed = run_workers("huey")
    assert completed.returncode == 0, describe_failure(completed)
    assert driver.get_task_result(task_id)["result"] == 21
    assert all(os.path.exists(stray) for stray in strays)
    assert sorted(os.listdir(os.path.join(huey_path, "reserved"))) == ["README"]


def test_missing_jobs_reports_exactly_the_jobs_without_a_file(driver, huey_path):
    storage = driver.huey.storage
    queue_dir, schedule_dir = (os.path.join(huey_path, d) for d in ("queue", "schedule"))
    queued = driver.enqueue("tests.add", 1, 1)
    delayed = driver.enqueue("tests.add", 2, 2, delay=3600)
    reserved = driver.enqueue("tests.add", 3, 3, queue="high")
    done = driver.enqueue("tests.add", 4, 4, queue="high")
    taker = threading.Thread(target=storage.dequeue)  # holds it, never acks
    taker.start()
    taker.join()
    (reserved_name,) = reserved_files(huey_path)
    assert reserved_name.endswith(reserved)
    assert storage.describe_message(storage.dequeue())[1] == done
    storage.ack()
    # Files whose name carries no job id are read: one in the queue, one being
    # written (.tmp), one delayed under Huey's own (older) schedule name.
    unnamed = driver.enqueue("tests.add", 5, 5, queue="low")
    in_progress = driver.enqueue("tests.add", 6, 6, queue="low")
    for name in queue_names(huey_path):
        if name.endswith(unnamed):
            os.rename(os.path.join(queue_dir, name), os.path.join(queue_dir, name[:-37]))
        if name.endswith(in_progress):
            os.rename(os.path.join(queue_dir, name), os.path.join(queue_dir, name + ".tmp"))
    older_delayed = driver.enqueue("tests.add", 7, 7, delay=3600)
    (older_name,) = [n for n in os.listdir(schedule_dir) if n.endswith(older_delayed)]
    os.rename(os.path.join(schedule_dir, older_name), os.path.join(schedule_dir, older_name[:12]))
    never = str(uuid.uuid4())

    asked = [(job_id, 1, "default") for job_id in
             (queued, delayed, reserved, done, unnamed, in_progress, older_delayed, never)]
    assert driver.missing_jobs(asked) == {done, never}
    assert driver.missing_jobs([]) == set()

    # Due delayed jobs move into the queue (renamed, or copied for the older name).
    assert storage.read_schedule(datetime.datetime(2100, 1, 1)) == []
    assert os.listdir(schedule_dir) == []
    assert any(n.endswith(delayed) for n in queue_names(huey_path))
    assert any(n.endswith(older_delayed) for n in queue_names(huey_path))
    assert driver.missing_jobs(asked) == {done, never}
    assert storage.release_reservations() == 1
    assert driver.missing_jobs(asked) == {done, never}


def test_foreign_messages_are_dead_lettered_once_not_given_back_forever(driver, huey_path,
                                                                        run_workers):
    """A message Huey could not run would stay reserved, be given back and be taken
    again forever; it must become a dead letter and be acked like any other."""
    storage = driver.huey.storage
    priority = driver.settings.queue_priority("default")
    base = {"id": None, "retries": 0, "retry_delay": 0, "priority": priority, "eta": None,
            "expires": None, "expires_resolved": None, "on_complete": None, "on_error": None,
            "chord_config": None}
    foreign = [
        {**base, "name": "someone.elses.task", "args": [], "kwargs": {}},
        {**base, "name": "coati_queue.backends.huey.coati.execute", "args": [1, 2],
         "kwargs": {}},
        {**base, "name": "coati_queue.backends.huey.coati.dead_letter", "args": ["x"],
         "kwargs": {"y": 1}},
    ]
    for fields in foreign:
        storage.enqueue(json.dumps({"huey": fields}).encode(), priority)
    storage.enqueue(b'{"huey": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", priority)
    valid = driver.enqueue("tests.add", 1, 2)

    completed = run_workers("huey")
    assert completed.returncode == 0, describe_failure(completed)
    assert driver.get_task_result(valid)["result"] == 3
    assert queue_names(huey_path) == []
    assert os.listdir(os.path.join(huey_path, "reserved")) == []
    assert "dequeued but not run" not in completed.stderr + completed.stdout
    reasons = sorted(DeadLetter.objects.values_list("reason", flat=True))
    assert len(reasons) == 4, reasons  # each recorded once
    assert sum("not a coati_queue message" in r for r in reasons) == 1, reasons
    assert sum("unexpected arguments" in r for r in reasons) == 2, reasons
