"""Fixtures: a real redis-server, Huey directories, the queue environment and real workers.

Nothing here fakes a broker: Dramatiq talks to a ``redis-server`` started
for the session (with a password, so tests can prove it never leaks) and
Huey writes to a fresh directory per test. Workers are real ``runworkers``
subprocesses sharing the test process's file SQLite database, so tests that
use them need ``@pytest.mark.django_db(transaction=True)``: only committed
rows are visible to another process.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import pytest

from coati_queue.conf import reset_settings
from coati_queue.selection import get_queue_driver, reset_drivers

REPO_ROOT = Path(__file__).resolve().parent.parent
QUEUE_ENV_VARS = ("REDIS_URL", "COATI_QUEUE_PATH", "QUEUE_ENABLED", "COATI_QUEUE_BACKEND",
                  "COATI_QUEUE_REDIS_TIMEOUT", "COATI_QUEUE_QUEUES", "COATI_QUEUE_METRICS_TOKEN")
BACKENDS = ("immediate", "huey", "dramatiq")


def reset_queue() -> None:
    reset_settings()
    reset_drivers()


# -- the database --------------------------------------------------------------------------
def pytest_collection_modifyitems(config: Any, items: list[Any]) -> None:
    """COATI_TEST_DATABASE=postgres on a machine without PostgreSQL (outside CI, where
    tests/settings.py fails instead): every test skips, saying why."""
    from django.conf import settings

    reason = getattr(settings, "POSTGRES_UNAVAILABLE", "")
    if reason:
        for item in items:
            item.add_marker(pytest.mark.skip(reason=f"COATI_TEST_DATABASE=postgres: {reason}"))


def on_postgresql() -> bool:
    from django.db import connection

    return connection.vendor == "postgresql"


@pytest.fixture(scope="session")
def django_db_setup(django_db_setup: None, django_db_blocker: Any) -> Any:
    """pytest-django's test database; on PostgreSQL, before it is dropped, the sessions
    other threads of this process still hold (coati's tracking writer keeps one open)
    are ended: DROP DATABASE refuses while anyone is connected."""
    yield
    from django.db import connection

    if connection.vendor == "postgresql":
        with django_db_blocker.unblock(), connection.cursor() as cursor:
            cursor.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                           "WHERE datname = current_database() AND pid <> pg_backend_pid()")


@pytest.fixture
def scratch_database(tmp_path: Path) -> Any:
    """An empty database beside the test database, for a subprocess given it as
    ``COATI_TEST_DB``: a file path on SQLite (not created), a new database on
    PostgreSQL (created empty, dropped afterwards)."""
    from django.db import connection

    if connection.vendor != "postgresql":
        yield str(tmp_path / "scratch.sqlite3")
        return
    name = f"coati_scratch_{secrets.token_hex(6)}"
    with connection._nodb_cursor() as cursor:
        cursor.execute(f'CREATE DATABASE "{name}"')
    try:
        yield name
    finally:
        with connection._nodb_cursor() as cursor:
            cursor.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


# -- redis ---------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_for_ping(port: int, password: str, process: subprocess.Popen, timeout: float) -> bool:
    import redis

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            return False
        try:
            client = redis.Redis(host="127.0.0.1", port=port, password=password,
                                 socket_timeout=0.5, socket_connect_timeout=0.5)
            try:
                if client.ping():
                    return True
            finally:
                client.close()
        except (redis.RedisError, OSError):
            time.sleep(0.05)
    return False


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory):
    """A real redis-server on a free port with a random password; yields its URL."""
    binary = shutil.which("redis-server") or (
        "/usr/bin/redis-server" if os.path.exists("/usr/bin/redis-server") else None)
    if binary is None:
        message = "redis-server is not installed (apt-get install redis-server)"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    password = "pw-" + secrets.token_hex(12)
    workdir = tmp_path_factory.mktemp("redis")
    for _ in range(3):  # another process may grab the port between bind and start
        port = free_port()
        process = subprocess.Popen(
            [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--requirepass", password, "--dir", str(workdir),
             "--daemonize", "no", "--loglevel", "warning"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if _wait_for_ping(port, password, process, timeout=10):
            break
        process.kill()
        process.wait()
    else:
        pytest.fail("redis-server did not answer PING")
    try:
        yield f"redis://:{password}@127.0.0.1:{port}/0"
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture
def redis_url(redis_server):
    """The session server's URL, emptied (FLUSHALL) before the test."""
    import redis

    client = redis.Redis.from_url(redis_server)
    try:
        client.flushall()
    finally:
        client.close()
    return redis_server


def redis_password(url: str) -> str:
    from urllib.parse import urlsplit

    return urlsplit(url).password or ""


# -- environment ---------------------------------------------------------------------------
@pytest.fixture
def huey_path(tmp_path) -> str:
    path = tmp_path / "huey"
    path.mkdir(mode=0o700)
    return str(path)


@pytest.fixture(autouse=True)
def clean_queue_env(monkeypatch, tmp_path_factory):
    """Every test starts from no queue env vars and fresh caches, and leaves fresh caches.

    The built-in Huey directory candidates point into a temporary directory, so
    no test writes to /var/lib or the home directory.
    """
    from coati_queue import selection

    for name in QUEUE_ENV_VARS:
        monkeypatch.delenv(name, raising=False)
    fallback = tmp_path_factory.mktemp("fallback")
    monkeypatch.setattr(selection, "SYSTEM_PATH", str(fallback / "system"))
    monkeypatch.setattr(selection, "USER_PATH", str(fallback / "user"))
    monkeypatch.setattr(selection, "LOCAL_PATH", str(fallback / "project"))
    reset_queue()
    yield
    reset_queue()


@pytest.fixture(autouse=True)
def reset_language():
    """A request with ``Accept-Language: es`` leaves Spanish active in this thread
    (LocaleMiddleware never deactivates); the next test starts in English again."""
    yield
    from django.utils import translation

    translation.deactivate()


@pytest.fixture
def queue_env(monkeypatch) -> Callable[..., None]:
    """``queue_env(REDIS_URL=..., COATI_QUEUE_PATH=..., QUEUE_ENABLED="0")``; None unsets.

    The settings and driver caches are dropped afterwards, so the next
    ``get_queue_driver()`` sees the new environment.
    """
    def apply(**variables: str | None) -> None:
        for name, value in variables.items():
            if value is None:
                monkeypatch.delenv(name, raising=False)
            else:
                monkeypatch.setenv(name, str(value))
        reset_queue()

    return apply


# -- real workers --------------------------------------------------------------------------
def worker_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a worker subprocess: ours, the test settings and the test DB.

    ``DATABASE_URL`` (PostgreSQL runs) is inherited; ``COATI_TEST_DB`` names the test
    database (a file on SQLite, ``test_<name>`` on a server) the worker must open.
    """
    from django.conf import settings

    merged = dict(os.environ)
    merged.update({
        "DJANGO_SETTINGS_MODULE": "tests.settings",
        "COATI_TEST_DB": str(settings.DATABASES["default"]["NAME"]),
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT),
                                                    os.environ.get("PYTHONPATH")])),
        "PYTHONUNBUFFERED": "1",
    })
    merged.update(env or {})
    return merged


def worker_command(backend: str, *extra_args: str, burst: bool = True,
                   threads: int = 4) -> list[str]:
    command = [sys.executable, "-m", "django", "runworkers", "--backend", backend,
               "--processes", "1", "--threads", str(threads), "--poll-ms", "20",
               "--skip-checks"]
    if burst:
        command.append("--burst")
    return command + list(extra_args)


@pytest.fixture
def run_workers() -> Callable[..., subprocess.CompletedProcess]:
    """``run_workers("huey", "--queues", "high")``: one real burst worker process, to the end."""
    def run(backend: str, *extra_args: str, env: dict[str, str] | None = None,
            timeout: float = 120, threads: int = 4) -> subprocess.CompletedProcess:
        args = list(extra_args)
        if "--threads" in args:
            index = args.index("--threads")
            threads = int(args[index + 1])
            del args[index:index + 2]
        return subprocess.run(worker_command(backend, *args, threads=threads), cwd=REPO_ROOT,
                              env=worker_env(env), capture_output=True, text=True,
                              timeout=timeout)

    return run


@pytest.fixture
def start_worker() -> Callable[..., subprocess.Popen]:
    """A long-running (non-burst) ``runworkers``; SIGKILLed with its worker processes at
    teardown if still running."""
    started: list[subprocess.Popen] = []

    def start(backend: str, *extra_args: str, env: dict[str, str] | None = None,
              threads: int = 4) -> subprocess.Popen:
        process = subprocess.Popen(worker_command(backend, *extra_args, burst=False,
                                                  threads=threads),
                                   cwd=REPO_ROOT, env=worker_env(env), stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT, text=True)
        started.append(process)
        return process

    yield start
    for process in started:
        if process.poll() is None:
            sigkill_runworkers(process)  # its workers too: alone they would stop gracefully
        process.communicate(timeout=30)


def worker_pids(supervisor_pid: int) -> list[int]:
    """The worker processes (children) of a ``runworkers`` supervisor: their pids are the
    ones in ``WorkerHeartbeat.pid``."""
    found: set[int] = set()
    for task in Path(f"/proc/{supervisor_pid}/task").glob("*"):
        try:
            found.update(int(pid) for pid in (task / "children").read_text().split())
        except OSError:
            continue
    return sorted(found)


def process_gone(pid: int) -> bool:
    """No such process, or a zombie whose threads have all exited (so its files and
    locks are released, as ``waitpid`` would guarantee to its parent)."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            dead = handle.read().rsplit(") ", 1)[1].startswith(("Z", "X"))
        return dead and len(os.listdir(f"/proc/{pid}/task")) <= 1
    except (OSError, IndexError):
        return True


def sigkill_runworkers(process: subprocess.Popen) -> None:
    """SIGKILL a ``runworkers`` supervisor and its worker processes, as a power cut or
    the OOM killer would, and wait until they are all gone. (Killing only the
    supervisor makes its workers stop gracefully.)"""
    workers = worker_pids(process.pid)
    process.send_signal(signal.SIGKILL)
    for pid in workers:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    process.wait(timeout=30)
    deadline = time.monotonic() + 30
    while not all(process_gone(pid) for pid in workers):
        assert time.monotonic() < deadline, f"worker processes {workers} outlived SIGKILL"
        time.sleep(0.01)


def describe_failure(completed: subprocess.CompletedProcess) -> str:
    return (f"worker exited {completed.returncode}\n--- stdout ---\n{completed.stdout}"
            f"\n--- stderr ---\n{completed.stderr}")


# -- the backend under test ----------------------------------------------------------------
@dataclass
class BackendUnderTest:
    name: str
    driver: Any
    runner: Callable[..., subprocess.CompletedProcess] | None
    path: str | None = None
    redis_url: str | None = None

    @property
    def queues_work(self) -> bool:
        """True when jobs wait in a broker for a worker (not run in the caller)."""
        return self.runner is not None

    def drain(self, *extra_args: str, timeout: float = 120) -> None:
        """Run every queued and delayed job on a real burst worker (no-op for immediate)."""
        if self.runner is None:
            return
        completed = self.runner(self.name, *extra_args, timeout=timeout)
        assert completed.returncode == 0, describe_failure(completed)


@pytest.fixture(params=BACKENDS)
def backend(request, queue_env, huey_path, run_workers) -> BackendUnderTest:
    """The contract suite's backend: configured through the environment, as users do."""
    name = request.param
    if name == "immediate":
        queue_env(COATI_QUEUE_BACKEND="immediate")
        under_test = BackendUnderTest(name, get_queue_driver("immediate"), None)
    elif name == "huey":
        queue_env(COATI_QUEUE_BACKEND="huey", COATI_QUEUE_PATH=huey_path)
        under_test = BackendUnderTest(name, get_queue_driver("huey"), run_workers,
                                      path=huey_path)
    else:
        url = request.getfixturevalue("redis_url")
        queue_env(COATI_QUEUE_BACKEND="dramatiq", REDIS_URL=url)
        under_test = BackendUnderTest(name, get_queue_driver("dramatiq"), run_workers,
                                      redis_url=url)
    # ``Task.send()`` uses the unforced driver: it must land on the same backend.
    assert get_queue_driver().name == name
    return under_test


# -- admin users ---------------------------------------------------------------------------
def make_user(django_user_model: Any, username: str, *perms: str, staff: bool = True) -> Any:
    """A user with just these coati_queue permissions (codenames)."""
    from django.contrib.auth.models import Permission

    user = django_user_model.objects.create_user(username, password="pw", is_staff=staff)
    for codename in perms:
        user.user_permissions.add(Permission.objects.get(content_type__app_label="coati_queue",
                                                         codename=codename))
    return user


def logged_in(user: Any) -> Any:
    from django.test import Client

    client = Client()
    client.force_login(user)
    return client


# -- a private queue for admin and metrics tests ---------------------------------------------
def queue_settings(tmp_path: Any, **extra: Any) -> dict[str, Any]:
    """The test settings' COATI_QUEUE (payroll hooks) with a private Huey directory."""
    from django.conf import settings

    return {**settings.COATI_QUEUE, "BACKEND": "huey", "PATH": str(tmp_path / "huey"), **extra}


@pytest.fixture
def private_queue(tmp_path: Any) -> Any:
    """Huey in this test's own directory (``usefixtures`` it, or autouse a wrapper)."""
    from django.test import override_settings

    with override_settings(COATI_QUEUE=queue_settings(tmp_path)):
        yield
