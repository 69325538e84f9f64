"""Prometheus metrics read from the database at scrape time.

A fresh ``CollectorRegistry`` per scrape with one custom collector: nothing is
kept in process memory, so every web process answers the same numbers (the
task records are the source of truth) and nothing leaks between tests.
Every query is a GROUP BY with a bounded result: per task name, per
queue or per dead-letter source; task names that are not registered share
one label, ``<unregistered>``, so planted names cannot create series.
Counters add the tallies of deleted records (``tallies.py``), so a TTL
cleanup never makes one go down.
"""

from __future__ import annotations

import datetime
import logging
from typing import Iterator

from django.utils import timezone
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (CounterMetricFamily, GaugeMetricFamily,
                                    HistogramMetricFamily, Metric)

from .conf import get_settings
from .models import PayrollBatch, WorkerHeartbeat
from .tallies import BUCKET_KEYS, DURATION_BUCKETS, current_totals

logger = logging.getLogger("coati_queue")

BATCHES_EXPORTED = 100
#: The one ``task`` label of every task name this process has not registered.
UNREGISTERED = "<unregistered>"


def bounded_by_task(totals: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
    """Per-task totals with the names that are not registered summed under one label.

    Task names reach the database from messages (a forged or stale message, a
    renamed task), so labelling by every name found would let anyone able to
    write to the broker create unbounded series; the registered names are
    bounded by the code.
    """
    from .core.tasks import registry

    merged: dict[str, dict[str, float]] = {}
    for name, counts in totals.items():
        target = merged.setdefault(name if name in registry else UNREGISTERED, {})
        for key, count in counts.items():
            target[key] = target.get(key, 0.0) + count
    return merged


class QueueCollector:
    """Yields every coati_* metric family; no ``describe``, so registering runs no query."""

    def __init__(self, now: datetime.datetime | None = None):
        self.now = now or timezone.now()

    def collect(self) -> Iterator[Metric]:
        yield from self.task_counts()
        yield from self.queue_depths()
        yield self.workers_alive()
        yield from self.batches()
        yield self.dead_letters()

    def task_counts(self) -> Iterator[Metric]:
        """Counters and the duration histogram: live records plus tallies of deleted ones;
        one ``task`` label per registered task, plus ``<unregistered>``."""
        totals = bounded_by_task(current_totals())
        tasks = CounterMetricFamily("coati_tasks", "Tasks by outcome (enqueued counts every "
                                    "task record ever written).", labels=["task", "status"])
        retries = CounterMetricFamily("coati_task_retries", "Extra attempts of tasks "
                                      "(attempts - 1).", labels=["task"])
        durations = HistogramMetricFamily("coati_task_duration_seconds", "Run time of "
                                          "finished tasks.", labels=["task"])
        for name in sorted(totals):
            counts = totals[name]
            for status in ("enqueued", "succeeded", "failed"):
                tasks.add_metric([name, status], counts.get(status, 0.0))
            retries.add_metric([name], counts.get("retries", 0.0))
            buckets = [(str(bound), counts.get(key, 0.0))
                       for bound, key in zip(DURATION_BUCKETS, BUCKET_KEYS)]
            buckets.append(("+Inf", counts.get("duration_count", 0.0)))
            durations.add_metric([name], buckets, sum_value=counts.get("duration_sum", 0.0))
        yield from (tasks, retries, durations)

    def queue_depths(self) -> Iterator[Metric]:
        from .redis_url import broker_errors, masked_broker_error
        from .selection import get_queue_driver

        depth = GaugeMetricFamily("coati_queue_depth", "Messages waiting in the broker, "
                                  "ready to run.", labels=["queue"])
        delayed = GaugeMetricFamily("coati_queue_delayed", "Messages waiting for their ETA "
                                    "(retries, delays).", labels=["queue"])
        up = GaugeMetricFamily("coati_broker_up", "1 when the broker answered this scrape.")
        try:
            depths = get_queue_driver().queue_depths()
        except broker_errors() as exc:
            logger.warning("Metrics: queue depths unavailable: %s", masked_broker_error(exc))
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

    def dead_letters(self) -> Metric:
        """Labelled by source only: task names and queues in a dead letter come from its
        payload, which anyone able to write to the broker controls (unbounded series)."""
        from .dead_letters import waiting_counts

        gauge = GaugeMetricFamily("coati_queue_dead_letters", "Dead letters not requeued yet "
                                  "(messages no worker could run), by where they were found.",
                                  labels=["source"])
        for source, count in sorted(waiting_counts().items()):
            gauge.add_metric([source], count)
        return gauge


def render_metrics(now: datetime.datetime | None = None) -> bytes:
    """The Prometheus text exposition of the current state."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(QueueCollector(now))  # type: ignore[arg-type]
    return generate_latest(registry)
