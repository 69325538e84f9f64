"""Time limits on both backends, with real ``runworkers`` supervisors and worker processes.

Soft limits raise ``SoftTimeLimitExceeded`` inside the task; hard limits end the
task whatever it is doing (the supervisor SIGKILLs its worker process), and the
killed task never runs again when the broker gives its message back.
"""

from __future__ import annotations

import json
import re
import signal

import pytest
from django.conf import settings as django_settings
from django.test import override_settings

from coati_queue.core.exceptions import InvalidJob
from coati_queue.core.jobs import Job
from coati_queue.core.tasks import registry
from coati_queue.models import TaskResult
from coati_queue.selection import get_queue_driver
from tests.conftest import describe_failure, worker_pids
from tests.test_workers import wait_for, worker_backend  # noqa: F401 - a fixture
from tests.testapp.models import Mark

pytestmark = pytest.mark.django_db(transaction=True)

#: Worker heartbeats and Redis leases in fractions of a second, so redelivery is quick.
FAST = {"HEARTBEAT_INTERVAL": 0.2, "REDIS_HEARTBEAT_TIMEOUT": 1.0}
HARD_ERROR = re.compile(r"^Hard time limit of ([12]) s exceeded after \1\.\d+ s$")


def wait_on(process, condition, what: str, timeout: float = 30):
    """``wait_for`` a condition while the supervisor runs; on failure the supervisor is
    stopped and its output is part of the message."""
    try:
        return wait_for(condition, timeout=timeout, what=what, process=process)
    except pytest.fail.Exception:
        process.kill()
        pytest.fail(f"timed out waiting for {what}; runworkers said:\n"
                    f"{process.communicate(timeout=30)[0]}")


def fast_env() -> dict[str, str]:
    return {"COATI_TEST_QUEUE_OVERRIDES": json.dumps(FAST)}


def marks(label: str, what: str = "run") -> int:
    return Mark.objects.filter(label=label, queue=what).count()


def record(task_id: str) -> TaskResult:
    return TaskResult.objects.get(pk=task_id)


def stop(process) -> str:
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=60)
    assert process.returncode == 0, output
    return output


# -- soft limits ------------------------------------------------------------------------------
def test_soft_limit_raises_inside_the_task_which_cleans_up(worker_backend, run_workers):
    name, driver = worker_backend
    final = driver.enqueue("tests.limits_soft_cleanup", f"soft-{name}")
    retried = driver.enqueue("tests.limits_soft_retried", f"soft-retried-{name}")

    completed = run_workers(name, "--threads", "2")
    assert completed.returncode == 0, describe_failure(completed)

    failed = record(final)
    assert failed.status == "failed", describe_failure(completed)
    assert re.fullmatch(r"Soft time limit of 0\.3 s exceeded after 0\.\d+ s", failed.error)
    assert "SoftTimeLimitExceeded" in failed.traceback
    assert marks(f"soft-{name}", "cleanup") == 1  # the task's own cleanup ran
    # retry_on=(Exception,) (the default) does not retry a time limit: one attempt only.
    assert (failed.attempts, marks(f"soft-{name}")) == (1, 1)

    # retry_on=(SoftTimeLimitExceeded,) does: both attempts overran, the last is final.
    again = record(retried)
    assert (again.status, again.attempts) == ("failed", 2), describe_failure(completed)
    assert again.error.startswith("Soft time limit of 0.2 s exceeded")
    assert marks(f"soft-retried-{name}") == 2


# -- hard limits ------------------------------------------------------------------------------
def test_hard_limit_kills_the_worker_process_and_nothing_runs_twice(worker_backend,
                                                                   start_worker):
    name, driver = worker_backend
    process = start_worker(name, "--processes", "2", threads=1, env=fast_env())
    wait_on(process, lambda: len(worker_pids(process.pid)) == 2, "two worker processes")
    first_pids = set(worker_pids(process.pid))
    ignores = driver.enqueue("tests.limits_ignores_soft", f"ignores-{name}")
    in_c = driver.enqueue("tests.limits_blocks_in_c", f"in-c-{name}")
    normal = [driver.enqueue("tests.mark", f"normal-{name}-{i}") for i in range(3)]
    overran = TaskResult.objects.filter(pk__in=[ignores, in_c])

    wait_on(process, lambda: overran.filter(status="failed").count() == 2,
            "both overrunning tasks to be failed")
    wait_on(process, lambda: TaskResult.objects.filter(pk__in=normal, status="completed")
            .count() == 3, "the normal tasks to complete")
    # Each killed process was replaced (on Dramatiq one process may have prefetched both
    # tasks: it is killed for the first, its replacement gets the other and is killed too).
    wait_on(process, lambda: len(worker_pids(process.pid)) == 2
            and set(worker_pids(process.pid)) != first_pids,
            "two worker processes, new ones among them")

    for task_id in (ignores, in_c):
        killed = record(task_id)
        assert HARD_ERROR.match(killed.error), killed.error
        assert "killed worker process" in killed.traceback
        assert killed.attempts == 1  # max_retries=3, but a time limit is final
    assert marks(f"ignores-{name}", "soft-ignored") == 1  # the soft limit fired first

    # The killed processes' messages come back through the broker (Huey: the freed
    # reservation; Dramatiq: the unacked message once the supervisor dropped the
    # process's heartbeat) and are dropped by the claim: the records are final.
    wait_on(process, lambda: driver.missing_jobs([(ignores, 1, "default"),
                                                  (in_c, 1, "default")]) == {ignores, in_c},
            "the killed tasks' messages to be consumed")
    assert (marks(f"ignores-{name}"), marks(f"in-c-{name}")) == (1, 1)
    assert set(overran.values_list("status", flat=True)) == {"failed"}
    assert set(overran.values_list("lost_count", flat=True)) == {0}

    output = stop(process)
    assert len(re.findall(r"Hard time limit of [12] s exceeded after", output)) == 2, output
    assert output.count("was killed by SIGKILL (killed at a hard time limit)") == 2, output


def test_a_hard_limit_named_in_retry_on_retries_at_the_next_attempt(queue_env, huey_path,
                                                                     start_worker):
    queue_env(COATI_QUEUE_BACKEND="huey", COATI_QUEUE_PATH=huey_path)
    driver = get_queue_driver("huey")
    process = start_worker("huey", threads=2, env=fast_env())
    task_id = driver.enqueue("tests.limits_hard_retried", "hard-retried")

    wait_for(lambda: record(task_id).status == "failed", what="the last attempt to fail",
             process=process)
    failed = record(task_id)
    assert failed.attempts == 2
    assert failed.error.startswith("Hard time limit of 0.7 s exceeded after 0.")
    wait_for(lambda: driver.missing_jobs([(task_id, 2, "default")]) == {task_id},
             what="every message of the task to be consumed", process=process)
    assert marks("hard-retried") == 2  # one run per attempt, none repeated
    stop(process)


# -- defaults ---------------------------------------------------------------------------------
def _queue_settings(**extra):
    return {**django_settings.COATI_QUEUE, **extra}


def test_default_limits_apply_to_tasks_without_their_own_and_none_turns_them_off(
        queue_env, huey_path, run_workers):
    queue_env(COATI_QUEUE_BACKEND="huey", COATI_QUEUE_PATH=huey_path)
    driver = get_queue_driver()
    assert (driver.settings.TIME_LIMIT, driver.settings.SOFT_TIME_LIMIT) == (300_000, 240_000)
    default_task = registry.get("tests.limits_default")
    job = driver.build_job(default_task, ["x", 1], {})
    assert (job.time_limit, job.soft_time_limit) == (300_000, 240_000)
    # A task's 0 turns a limit off for that task.
    job = driver.build_job(registry.get("tests.limits_no_limits"), [], {})
    assert (job.time_limit, job.soft_time_limit) == (None, None)

    with override_settings(COATI_QUEUE=_queue_settings(SOFT_TIME_LIMIT=300, TIME_LIMIT=10_000)):
        limited = get_queue_driver().enqueue("tests.limits_default", "defaulted", 5)
    with override_settings(COATI_QUEUE=_queue_settings(SOFT_TIME_LIMIT=None, TIME_LIMIT=None)):
        off = get_queue_driver()
        assert off.build_job(default_task, ["x", 1], {}).time_limit is None
        unlimited = off.enqueue("tests.limits_default", "unlimited", 0.6)

    completed = run_workers("huey", "--threads", "2")
    assert completed.returncode == 0, describe_failure(completed)
    assert record(limited).status == "failed"
    assert record(limited).error.startswith("Soft time limit of 0.3 s exceeded")
    assert marks("defaulted", "cleanup") == 1
    assert (record(unlimited).status, record(unlimited).result) == ("completed", "unlimited")


def test_dramatiq_applies_no_time_limit_of_its_own(queue_env, redis_url):
    queue_env(COATI_QUEUE_BACKEND="dramatiq", REDIS_URL=redis_url)
    driver = get_queue_driver("dramatiq")
    names = {type(item).__name__ for item in driver.broker.middleware}
    assert "TimeLimit" not in names  # its 10-minute default applied to every task
    task_id = driver.enqueue("tests.limits_no_limits")
    (body,) = driver.client.hvals("coati:default.msgs")
    message = json.loads(body)
    assert set(message["options"]) == {"redis_message_id"}
    envelope = message["args"][0]
    assert (envelope["id"], envelope["time_limit"], envelope["soft_time_limit"]) == (
        task_id, None, None)


def test_the_envelope_carries_and_validates_the_soft_limit():
    job = Job(task="tests.add", soft_time_limit=1_500)
    assert Job.decode(job.encode()).soft_time_limit == 1_500
    for bad in (0, -1, "1000", 1.5, 10 ** 12):
        data = {**job.to_dict(), "soft_time_limit": bad}
        with pytest.raises(InvalidJob, match="soft_time_limit must be null or 1.."):
            Job.decode(json.dumps(data))
