"""Queue statistics for ``manage.py queuestats`` and the admin overview.

:func:`collect_stats` is the one place that gathers them: broker depths from
the driver, task counts from ``TaskResult`` (one grouped query) and workers
from ``WorkerHeartbeat`` (one query). Everything returned is plain JSON
(strings, numbers, lists, dicts) and holds no password.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from django.db.models import Count
from django.utils import timezone

from .models import TaskResult, TaskStatus, WorkerHeartbeat

QUEUE_COLUMNS = ("queued", "delayed", "processing", "finished", "failed", "workers")
MAX_WORKERS_LISTED = 100


def task_counts_by_queue() -> dict[str, dict[str, int]]:
    """``{queue: {status: n}}`` from one ``GROUP BY queue, status`` query."""
    counts: dict[str, dict[str, int]] = defaultdict(dict)
    rows = (TaskResult.objects.order_by().values_list("queue", "status")
            .annotate(n=Count("id")))
    for queue, status, n in rows:
        counts[queue][status] = n
    return counts


def worker_rows(lost_after: float, now=None) -> list[dict[str, Any]]:
    """Workers that have not stopped cleanly (alive, or lost: no heartbeat lately)."""
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
    } for beat in heartbeats]


def collect_stats(driver: Any) -> dict[str, Any]:
    """Per-queue depths, task counts and live workers of ``driver``'s backend."""
    settings = driver.settings
    depths = driver.queue_depths()
    counts = task_counts_by_queue()
    workers = worker_rows(settings.WORKER_LOST_AFTER)
    queues = {}
    for name in settings.QUEUES:
        depth = depths.get(name, {})
        by_status = counts.get(name, {})
        queues[name] = {
            "queued": int(depth.get("queued", 0)),
            "delayed": int(depth.get("delayed", 0)),
            "processing": by_status.get(TaskStatus.PROCESSING, 0),
            "finished": by_status.get(TaskStatus.COMPLETED, 0),
            "failed": by_status.get(TaskStatus.FAILED, 0),
            "workers": sum(1 for w in workers if w["alive"] and name in w["queues"]),
        }
    return {
        "backend": driver.name,
        "reason": driver.reason,
        "location": driver.describe(),
        "queues": queues,
        "workers": workers,
    }
