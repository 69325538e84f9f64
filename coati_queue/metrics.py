"""Prometheus metrics read from the database at scrape time.

A fresh ``CollectorRegistry`` per scrape with one custom collector: nothing is
kept in process memory, so every web process answers the same numbers (the
task records are the source of truth) and nothing leaks between tests.
Every query is a GROUP BY with a bounded result: per task name, per queue,
or over the last hour through the indexed ``finished_at``.
"""

from __future__ import annotations

import datetime
import logging
from typing import Iterator

from django.db.models import Count, DurationField, ExpressionWrapper, F, Q, Sum
from django.utils import timezone
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (CounterMetricFamily, GaugeMetricFamily,
                                    HistogramMetricFamily, Metric)

from .conf import get_settings
from .models import PayrollBatch, TaskResult, TaskStatus, WorkerHeartbeat

logger = logging.getLogger("coati_queue")

DURATION_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)
DURATION_WINDOW = datetime.timedelta(hours=1)
BATCHES_EXPORTED = 100


class QueueCollector:
    """Yields every coati_* metric family; no ``describe``, so registering runs no query."""

    def __init__(self, now: datetime.datetime | None = None):
        self.now = now or timezone.now()

    def collect(self) -> Iterator[Metric]:
        yield from self.task_counts()
        yield self.task_durations()
        yield from self.queue_depths()
        yield self.workers_alive()
        yield from self.batches()

    def task_counts(self) -> Iterator[Metric]:
        tasks = CounterMetricFamily("coati_tasks", "Task records by task and outcome "
                                    "(enqueued counts every record).", labels=["task", "status"])
        per_task: dict[str, dict[str, int]] = {}
        rows = TaskResult.objects.order_by().values_list("task_name", "status").annotate(
            n=Count("pk"))
        for name, status, count in rows:
            per_task.setdefault(name, {})[status] = count
        for name in sorted(per_task):
            counts = per_task[name]
            tasks.add_metric([name, "enqueued"], sum(counts.values()))
            tasks.add_metric([name, "succeeded"], counts.get(TaskStatus.COMPLETED, 0))
            tasks.add_metric([name, "failed"], counts.get(TaskStatus.FAILED, 0))
        yield tasks

        retries = CounterMetricFamily("coati_task_retries", "Extra attempts (attempts - 1) "
                                      "of task records.", labels=["task"])
        rows = (TaskResult.objects.filter(attempts__gt=1).order_by().values_list("task_name")
                .annotate(extra=Sum(F("attempts") - 1)))
        for name, extra in sorted(rows):
            retries.add_metric([name], extra or 0)
        yield retries

    def task_durations(self) -> Metric:
        """Histogram of run time of tasks finished in the last hour, one grouped query."""
        family = HistogramMetricFamily("coati_task_duration_seconds", "Run time of tasks "
                                       "finished in the last hour.", labels=["task"])
        duration = ExpressionWrapper(F("finished_at") - F("started_at"),
                                     output_field=DurationField())
        buckets = {f"le_{i}": Count("pk", filter=Q(duration__lte=datetime.timedelta(seconds=b)))
                   for i, b in enumerate(DURATION_BUCKETS)}
        rows = (TaskResult.objects
                .filter(finished_at__gte=self.now - DURATION_WINDOW, started_at__isnull=False,
                        finished_at__isnull=False)
                .annotate(duration=duration).order_by().values("task_name")
                .annotate(n=Count("pk"), total=Sum("duration"), **buckets))
        for row in sorted(rows, key=lambda r: r["task_name"]):
            points = [(str(b), row[f"le_{i}"]) for i, b in enumerate(DURATION_BUCKETS)]
            points.append(("+Inf", row["n"]))
            total = row["total"]
            seconds = total.total_seconds() if isinstance(total, datetime.timedelta) else 0.0
            family.add_metric([row["task_name"]], points, sum_value=max(seconds, 0.0))
        return family

    def queue_depths(self) -> Iterator[Metric]:
        from .monitoring import broker_errors
        from .redis_url import scrub
        from .selection import get_queue_driver

        depth = GaugeMetricFamily("coati_queue_depth", "Messages waiting in the broker, "
                                  "ready to run.", labels=["queue"])
        delayed = GaugeMetricFamily("coati_queue_delayed", "Messages waiting for their ETA "
                                    "(retries, delays).", labels=["queue"])
        up = GaugeMetricFamily("coati_broker_up", "1 when the broker answered this scrape.")
        try:
            depths = get_queue_driver().queue_depths()
        except broker_errors() as exc:
            logger.warning("Metrics: queue depths unavailable: %s",
                           scrub(str(exc), get_settings().REDIS_URL))
            up.add_metric([], 0)
        else:
            for name in sorted(depths):
                depth.add_metric([name], depths[name].get("queued", 0))
                delayed.add_metric([name], depths[name].get("delayed", 0))
            up.add_metric([], 1)
        yield from (depth, delayed, up)

    def workers_alive(self) -> Metric:
        lost_after = datetime.timedelta(seconds=get_settings().WORKER_LOST_AFTER)
        alive = WorkerHeartbeat.objects.filter(stopped_at__isnull=True,
                                               last_seen__gte=self.now - lost_after).count()
        return GaugeMetricFamily("coati_workers_alive", "Workers with a recent heartbeat.",
                                 value=alive)

    def batches(self) -> Iterator[Metric]:
        running = PayrollBatch.objects.running().count()
        yield GaugeMetricFamily("coati_batches_running", "Payroll batches running.",
                                value=running)
        ratio = GaugeMetricFamily("coati_batch_progress_ratio", "Processed / total items of "
                                  "each active payroll batch.", labels=["batch"])
        active = (PayrollBatch.objects.active().order_by("-created_at")
                  .values_list("pk", "total", "succeeded", "failed")[:BATCHES_EXPORTED])
        for pk, total, succeeded, failed in active:
            ratio.add_metric([str(pk)], (succeeded + failed) / total if total else 0.0)
        yield ratio


def render_metrics(now: datetime.datetime | None = None) -> bytes:
    """The Prometheus text exposition of the current state."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(QueueCollector(now))  # type: ignore[arg-type]
    return generate_latest(registry)
