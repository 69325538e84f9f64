"""Per-task totals for the metrics counters, which must never go down.

The task records are the source of truth, but records are deleted (TTL
cleanup, the admin's delete action). A Prometheus counter that drops reads as
a reset and ``rate()`` then counts the whole remaining total again. So every
deletion goes through :func:`delete_task_records`, which first adds what the
records contributed to ``TaskTally`` rows; the exported value is then
"live records + tallies of deleted ones", and it only grows.

Both halves use one grouped query, :func:`aggregate`, so the definition of
each number lives in one place.
"""

from __future__ import annotations

from collections import defaultdict

from django.db import connections, router, transaction
from django.db.models import Count, F, Q, QuerySet, Sum

from .models import TaskResult, TaskStatus, TaskTally

DURATION_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)
BUCKET_KEYS = tuple(f"le_{bound}" for bound in DURATION_BUCKETS)
DELETE_CHUNK = 2000

Totals = dict[str, dict[str, float]]  # task name -> key -> value


def aggregate(records: QuerySet) -> Totals:
    """The counters' inputs of ``records``, per task name, in one GROUP BY."""
    timed = Q(duration_seconds__isnull=False)
    buckets = {key: Count("pk", filter=Q(duration_seconds__lte=bound))
               for key, bound in zip(BUCKET_KEYS, DURATION_BUCKETS)}
    rows = (records.order_by().values("task_name").annotate(
        enqueued=Count("pk"),
        succeeded=Count("pk", filter=Q(status=TaskStatus.COMPLETED)),
        failed=Count("pk", filter=Q(status=TaskStatus.FAILED)),
        retries=Sum(F("attempts") - 1, filter=Q(attempts__gt=1)),
        duration_count=Count("pk", filter=timed),
        duration_sum=Sum("duration_seconds", filter=timed),
        **buckets))
    return {row.pop("task_name"): {key: float(value or 0) for key, value in row.items()}
            for row in rows}


def retired_totals() -> Totals:
    totals: Totals = defaultdict(dict)
    for name, key, value in TaskTally.objects.values_list("task_name", "key", "value"):
        totals[name][key] = value
    return dict(totals)


def current_totals() -> Totals:
    """Live records plus the tallies of deleted ones: monotonic per task and key."""
    totals = aggregate(TaskResult.objects.all())
    for name, retired in retired_totals().items():
        live = totals.setdefault(name, {})
        for key, value in retired.items():
            live[key] = live.get(key, 0.0) + value
    return totals


def delete_task_records(records: QuerySet) -> int:
    """Delete ``records``, adding what they counted to the tallies first; returns how many.

    Chunks of ``DELETE_CHUNK`` rows, each locked, tallied and deleted in one
    transaction, so two cleanups racing cannot tally the same record twice.
    """
    using = router.db_for_write(TaskResult)
    features = connections[using].features
    skip_locked = features.has_select_for_update_skip_locked
    chunk_size = min(DELETE_CHUNK, features.max_query_params or DELETE_CHUNK)
    # A plain filter on the ids: FOR UPDATE refuses the DISTINCT of an admin search.
    candidates = TaskResult.objects.using(using).filter(pk__in=records.values("pk"))
    deleted = 0
    while True:
        with transaction.atomic(using=using):
            ids = list(candidates.order_by()
                       .select_for_update(**({"skip_locked": True} if skip_locked else {}))
                       .values_list("pk", flat=True)[:chunk_size])
            if not ids:
                return deleted
            chunk = TaskResult.objects.using(using).filter(pk__in=ids)
            _add_to_tallies(aggregate(chunk), using)
            _, per_model = chunk.delete()
            deleted += per_model.get(TaskResult._meta.label, 0)


def _add_to_tallies(totals: Totals, using: str) -> None:
    """Add to the tallies; concurrent cleanups never lose a count (no read-modify-write)."""
    keys = [(name, key, value) for name, values in totals.items()
            for key, value in values.items() if value]
    if not keys:
        return
    connection = connections[using]
    if connection.vendor in ("sqlite", "postgresql"):  # one statement: INSERT .. ON CONFLICT
        quote = connection.ops.quote_name
        table = quote(TaskTally._meta.db_table)
        name, key, value = quote("task_name"), quote("key"), quote("value")
        per_statement = (connection.features.max_query_params or 999) // 3
        with connection.cursor() as cursor:
            for start in range(0, len(keys), per_statement):
                part = keys[start:start + per_statement]
                rows = ", ".join(["(%s, %s, %s)"] * len(part))
                cursor.execute(
                    f"INSERT INTO {table} ({name}, {key}, {value}) VALUES {rows} "
                    f"ON CONFLICT ({name}, {key}) "
                    f"DO UPDATE SET {value} = {table}.{value} + excluded.{value}",
                    [param for row in part for param in row])
        return
    tallies = TaskTally.objects.using(using)
    tallies.bulk_create([TaskTally(task_name=name, key=key) for name, key, _ in keys],
                        ignore_conflicts=True)
    for name, key, value in keys:
        tallies.filter(task_name=name, key=key).update(value=F("value") + value)
