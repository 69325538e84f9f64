"""Prometheus counters only go up: deleting task records (TTL, admin) keeps their counts.

``rate()`` reads a counter that drops as a reset and counts the whole
remaining total again, so a nightly cleanup would show as a burst of
thousands of tasks. These tests scrape ``/metrics`` as Prometheus would
(through prometheus_client's own parser) before and after each deletion path.
"""

from __future__ import annotations

import datetime
from typing import Any

import pytest
from django.test import Client, override_settings
from django.urls import reverse
from django.utils import timezone
from prometheus_client.parser import text_string_to_metric_families

from coati_queue.models import TaskResult, TaskStatus, TaskTally
from coati_queue.tracking import delete_expired
from tests.conftest import queue_settings

pytestmark = pytest.mark.django_db

TOKEN = "metrics-token-for-tests"


@pytest.fixture(autouse=True)
def private_queue(tmp_path: Any) -> Any:
    with override_settings(COATI_QUEUE=queue_settings(tmp_path, METRICS_TOKEN=TOKEN)):
        yield


def scrape() -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    response = Client().get(reverse("coati_queue:metrics"),
                            HTTP_AUTHORIZATION=f"Bearer {TOKEN}")
    assert response.status_code == 200
    samples = {}
    for family in text_string_to_metric_families(response.content.decode()):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def finished_task(seconds: float, *, status: str = TaskStatus.COMPLETED, attempts: int = 1,
                  expired: bool = True, name: str = "tests.add") -> TaskResult:
    now = timezone.now()
    return TaskResult.objects.create(
        task_name=name, queue="default", backend="huey", status=status, attempts=attempts,
        started_at=now - datetime.timedelta(seconds=seconds), finished_at=now,
        duration_seconds=seconds,
        expires_at=now - datetime.timedelta(seconds=1) if expired else None)


def test_counters_and_histogram_survive_ttl_cleanup_and_admin_delete(django_user_model):
    finished_task(0.03)
    finished_task(0.2)
    finished_task(0.7, status=TaskStatus.FAILED, attempts=3)
    kept = finished_task(4.0, expired=False)
    TaskResult.objects.create(task_name="tests.add", queue="default", backend="huey")  # pending

    before = scrape()
    assert value(before, "coati_tasks_total", task="tests.add", status="enqueued") == 5
    assert value(before, "coati_tasks_total", task="tests.add", status="succeeded") == 3
    assert value(before, "coati_tasks_total", task="tests.add", status="failed") == 1
    assert value(before, "coati_task_retries_total", task="tests.add") == 2
    assert value(before, "coati_task_duration_seconds_bucket", task="tests.add", le="0.05") == 1
    assert value(before, "coati_task_duration_seconds_bucket", task="tests.add", le="0.25") == 2
    assert value(before, "coati_task_duration_seconds_bucket", task="tests.add", le="1.0") == 3
    assert value(before, "coati_task_duration_seconds_bucket", task="tests.add", le="+Inf") == 4
    assert value(before, "coati_task_duration_seconds_count", task="tests.add") == 4
    assert value(before, "coati_task_duration_seconds_sum", task="tests.add") == pytest.approx(
        4.93, abs=0.01)

    assert delete_expired() == 3  # the TTL cleanup workers run
    assert TaskResult.objects.count() == 2 and TaskTally.objects.exists()
    assert scrape() == before

    staff = django_user_model.objects.create_superuser("root", "root@example.com", "pw")
    client = Client()
    client.force_login(staff)
    response = client.post(reverse("admin:coati_queue_taskresult_changelist"), {
        "action": "delete_selected", "_selected_action": [str(kept.pk)], "post": "yes"})
    assert response.status_code == 302
    assert not TaskResult.objects.filter(pk=kept.pk).exists()
    assert scrape() == before

    finished_task(0.01, name="tests.noop")  # new work still counts, per task name
    after = scrape()
    assert value(after, "coati_tasks_total", task="tests.add", status="succeeded") == 3
    assert value(after, "coati_tasks_total", task="tests.noop", status="succeeded") == 1


def test_cleanup_deletes_in_chunks_and_counts_each_record_once(monkeypatch):
    from coati_queue import tallies

    monkeypatch.setattr(tallies, "DELETE_CHUNK", 3)
    for index in range(8):
        finished_task(0.1, status=TaskStatus.FAILED if index % 4 == 0 else TaskStatus.COMPLETED)
    assert delete_expired() == 8
    assert not TaskResult.objects.exists()
    retired = tallies.retired_totals()["tests.add"]
    assert (retired["enqueued"], retired["succeeded"], retired["failed"]) == (8, 6, 2)
    assert delete_expired() == 0


def test_cleanup_of_many_task_names_tallies_every_name():
    """More (task, counter) pairs than one statement's parameters allow on SQLite."""
    from coati_queue import tallies

    names = [f"tests.generated_{index}" for index in range(300)]
    for name in names:
        finished_task(0.1, name=name)
    assert delete_expired() == len(names)
    retired = tallies.retired_totals()
    assert {name: retired[name]["succeeded"] for name in names} == dict.fromkeys(names, 1.0)


def test_cleanup_forgets_workers_gone_for_a_day():
    """A killed worker shows as lost on the overview, but not for ever."""
    from coati_queue.models import WorkerHeartbeat

    now = timezone.now()
    for worker_id, age in (("recent-lost", datetime.timedelta(minutes=5)),
                           ("long-gone", datetime.timedelta(days=2))):
        WorkerHeartbeat.objects.create(worker_id=worker_id, hostname="h", pid=1, backend="huey",
                                       last_seen=now - age)
    delete_expired()
    assert list(WorkerHeartbeat.objects.values_list("worker_id", flat=True)) == ["recent-lost"]
