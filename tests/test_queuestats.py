"""``manage.py queuestats``: table, JSON and YAML output on real Huey and Dramatiq brokers."""

from __future__ import annotations

import datetime
import json
import sys
from io import StringIO

import pytest
import yaml
from django.core.management import CommandError, call_command
from django.utils import timezone

from coati_queue.models import TaskResult, TaskStatus, WorkerHeartbeat
from coati_queue.selection import get_queue_driver
from coati_queue.stats import collect_stats
from tests.conftest import redis_password

pytestmark = pytest.mark.django_db(transaction=True)

QUEUE_KEYS = {"queued", "delayed", "processing", "finished", "failed", "workers"}
WORKER_KEYS = {"worker_id", "hostname", "pid", "queues", "last_seen", "alive", "running_tasks",
               "current_task"}


@pytest.fixture(params=["huey", "dramatiq"])
def stats_backend(request, queue_env, huey_path):
    if request.param == "huey":
        queue_env(COATI_QUEUE_BACKEND="huey", COATI_QUEUE_PATH=huey_path)
        secret = None
    else:
        url = request.getfixturevalue("redis_url")
        queue_env(COATI_QUEUE_BACKEND="dramatiq", REDIS_URL=url)
        secret = redis_password(url)
    return request.param, get_queue_driver(), secret


def queuestats(*args: str) -> str:
    out = StringIO()
    call_command("queuestats", *args, stdout=out)
    return out.getvalue()


def populate(driver) -> None:
    """3 queued default, 1 queued high, 2 delayed low; records finished and failed;
    one live worker on high+default, one lost, one stopped."""
    driver.enqueue_many("tests.noop", [((), {}) for _ in range(3)])
    driver.enqueue("tests.noop", queue="high")
    driver.enqueue_many("tests.noop", [((), {}) for _ in range(2)], queue="low", delay=300)
    now = timezone.now()
    TaskResult.objects.bulk_create(
        [TaskResult(task_name="tests.add", queue="default", backend=driver.name,
                    status=TaskStatus.COMPLETED) for _ in range(4)]
        + [TaskResult(task_name="tests.add", queue="high", backend=driver.name,
                      status=TaskStatus.FAILED) for _ in range(2)]
        + [TaskResult(task_name="tests.add", queue="low", backend=driver.name,
                      status=TaskStatus.PROCESSING)])
    lost = now - datetime.timedelta(seconds=driver.settings.WORKER_LOST_AFTER + 60)
    WorkerHeartbeat.objects.bulk_create([
        WorkerHeartbeat(worker_id="host:1:live", hostname="host", pid=1, backend=driver.name,
                        queues=["high", "default"], last_seen=now),
        WorkerHeartbeat(worker_id="host:2:lost", hostname="host", pid=2, backend=driver.name,
                        queues=["high", "default", "low"], last_seen=lost),
        WorkerHeartbeat(worker_id="host:3:stopped", hostname="host", pid=3, backend=driver.name,
                        queues=["low"], last_seen=now, stopped_at=now),
    ])


EXPECTED_QUEUES = {
    "high": {"queued": 1, "delayed": 0, "processing": 0, "finished": 0, "failed": 2,
             "workers": 1},
    "default": {"queued": 3, "delayed": 0, "processing": 0, "finished": 4, "failed": 0,
                "workers": 1},
    "low": {"queued": 0, "delayed": 2, "processing": 1, "finished": 0, "failed": 0,
            "workers": 0},
}


def test_json_output_has_the_documented_shape_and_counts(stats_backend):
    name, driver, secret = stats_backend
    populate(driver)
    data = json.loads(queuestats("--json"))
    assert set(data) == {"backend", "reason", "location", "queues", "workers", "hosts",
                         "dead_letters", "degraded", "findings"}
    assert data["backend"] == name
    assert data["reason"] == driver.reason
    assert data["location"] == driver.describe()
    assert data["queues"] == EXPECTED_QUEUES
    assert list(data["queues"]) == ["high", "default", "low"]  # priority order
    workers = {w["worker_id"]: w for w in data["workers"]}
    assert set(workers) == {"host:1:live", "host:2:lost"}  # cleanly stopped ones are gone
    assert all(set(w) == WORKER_KEYS for w in workers.values())
    assert workers["host:1:live"]["alive"] is True
    assert workers["host:2:lost"]["alive"] is False
    assert workers["host:1:live"]["queues"] == ["high", "default"]
    assert datetime.datetime.fromisoformat(workers["host:1:live"]["last_seen"])
    # Workers per machine, for several hosts on one Redis.
    assert data["hosts"] == [{"hostname": "host", "alive": 1, "lost": 1, "running_tasks": 0}]
    if secret:
        assert "***" in data["location"]


def test_counts_follow_the_broker(stats_backend):
    name, driver, _ = stats_backend
    assert all(q == dict.fromkeys(QUEUE_KEYS, 0)
               for q in json.loads(queuestats("--json"))["queues"].values())
    driver.enqueue_many("tests.noop", [((), {}) for _ in range(5)], queue="low")
    assert json.loads(queuestats("--json"))["queues"]["low"]["queued"] == 5
    driver.purge(["low"])
    assert json.loads(queuestats("--json"))["queues"]["low"]["queued"] == 0


def test_yaml_output_is_the_same_data(stats_backend):
    name, driver, secret = stats_backend
    populate(driver)
    from_yaml = yaml.safe_load(queuestats("--yaml"))
    assert from_yaml == json.loads(queuestats("--json"))
    assert from_yaml["queues"] == EXPECTED_QUEUES


def test_table_lists_queues_counts_and_workers(stats_backend):
    name, driver, secret = stats_backend
    populate(driver)
    text = queuestats()
    header = text.splitlines()[0]
    assert name in header
    assert driver.reason in header
    assert driver.describe() in header
    rows = {line.split()[0]: line.split()[1:] for line in text.splitlines()[2:]
            if line.split() and line.split()[0] in ("queue", "high", "default", "low", "total")}
    assert rows["queue"] == ["queued", "delayed", "processing", "finished", "failed", "workers"]
    assert rows["high"] == ["1", "0", "0", "0", "2", "1"]
    assert rows["default"] == ["3", "0", "0", "4", "0", "1"]
    assert rows["low"] == ["0", "2", "1", "0", "0", "0"]
    assert rows["total"] == ["4", "2", "1", "4", "2", "1"]
    assert "host:1:live" in text
    assert "LOST" in text and "host:2:lost" in text
    assert "host:3:stopped" not in text


def test_password_never_printed(queue_env, redis_url):
    queue_env(REDIS_URL=redis_url)  # auto: the reason and location both name Redis
    driver = get_queue_driver()
    assert driver.name == "dramatiq"
    populate(driver)
    secret = redis_password(redis_url)
    for args in ((), ("--json",), ("--yaml",), ("--backend", "dramatiq", "--json")):
        output = queuestats(*args)
        assert "127.0.0.1" in output
        assert secret not in output, args


def test_backend_flag_forces_a_backend(queue_env, huey_path):
    queue_env(QUEUE_ENABLED="0", COATI_QUEUE_PATH=huey_path)
    assert json.loads(queuestats("--json"))["backend"] == "immediate"
    get_queue_driver("huey").enqueue("tests.noop")
    data = json.loads(queuestats("--json", "--backend", "huey"))
    assert data["backend"] == "huey"
    assert data["queues"]["default"]["queued"] == 1
    with pytest.raises(CommandError):
        queuestats("--backend", "rabbitmq")


def test_yaml_without_pyyaml_explains_how_to_install_it(queue_env, huey_path, monkeypatch):
    queue_env(COATI_QUEUE_PATH=huey_path)
    monkeypatch.setitem(sys.modules, "yaml", None)  # import yaml -> ImportError
    with pytest.raises(CommandError, match=r"pip install coati-queue\[test\] or pyyaml"):
        queuestats("--yaml")


def test_interval_refreshes_until_interrupted(queue_env, huey_path, monkeypatch):
    from coati_queue.management.commands import queuestats as command

    queue_env(COATI_QUEUE_PATH=huey_path)
    driver = get_queue_driver()
    sleeps = []

    def fake_sleep(seconds):
        sleeps.append(seconds)
        if len(sleeps) == 1:
            driver.enqueue("tests.noop")  # the next refresh must see it
            return
        raise KeyboardInterrupt  # Ctrl-C during the second wait

    monkeypatch.setattr(command, "sleep", fake_sleep)
    output = queuestats("--json", "--interval", "0.5")
    assert sleeps == [0.5, 0.5]
    assert command.CLEAR_SCREEN not in output  # not a TTY: no escape codes
    decoder, documents, index = json.JSONDecoder(), [], 0
    while index < len(output):
        if output[index].isspace():
            index += 1
            continue
        document, index = decoder.raw_decode(output, index)
        documents.append(document)
    assert [d["queues"]["default"]["queued"] for d in documents] == [0, 1]


def test_collect_stats_uses_two_queries(stats_backend, django_assert_num_queries):
    name, driver, _ = stats_backend
    populate(driver)
    with django_assert_num_queries(3):  # task counts, dead letters (one GROUP BY each) + heartbeats
        stats = collect_stats(driver)
    assert stats["queues"] == EXPECTED_QUEUES
