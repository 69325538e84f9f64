"""System checks on real components: a real redis-server, real directories and modes,
real heartbeat rows, real migrations on a scratch database (SQLite file or PostgreSQL).

Configuration checks run with every ``manage.py`` command; runtime checks (Redis,
workers, migrations) only with ``check --deploy`` (see ``coati_queue/checks.py``).
"""

from __future__ import annotations

import datetime
import json
import os
import subprocess
import sys
import time
from contextlib import closing, contextmanager
from typing import Any, Callable, Iterator

import pytest
from django.core.checks import run_checks
from django.test import override_settings
from django.urls import reverse
from django.utils import timezone

from coati_queue import checks, selection
from coati_queue.conf import get_settings
from coati_queue.models import WorkerHeartbeat
from tests.conftest import REPO_ROOT, free_port, queue_settings, redis_password

pytestmark = pytest.mark.django_db  # the runtime checks read heartbeats and migrations

PASSWORD = "CheckSecret-7f3a"


def coati_messages(deploy: bool = True) -> list[Any]:
    return run_checks(tags=["coati_queue"], include_deployment_checks=deploy)


def ids(messages: list[Any]) -> list[str]:
    return [message.id for message in messages]


def by_id(messages: list[Any], check_id: str) -> Any:
    (found,) = [message for message in messages if message.id == check_id]
    return found


@contextmanager
def coati(tmp_path: Any, **extra: Any) -> Iterator[None]:
    with override_settings(COATI_QUEUE=queue_settings(tmp_path, **extra)):
        yield


# -- make test: a plain check needs no running system ------------------------------------------
def test_plain_check_passes_on_the_example_project_with_no_redis_and_no_workers(tmp_path):
    """What ``make test`` runs first: no Redis, no worker, maybe no database yet."""
    env = {key: value for key, value in os.environ.items()
           if key not in ("REDIS_URL", "COATI_QUEUE_PATH", "COATI_QUEUE_BACKEND",
                          "DJANGO_SETTINGS_MODULE")}
    env["REDIS_URL"] = f"redis://:{PASSWORD}@127.0.0.1:{free_port()}/0"  # configured, down
    completed = subprocess.run([sys.executable, "manage.py", "check", "--fail-level", "WARNING"],
                               cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                               timeout=120)
    assert completed.returncode == 0, completed.stdout + completed.stderr
    assert "coati_queue.W" not in completed.stdout + completed.stderr


def test_runtime_checks_run_only_with_deploy(tmp_path):
    with coati(tmp_path, BACKEND="dramatiq", REDIS_TIMEOUT=0.2,
               REDIS_URL=f"redis://:{PASSWORD}@127.0.0.1:{free_port()}/0"):
        assert "coati_queue.W030" not in ids(coati_messages(deploy=False))
        assert "coati_queue.W030" in ids(coati_messages(deploy=True))


# -- Redis -------------------------------------------------------------------------------------
def test_redis_unreachable_is_a_warning_that_hides_the_password(tmp_path):
    url = f"redis://:{PASSWORD}@127.0.0.1:{free_port()}/0"  # nothing listens there
    with coati(tmp_path, BACKEND="auto", REDIS_URL=url, REDIS_TIMEOUT=5.0):
        started = time.monotonic()
        messages = coati_messages()
        elapsed = time.monotonic() - started
    warning = by_id(messages, "coati_queue.W030")
    assert warning.level == 30
    assert "does not answer" in warning.msg and "Huey" in warning.msg
    assert "redis-cli" in warning.hint
    assert PASSWORD not in warning.msg + warning.hint and "***" in warning.msg
    assert elapsed < checks.CHECK_TIMEOUT + 2  # REDIS_TIMEOUT=5 is capped


def test_redis_unreachable_makes_auto_check_the_huey_fallback(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    url = f"redis://:{PASSWORD}@127.0.0.1:{free_port()}/0"
    with coati(tmp_path, BACKEND="auto", REDIS_URL=url, REDIS_TIMEOUT=0.2,
               PATH=str(blocker / "queue")):
        assert "coati_queue.E020" not in ids(coati_messages(deploy=False))  # Redis may be up
        assert {"coati_queue.W030", "coati_queue.E020"} <= set(ids(coati_messages()))


@pytest.fixture
def redis_config(redis_url: str) -> Iterator[Callable[..., None]]:
    """``redis_config(**{"maxmemory-policy": "allkeys-lru"})`` on the session server,
    every value put back afterwards."""
    import redis

    client = redis.Redis.from_url(redis_url)
    saved: dict[str, str] = {}

    def apply(**values: str) -> None:
        for name, value in values.items():
            name = name.replace("_", "-")
            if name not in saved:
                saved[name] = client.config_get(name)[name]
            client.config_set(name, value)

    try:
        yield apply
    finally:
        for name, value in saved.items():
            client.config_set(name, value)
        client.close()


def test_an_evicting_maxmemory_policy_is_a_warning(tmp_path, redis_url, redis_config):
    with coati(tmp_path, BACKEND="dramatiq", REDIS_URL=redis_url):
        assert not {"coati_queue.W031", "coati_queue.E031"} & set(ids(coati_messages()))
        redis_config(maxmemory_policy="allkeys-lru")
        warning = by_id(coati_messages(), "coati_queue.W031")
    assert "allkeys-lru" in warning.msg and "noeviction" in warning.hint
    assert redis_password(redis_url) not in warning.msg


def test_an_evicting_policy_is_an_error_in_strict_mode(tmp_path, redis_url, redis_config):
    redis_config(maxmemory_policy="volatile-lru")
    with coati(tmp_path, BACKEND="dramatiq", REDIS_URL=redis_url, STRICT=True):
        error = by_id(coati_messages(), "coati_queue.E031")
    assert error.level == 40 and "volatile-lru" in error.msg


def test_redis_without_persistence_is_info_when_payroll_is_configured(tmp_path, redis_url,
                                                                     redis_config):
    # The session server runs with --save "" --appendonly no.
    with coati(tmp_path, BACKEND="dramatiq", REDIS_URL=redis_url):
        info = by_id(coati_messages(), "coati_queue.I032")
        assert info.level == 20 and "reconciler" in info.msg and "appendonly" in info.hint
        redis_config(save="60 1000")
        assert "coati_queue.I032" not in ids(coati_messages())
        redis_config(save="", appendonly="yes")
        assert "coati_queue.I032" not in ids(coati_messages())
    with coati(tmp_path, BACKEND="dramatiq", REDIS_URL=redis_url, PAYROLL={}):
        redis_config(appendonly="no")
        assert "coati_queue.I032" not in ids(coati_messages())


# -- the Huey directory --------------------------------------------------------------------
def test_missing_directory_that_can_be_created_is_fine_and_not_created(tmp_path):
    wanted = tmp_path / "later" / "queue"
    with coati(tmp_path, PATH=str(wanted)):
        assert not {"coati_queue.E020", "coati_queue.E021"} & set(ids(coati_messages(False)))
    assert not (tmp_path / "later").exists()


def test_configured_directory_that_cannot_be_created_is_an_error(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    with coati(tmp_path, PATH=str(blocker / "queue")):
        error = by_id(coati_messages(deploy=False), "coati_queue.E020")
    assert error.level == 40 and str(blocker) in error.msg
    assert "fall back" in error.msg and "COATI_QUEUE_PATH" in error.hint


def _as_nobody(function: Callable[[], Any]) -> Any:
    """Run ``function`` in a forked child as uid/gid 65534 (tests run as root, whom no
    mode stops); its JSON result comes back through a pipe."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        try:
            os.close(read_end)
            os.setgid(65534)
            os.setuid(65534)
            os.write(write_end, json.dumps(function()).encode())
        finally:
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end) as reader:
        data = reader.read()
    os.waitpid(pid, 0)
    return json.loads(data)


def test_directory_that_is_not_writable_is_an_error(tmp_path):
    import shutil
    import tempfile

    parent = tempfile.mkdtemp(prefix="coati-check-")  # in /tmp: sticky, root's
    huey = os.path.join(parent, "huey")
    try:
        os.chmod(parent, 0o755)
        os.mkdir(huey, 0o500)  # read and enter only
        with coati(tmp_path, PATH=huey):
            if os.geteuid() == 0:  # no mode stops root: ask as another user
                os.chown(huey, 65534, 65534)
                found = _as_nobody(lambda: [checks.as_finding(m) for m in
                                            checks.huey_directory_messages(get_settings())])
            else:
                found = [checks.as_finding(m) for m in coati_messages(deploy=False)
                         if m.id.startswith("coati_queue.E02")]
    finally:
        shutil.rmtree(parent, ignore_errors=True)
    assert [f["id"] for f in found] == ["coati_queue.E020"], found
    assert "PermissionError" in found[0]["message"] and huey in found[0]["message"]


@pytest.fixture
def huey_settings(tmp_path) -> Iterator[Callable[[str], None]]:
    """``huey_settings(path)``: COATI_QUEUE_PATH for the checks run in the test."""
    stack: list[Any] = []

    def use(path: str) -> None:
        override = override_settings(COATI_QUEUE=queue_settings(tmp_path, PATH=path))
        override.enable()
        stack.append(override)

    yield use
    for override in reversed(stack):
        override.disable()


@pytest.mark.parametrize("layout, check_id, words", [
    ("world-writable", "coati_queue.E021", "writable by other users (mode 0777)"),
    ("group-writable", "coati_queue.E021", "writable by other users (mode 0770)"),
    ("open-parent", "coati_queue.E021", "parent"),
    ("foreign-sticky-parent", "coati_queue.E021", "owned by uid 12345"),
    ("lock-symlink", "coati_queue.E021", ".lock"),
    ("symlink", "coati_queue.E021", "symlink"),
    ("sticky-parent", None, ""),
])
def test_unsafe_directories_are_errors(tmp_path, huey_settings, layout, check_id, words):
    base = tmp_path / "base"
    base.mkdir(mode=0o700)
    huey = base / "huey"
    if layout in ("world-writable", "group-writable"):
        huey.mkdir(mode=0o700)
        os.chmod(huey, 0o777 if layout == "world-writable" else 0o770)
    elif layout == "open-parent":
        os.chmod(base, 0o777)  # anyone could rename huey/ and put their own in its place
        huey.mkdir(mode=0o700)
    elif layout in ("sticky-parent", "foreign-sticky-parent"):
        os.chmod(base, 0o1777)  # like /tmp
        if layout == "foreign-sticky-parent":
            os.chown(base, 12345, 12345)
        huey.mkdir(mode=0o700)
    elif layout == "lock-symlink":
        huey.mkdir(mode=0o700)
        victim = tmp_path / "victim"
        victim.write_text("precious")
        (huey / ".lock").symlink_to(victim)
    elif layout == "symlink":
        real = base / "real"
        real.mkdir(mode=0o700)
        huey.symlink_to(real, target_is_directory=True)
    huey_settings(str(huey))
    messages = [m for m in coati_messages(deploy=False) if m.id.startswith("coati_queue.E02")]
    if check_id is None:
        assert messages == []
        return
    (error,) = messages
    assert error.id == check_id and words in error.msg, error.msg
    assert "0700" in error.hint


def test_directory_of_a_running_driver_that_vanished_is_an_error(tmp_path, huey_settings):
    huey = tmp_path / "running"
    huey_settings(str(huey))
    driver = selection.get_queue_driver()
    assert driver.name == "huey" and driver.path == str(huey)
    import shutil

    shutil.rmtree(huey)  # a tmp cleaner, a careless rm -rf
    error = by_id(coati_messages(deploy=False), "coati_queue.E020")
    assert "no longer exists" in error.msg and "This process queues jobs there" in error.msg


# -- workers -------------------------------------------------------------------------------
@pytest.mark.parametrize("beat, expected", [
    (None, "no worker has ever sent one"),
    ("fresh", None),
    ("stale", "the last heartbeat was"),
    ("stopped", "the last heartbeat was"),
])
def test_no_worker_heartbeat_is_a_warning(tmp_path, beat, expected):
    now = timezone.now()
    if beat:
        WorkerHeartbeat.objects.create(
            worker_id=f"host:1:{beat}", hostname="host", pid=1, backend="huey",
            last_seen=now - datetime.timedelta(seconds=5 if beat == "fresh" else 300),
            stopped_at=now if beat == "stopped" else None)
    with coati(tmp_path, WORKER_LOST_AFTER=30):
        messages = coati_messages()
    if expected is None:
        assert "coati_queue.W040" not in ids(messages)
    else:
        warning = by_id(messages, "coati_queue.W040")
        assert expected in warning.msg and "runworkers" in warning.hint
    assert "coati_queue.W040" not in ids(coati_messages(deploy=False))


def test_no_heartbeat_warning_when_tasks_run_in_the_caller(tmp_path):
    for extra in ({"BACKEND": "immediate"}, {"ENABLED": False}):
        with coati(tmp_path, **extra):
            assert "coati_queue.W040" not in ids(coati_messages())


# -- migrations (a scratch database in a subprocess: the test database stays migrated) ------
def manage(*args: str, database: str) -> subprocess.CompletedProcess:
    env = {key: value for key, value in os.environ.items() if key != "REDIS_URL"}
    env.update({"COATI_TEST_DB": database, "DJANGO_SETTINGS_MODULE": "tests.settings",
                "PYTHONPATH": str(REPO_ROOT)})
    return subprocess.run([sys.executable, "-m", "django", *args], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=120)


def sqlite_tables(path: str) -> list[str]:
    import sqlite3

    with closing(sqlite3.connect(path)) as connection:
        return [name for (name,) in connection.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table'")]


def test_unapplied_migrations_are_a_warning_with_deploy(scratch_database):
    fresh = scratch_database
    plain = manage("check", database=fresh)
    assert plain.returncode == 0 and "W050" not in plain.stdout + plain.stderr
    deploy = manage("check", "--deploy", "--tag", "coati_queue", database=fresh).stderr
    assert "coati_queue.W050" in deploy and "0001_initial" in deploy
    assert "coati_queue.W040" not in deploy  # no tables: no heartbeat question
    # Looking created nothing: no table (Django 6's own JSONField check opens the
    # connection, which makes an empty SQLite file; coati's checks must add nothing to it).
    assert not os.path.exists(fresh) or not sqlite_tables(fresh)

    migrated = manage("migrate", "-v0", database=fresh)
    assert migrated.returncode == 0, migrated.stderr
    rolled_back = manage("migrate", "coati_queue", "0004", "-v0", database=fresh)
    assert rolled_back.returncode == 0, rolled_back.stderr
    deploy = manage("check", "--deploy", "--tag", "coati_queue", database=fresh).stderr
    assert "coati_queue.W050" in deploy and "0005_delivery_guarantees" in deploy
    assert "0004_drop_unused_permissions" not in deploy
    assert "migrate coati_queue" in deploy


def test_migrated_database_has_no_migration_finding(tmp_path):
    with coati(tmp_path):
        assert "coati_queue.W050" not in ids(coati_messages())


# -- the findings as data, and on the overview --------------------------------------------------
def test_health_findings_are_plain_data_matching_the_checks(tmp_path):
    url = f"redis://:{PASSWORD}@127.0.0.1:{free_port()}/0"
    with coati(tmp_path, BACKEND="dramatiq", REDIS_URL=url, REDIS_TIMEOUT=0.2):
        findings = checks.health_findings()
        messages = coati_messages()
    assert json.loads(json.dumps(findings)) == findings
    assert sorted(f["id"] for f in findings) == sorted(ids(messages))
    assert {f["id"]: f["level"] for f in findings}["coati_queue.W030"] == "warning"
    assert all(set(f) == {"id", "level", "message", "hint"} for f in findings)
    assert PASSWORD not in json.dumps(findings)


def test_the_overview_shows_the_findings(admin_client, tmp_path):
    url = f"redis://:{PASSWORD}@127.0.0.1:{free_port()}/0"
    with coati(tmp_path, BACKEND="auto", REDIS_URL=url, REDIS_TIMEOUT=0.2):
        html = admin_client.get(reverse("admin:coati_queue_taskresult_overview")).content.decode()
        spanish = admin_client.get(reverse("admin:coati_queue_taskresult_overview"),
                                   HTTP_ACCEPT_LANGUAGE="es").content.decode()
    assert 'id="coati-findings"' in html
    assert 'data-id="coati_queue.W030"' in html and 'data-id="coati_queue.W040"' in html
    assert "How to fix:" in html and "runworkers" in html
    assert PASSWORD not in html
    assert "Comprobaciones del sistema" in spanish and "advertencia" in spanish


def test_the_overview_says_when_nothing_was_found(admin_client, tmp_path):
    WorkerHeartbeat.objects.create(worker_id="host:1:a", hostname="host", pid=1, backend="huey",
                                   last_seen=timezone.now())
    with coati(tmp_path):
        html = admin_client.get(reverse("admin:coati_queue_taskresult_overview")).content.decode()
    assert 'id="coati-findings-none"' in html
