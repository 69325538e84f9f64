"""A throw-away PostgreSQL cluster for the tests and benchmarks.

``start_cluster()`` runs Debian's PostgreSQL (``/usr/lib/postgresql/<ver>/bin``)
as an unprivileged user (``initdb`` and ``pg_ctl`` refuse root, so as root the
``postgres`` system user runs them through ``runuser``), in a temporary
directory it owns, listening on one loopback address and a unix socket in that
directory, with trust authentication for loopback and the socket only. Durability
is switched off (fsync, synchronous_commit): the data is thrown away anyway.

``cluster.stop()`` ends the server and removes the directory. As a last resort
a small reaper process does the same when the process that started the cluster
dies without stopping it (SIGKILL, a crash), so no server outlives a test run.

``COATI_TEST_DATABASE=postgres`` makes ``tests/settings.py`` call
``session_database_url()``, which starts one cluster for the process, exports
its ``DATABASE_URL`` (worker subprocesses inherit it) and stops it at exit.
"""

from __future__ import annotations

import atexit
import glob
import ipaddress
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SUPERUSER = "coati"
SYSTEM_USER = "postgres"  # Debian's account for the server, used when we are root
BIN_GLOB = "/usr/lib/postgresql/*/bin"
INSTALL_HINT = "PostgreSQL is not installed (apt-get install postgresql)"
SERVER_SETTINGS = {
    "fsync": "off",
    "synchronous_commit": "off",
    "full_page_writes": "off",
    "max_connections": "300",  # workers: processes x threads, plus writer threads
    "shared_buffers": "64MB",
    "log_min_messages": "warning",
    "log_min_duration_statement": "-1",
    "timezone": "UTC",
}


class PostgresUnavailable(RuntimeError):
    """The PostgreSQL server binaries are not installed (or cannot be run)."""


def find_bin_dir() -> Path | None:
    """The newest Debian PostgreSQL ``bin`` directory, or one from ``PG_BIN``/``PATH``."""
    candidates = [os.environ.get("PG_BIN", "")]
    candidates += sorted(glob.glob(BIN_GLOB), key=lambda p: int(Path(p).parent.name)
                         if Path(p).parent.name.isdigit() else 0, reverse=True)
    on_path = shutil.which("pg_ctl")
    if on_path:
        candidates.append(str(Path(on_path).resolve().parent))
    for candidate in filter(None, candidates):
        if all(os.access(Path(candidate, name), os.X_OK) for name in ("initdb", "pg_ctl")):
            return Path(candidate)
    return None


def _run_as() -> list[str]:
    """The command prefix that runs the server binaries as an unprivileged user."""
    if os.geteuid() != 0:
        return []
    try:
        pwd.getpwnam(SYSTEM_USER)
    except KeyError:
        raise PostgresUnavailable(f"running as root and there is no {SYSTEM_USER!r} user to run "
                                  "PostgreSQL as (the postgresql package creates it)") from None
    runuser = shutil.which("runuser") or "/usr/sbin/runuser"
    return [runuser, "-u", SYSTEM_USER, "--"]


def _free_port(host: str) -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


@dataclass
class PostgresCluster:
    """A running throw-away cluster; ``url`` names ``database`` on ``host:port``."""

    host: str
    port: int
    database: str
    base_dir: Path
    bin_dir: Path
    run_as: list[str] = field(default_factory=list)
    netns: str | None = None
    trusted_network: str | None = None
    reaper: subprocess.Popen | None = None

    @property
    def data_dir(self) -> Path:
        return self.base_dir / "data"

    @property
    def socket_dir(self) -> Path:
        return self.base_dir / "socket"

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"postgres://{SUPERUSER}@{host}:{self.port}/{self.database}"

    def url_for(self, database: str) -> str:
        return self.url.rsplit("/", 1)[0] + "/" + database

    def log_text(self) -> str:
        try:
            return (self.base_dir / "server.log").read_text(errors="replace")[-4000:]
        except OSError:
            return ""

    def server_pid(self) -> int:
        """The postmaster's pid (``pg_ctl`` detaches it: it is not our child)."""
        return int((self.data_dir / "postmaster.pid").read_text().split("\n", 1)[0])

    def psql(self, sql: str, database: str = "postgres") -> str:
        """Run ``sql`` through the unix socket as the superuser; returns psql's output."""
        completed = subprocess.run(
            [*self.run_as, str(self.bin_dir / "psql"), "-h", str(self.socket_dir), "-p",
             str(self.port), "-U", SUPERUSER, "-d", database, "-v", "ON_ERROR_STOP=1", "-Atqc",
             sql], capture_output=True, text=True, timeout=60)
        if completed.returncode:
            raise RuntimeError(f"psql failed: {completed.stderr.strip()}")
        return completed.stdout

    def create_database(self, name: str) -> str:
        """Create ``name`` (if missing) and return its URL."""
        if not self.psql(f"SELECT 1 FROM pg_database WHERE datname = '{name}'").strip():
            self.psql(f'CREATE DATABASE "{name}"')
        return self.url_for(name)

    def stop(self) -> None:
        """Stop the server (fast shutdown, then immediate) and remove its directory."""
        try:
            if (self.data_dir / "postmaster.pid").exists():
                _pg_ctl_stop(self.run_as, self.bin_dir, self.data_dir)
        finally:
            shutil.rmtree(self.base_dir, ignore_errors=True)
            if self.reaper is not None and self.reaper.poll() is None:
                self.reaper.terminate()
                self.reaper.wait(timeout=10)
            self.reaper = None

    def __enter__(self) -> "PostgresCluster":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.stop()


def _pg_ctl_stop(run_as: list[str], bin_dir: Path, data_dir: Path) -> None:
    for mode in ("fast", "immediate"):
        completed = subprocess.run([*run_as, str(bin_dir / "pg_ctl"), "stop", "-D", str(data_dir),
                                    "-m", mode, "-w", "-t", "30"],
                                   capture_output=True, text=True, timeout=60)
        if completed.returncode == 0 or not (data_dir / "postmaster.pid").exists():
            return


def start_cluster(host: str = "127.0.0.1", port: int | None = None,
                  database: str | None = None, *, netns: str | None = None,
                  trusted_network: str | None = None) -> PostgresCluster:
    """Start a cluster listening on ``host`` (a free port unless ``port``).

    ``database`` is created when given (the test suite leaves that to Django);
    the URL names it either way (``coati`` by default). Authentication is
    ``trust``, so ``host`` must be a loopback address, or lie in
    ``trusted_network`` (a CIDR whose clients are trusted too, e.g. a private
    test network). ``netns`` runs the server in that network namespace (``ip
    netns``, root only; the port defaults to 5432 there). Raises
    ``PostgresUnavailable`` when the binaries are missing.
    """
    address = ipaddress.ip_address(host)
    if trusted_network is not None:
        if address not in ipaddress.ip_network(trusted_network, strict=False):
            raise ValueError(f"{host} is not in the trusted network {trusted_network}")
    elif not address.is_loopback:
        raise ValueError(f"{host} is not a loopback address: the cluster trusts every local "
                         "user (pass trusted_network to trust a private network's clients)")
    if netns is not None and port is None:
        port = 5432  # the namespace's own ports: nothing else listens there
    bin_dir = find_bin_dir()
    if bin_dir is None:
        raise PostgresUnavailable(INSTALL_HINT)
    run_as = _run_as()
    base_dir = Path(tempfile.mkdtemp(prefix="coati_pg_"))
    if run_as:
        account = pwd.getpwnam(SYSTEM_USER)
        os.chown(base_dir, account.pw_uid, account.pw_gid)
    cluster = PostgresCluster(host, 0, database or "coati", base_dir, bin_dir, run_as, netns,
                              trusted_network)
    try:
        _initdb(cluster)
        for attempt in range(3):  # another process may take the port between bind and start
            cluster.port = port or _free_port(host)
            if _start(cluster):
                break
            if port is not None or attempt == 2:
                raise RuntimeError(f"PostgreSQL did not start on {host}:{cluster.port}:\n"
                                   f"{cluster.log_text()}")
        cluster.reaper = _start_reaper(cluster)
        if database:
            cluster.create_database(database)
    except BaseException:
        cluster.stop()
        raise
    return cluster


def _run(cluster: PostgresCluster, *command: str) -> subprocess.CompletedProcess:
    return subprocess.run([*cluster.run_as, *command], cwd=cluster.base_dir, capture_output=True,
                          text=True, timeout=120)


def _initdb(cluster: PostgresCluster) -> None:
    completed = _run(cluster, str(cluster.bin_dir / "initdb"), "-D", str(cluster.data_dir),
                     "-U", SUPERUSER, "-A", "trust", "-E", "UTF8", "--no-locale", "--no-sync")
    if completed.returncode:
        raise RuntimeError(f"initdb failed:\n{completed.stdout}\n{completed.stderr}")
    hba = ("local all all trust\n"
           "host all all 127.0.0.0/8 trust\n"
           "host all all ::1/128 trust\n")
    if cluster.trusted_network:
        network = ipaddress.ip_network(cluster.trusted_network, strict=False)
        hba += f"host all all {network} trust\n"
    (cluster.data_dir / "pg_hba.conf").write_text(hba)
    mkdir = _run(cluster, "mkdir", "-m", "0700", str(cluster.socket_dir))
    if mkdir.returncode:
        raise RuntimeError(f"cannot create {cluster.socket_dir}: {mkdir.stderr}")


def _start(cluster: PostgresCluster) -> bool:
    settings = dict(SERVER_SETTINGS, listen_addresses=cluster.host, port=str(cluster.port),
                    unix_socket_directories=str(cluster.socket_dir))
    conf = "".join(f"{name} = '{value}'\n" for name, value in settings.items())
    (cluster.data_dir / "postgresql.auto.conf").write_text(conf)
    command = [str(cluster.bin_dir / "pg_ctl"), "start", "-D", str(cluster.data_dir), "-l",
               str(cluster.base_dir / "server.log"), "-w", "-t", "60", "-s"]
    if cluster.netns:  # the server's sockets in that namespace (its unix socket is a file)
        completed = subprocess.run(["ip", "netns", "exec", cluster.netns, *cluster.run_as,
                                    *command], cwd=cluster.base_dir, capture_output=True,
                                   text=True, timeout=120)
    else:
        completed = _run(cluster, *command)
    return completed.returncode == 0


def _start_reaper(cluster: PostgresCluster) -> subprocess.Popen:
    """A process that stops the cluster if ours dies without doing it."""
    return subprocess.Popen(
        [sys.executable, __file__, "--reap", str(os.getpid()), str(cluster.base_dir),
         str(cluster.bin_dir), *cluster.run_as],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True)


def _reap(owner: int, base_dir: Path, bin_dir: Path, run_as: list[str]) -> None:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # the owner stopped the cluster
    while base_dir.exists():
        try:
            os.kill(owner, 0)
        except ProcessLookupError:
            break
        except PermissionError:
            pass
        time.sleep(0.5)
    else:
        return
    data_dir = base_dir / "data"
    if (data_dir / "postmaster.pid").exists():
        _pg_ctl_stop(run_as, bin_dir, data_dir)
    shutil.rmtree(base_dir, ignore_errors=True)


# -- the test session's cluster ------------------------------------------------------------
_session_cluster: PostgresCluster | None = None


def session_database_url(database: str = "coati") -> str:
    """Start this process's cluster once, export its URL as ``DATABASE_URL``, return it.

    The cluster stops at interpreter exit. Missing binaries raise
    ``PostgresUnavailable``.
    """
    global _session_cluster
    if _session_cluster is None:
        _session_cluster = start_cluster()
        _session_cluster.database = database
        atexit.register(_session_cluster.stop)
    os.environ["DATABASE_URL"] = _session_cluster.url
    return _session_cluster.url


if __name__ == "__main__" and sys.argv[1:2] == ["--reap"]:
    _reap(int(sys.argv[2]), Path(sys.argv[3]), Path(sys.argv[4]), sys.argv[5:])
