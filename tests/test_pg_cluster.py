"""The throw-away PostgreSQL cluster of the PostgreSQL test run and the benchmarks
(tests/pg_cluster.py): it serves on loopback, and leaves nothing behind, even when
the process that started it is killed."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from django.db import connection

from tests import pg_cluster
from tests.conftest import REPO_ROOT


@pytest.fixture
def pg_binaries() -> Path:
    found = pg_cluster.find_bin_dir()
    if found is None:
        if os.environ.get("CI") == "true":
            pytest.fail(pg_cluster.INSTALL_HINT)
        pytest.skip(pg_cluster.INSTALL_HINT)
    return found


def refuses_connections(host: str, port: int) -> bool:
    try:
        socket.create_connection((host, port), timeout=1).close()
    except OSError:
        return True
    return False


@pytest.mark.django_db
def test_the_postgres_run_really_runs_on_postgresql():
    """COATI_TEST_DATABASE=postgres must never quietly fall back to SQLite."""
    expected = ("postgresql" if os.environ.get("COATI_TEST_DATABASE") == "postgres"
                else "sqlite" if not os.environ.get("DATABASE_URL") else connection.vendor)
    assert connection.vendor == expected


def test_a_cluster_serves_its_database_on_loopback_and_stop_removes_everything(pg_binaries):
    import psycopg

    cluster = pg_cluster.start_cluster(host="127.0.0.1", database="scratch")
    try:
        assert cluster.url.startswith(f"postgres://{pg_cluster.SUPERUSER}@127.0.0.1:")
        with psycopg.connect(cluster.url) as conn:
            assert conn.execute("SELECT current_database()").fetchone() == ("scratch",)
            assert conn.execute("SHOW listen_addresses").fetchone() == ("127.0.0.1",)
            conn.execute("CREATE TABLE t (x int)")
    finally:
        cluster.stop()
    assert not cluster.base_dir.exists()
    assert refuses_connections("127.0.0.1", cluster.port)


def test_a_cluster_refuses_to_listen_beyond_loopback(pg_binaries):
    with pytest.raises(ValueError, match="not a loopback address"):
        pg_cluster.start_cluster(host="192.0.2.1")


def test_a_killed_owner_leaves_no_server_behind(pg_binaries, tmp_path):
    """The reaper stops the server and removes its files when the process that
    started it dies by SIGKILL (no atexit, no finally)."""
    script = ("import sys, time; from tests.pg_cluster import start_cluster; "
              "c = start_cluster(); print(c.base_dir, c.port, flush=True); time.sleep(600)")
    owner = subprocess.Popen([sys.executable, "-c", script], cwd=REPO_ROOT,
                             stdout=subprocess.PIPE, text=True)
    try:
        base_dir, port = owner.stdout.readline().split()
    finally:
        owner.send_signal(signal.SIGKILL)
        owner.wait(timeout=30)
    deadline = time.monotonic() + 60
    while Path(base_dir).exists():
        assert time.monotonic() < deadline, f"{base_dir} outlived its owner by 60 s"
        time.sleep(0.1)
    assert refuses_connections("127.0.0.1", int(port))
