"""One stats snapshot: with the broker's depths, or (broker down) the same shape without them,
and broker errors shown masked in the overview, /metrics and the logs."""

from __future__ import annotations

import logging

import pytest
from django.urls import reverse

from coati_queue.models import TaskResult, TaskStatus
from coati_queue.selection import get_queue_driver
from coati_queue.stats import collect_stats
from tests.conftest import free_port

pytestmark = pytest.mark.django_db(transaction=True)

SECRET = "snapshot-secret-pw"


def test_snapshot_without_broker_has_the_same_shape_and_database_counts(queue_env, huey_path):
    queue_env(COATI_QUEUE_BACKEND="huey", COATI_QUEUE_PATH=huey_path)
    driver = get_queue_driver()
    driver.enqueue("tests.noop")
    TaskResult.objects.create(task_name="tests.add", queue="default", backend=driver.name,
                              status=TaskStatus.FAILED)
    full = collect_stats(driver)
    blind = collect_stats(driver, ask_broker=False)
    assert set(blind) == set(full)
    assert blind["backend"] == full["backend"] == "huey"
    for name, row in full["queues"].items():
        assert set(blind["queues"][name]) == set(row)
        assert blind["queues"][name]["queued"] is None and blind["queues"][name]["delayed"] is None
        for column in ("processing", "finished", "failed", "workers"):
            assert blind["queues"][name][column] == row[column]
    assert full["queues"]["default"]["queued"] >= 1  # the broker was asked only in `full`
    assert blind["queues"]["default"]["failed"] == 1
    assert blind["degraded"] == []


def test_unreachable_broker_is_a_masked_message_on_the_overview_and_metrics(
        queue_env, admin_client, caplog):
    url = f"redis://:{SECRET}@127.0.0.1:{free_port()}/0"  # nothing listens there
    queue_env(COATI_QUEUE_BACKEND="dramatiq", REDIS_URL=url, COATI_QUEUE_REDIS_TIMEOUT="0.5")
    with caplog.at_level(logging.WARNING, logger="coati_queue"):
        overview = admin_client.get(reverse("admin:coati_queue_taskresult_overview"))
        metrics = admin_client.get(reverse("coati_queue:metrics"))
    assert overview.status_code == 200
    page = overview.content.decode()
    assert 'id="coati-broker-error"' in page
    assert "coati_broker_up 0.0" in metrics.content.decode()
    assert SECRET not in page and SECRET not in metrics.content.decode()
    assert caplog.records and SECRET not in caplog.text
