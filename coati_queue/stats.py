"""Queue statistics for ``manage.py queuestats`` and the admin overview.

:func:`collect_stats` is the one place that builds the snapshot (the queue
overview, also when the broker does not answer, and ``queuestats`` read it):
broker depths from the driver (None when the broker cannot be asked), task
counts from ``TaskResult`` (one grouped query), workers from ``WorkerHeartbeat``
(one query) and dead letters waiting for a person (one grouped query).
Everything returned is plain JSON (strings, numbers, lists, dicts) and holds no
password.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from django.db.models import Count
from django.utils import timezone

from .dead_letters import waiting_counts
from .models import TaskResult, TaskStatus, WorkerHeartbeat

QUEUE_COLUMNS = ("queued", "delayed", "processing", "finished", "failed", "workers")
MAX_WORKERS_LISTED = 100


#: The key of ``task_counts_by_queue()`` that counts records waiting in the outbox.
UNSENT = "unsent"


def task_counts_by_queue() -> dict[str, dict[str, int]]:
    """``{queue: {status: n, "unsent": n}}`` from one ``GROUP BY queue, status, unsent``."""
    counts: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    rows = (TaskResult.objects.order_by().values_list("queue", "status", "unsent")
            .annotate(n=Count("id")))
    for queue, status, unsent, n in rows:
        counts[queue][status] += n
        if unsent:
            counts[queue][UNSENT] += n
    return counts


def degraded_state(driver: Any, counts: dict[str, dict[str, int]]) -> list[str]:
    """What is running in a degraded way right now, in words an operator can act on."""
    from .fallback import waiting_in_fallback

    settings = driver.settings
    findings = []
    if driver.name == "huey" and settings.BACKEND == "auto" and settings.REDIS_URL:
        findings.append("Redis did not answer when this process started: it runs on the Huey "
                        "fallback. Restart it once Redis is back; Dramatiq workers move the "
                        "fallback's jobs to Redis.")
    unsent = sum(by_status.get(UNSENT, 0) for by_status in counts.values())
    if unsent:
        findings.append(f"{unsent} task(s) wait in the outbox: the broker refused them after "
                        "commit; workers send them when it answers.")
    for path, jobs in waiting_in_fallback(driver).items():
        findings.append(f"{jobs} job(s) wait on the Huey fallback at {path}; Dramatiq workers "
                        "move them to Redis.")
    return findings


def worker_rows(lost_after: float, now=None) -> list[dict[str, Any]]:
    """Workers that have not stopped cleanly (alive, or lost: no heartbeat lately), each
    with the task it runs now (the longest-running one) as of its last heartbeat."""
    now = now or timezone.now()
    heartbeats = (WorkerHeartbeat.objects.filter(stopped_at__isnull=True)
                  .order_by("-last_seen")[:MAX_WORKERS_LISTED])
    return [{
        "worker_id": beat.worker_id,
        "hostname": beat.hostname,
        "pid": beat.pid,
        "queues": list(beat.queues or []),
        "last_seen": beat.last_seen.isoformat(),
        "alive": beat.is_alive(lost_after, now),
        "running_tasks": beat.running_tasks,
        "current_task": current_task(beat, now),
    } for beat in heartbeats]


def host_rows(workers: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Workers per machine: ``{"hostname", "alive", "lost", "running_tasks"}`` for each
    host with a worker listed, so several hosts on one Redis read at a glance."""
    hosts: dict[str, dict[str, Any]] = {}
    for worker in workers:
        host = hosts.setdefault(worker["hostname"], {"hostname": worker["hostname"],
                                                     "alive": 0, "lost": 0,
                                                     "running_tasks": 0})
        if worker["alive"]:
            host["alive"] += 1
            host["running_tasks"] += worker.get("running_tasks") or 0
        else:
            host["lost"] += 1
    return sorted(hosts.values(), key=lambda host: host["hostname"])


def current_task(beat: WorkerHeartbeat, now=None) -> dict[str, Any] | None:
    """``{"id", "name", "started_at", "running_seconds"}`` of the worker's longest-running
    task, or None when it runs none."""
    if beat.current_task_id is None or beat.current_task_started_at is None:
        return None
    return {
        "id": str(beat.current_task_id),
        "name": beat.current_task_name,
        "started_at": beat.current_task_started_at.isoformat(),
        "running_seconds": round(beat.current_task_seconds(now) or 0.0, 1),
    }


def dead_letter_counts() -> dict[str, Any]:
    """Dead letters not requeued yet: how many, and from where (worker, broker, file)."""
    by_source = waiting_counts()
    return {"waiting": sum(by_source.values()), "by_source": by_source}


def collect_stats(driver: Any, *, ask_broker: bool = True) -> dict[str, Any]:
    """Per-queue depths, task counts and live workers of ``driver``'s backend.

    ``ask_broker=False`` (or no driver: it could not be built) is the snapshot of a
    broker that does not answer: the same shape, its numbers (``queued``, ``delayed``)
    None, no degraded-state findings, the rest from the database.
    """
    from .conf import get_settings

    settings = driver.settings if driver is not None else get_settings()
    depths = driver.queue_depths() if ask_broker and driver is not None else None
    counts = task_counts_by_queue()
    workers = worker_rows(settings.WORKER_LOST_AFTER)
    queues = {}
    for name in settings.QUEUES:
        depth = depths.get(name, {}) if depths is not None else None
        by_status = counts.get(name, {})
        queues[name] = {
            "queued": None if depth is None else int(depth.get("queued", 0)),
            "delayed": None if depth is None else int(depth.get("delayed", 0)),
            "processing": by_status.get(TaskStatus.PROCESSING, 0),
            "finished": by_status.get(TaskStatus.COMPLETED, 0),
            "failed": by_status.get(TaskStatus.FAILED, 0),
            "workers": sum(1 for w in workers if w["alive"] and name in w["queues"]),
        }
    return {
        "backend": driver.name if driver is not None else "",
        "reason": driver.reason if driver is not None else "",
        "location": driver.describe() if driver is not None else "",
        "queues": queues,
        "workers": workers,
        "hosts": host_rows(workers),
        "dead_letters": dead_letter_counts(),
        "degraded": degraded_state(driver, counts) if depths is not None else [],
    }
