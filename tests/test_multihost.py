"""Several hosts, one Redis: the horizontal scale the origin design promises.

Three network namespaces made by the test (tests/multihost.py): ``services``
runs redis-server and PostgreSQL on 10.77.0.1; ``host-a`` (10.77.0.2) and
``host-b`` (10.77.0.3) each run one ``runworkers`` under their own hostname.
A 1,000-employee payroll is split across both hosts; host-b loses power
(every process in its namespace SIGKILLed) mid-batch; host-a finishes the
batch with exactly one payroll line per employee, and the queue overview lists
the workers per host: host-a's alive, host-b's lost.

Recovery comes from the shortened delivery settings of the fault battery
(tests/faults.py), never from sleeps.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT
from tests.faults import DELIVERY_OVERRIDES, PACED_HOOK, wait_until
from tests.multihost import Host, Network, require_namespaces

pytestmark = [pytest.mark.redis, pytest.mark.postgres]

EMPLOYEES = 1100          # seed_demo leaves some inactive: about 1,000 are paid
CHUNK_SIZE = 20
PACE_MS = 50              # per employee: ~6 s for 2 hosts x 2 processes x 2 threads
REDIS_PORT, PG_PORT = 6379, 5432
REDIS_PASSWORD = "multihost-secret"
DEADLINE = 180.0


def _redis_binary() -> str:
    binary = "/usr/bin/redis-server"
    if not os.path.exists(binary):
        message = "redis-server is not installed (apt-get install redis-server)"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return binary


@pytest.fixture
def network():
    require_namespaces()
    network = Network.create(["host-a", "host-b"])
    try:
        yield network
    finally:
        network.destroy()


@pytest.fixture
def services(network, tmp_path):
    """redis-server and PostgreSQL listening on the services address only."""
    from tests.pg_cluster import PostgresUnavailable, start_cluster

    svc = network.services
    redis = subprocess.Popen(
        svc.command([_redis_binary(), "--bind", svc.address, "--port", str(REDIS_PORT),
                     "--requirepass", REDIS_PASSWORD, "--save", "", "--appendonly", "no",
                     "--dir", str(tmp_path)]),
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        cluster = start_cluster(host=svc.address, port=PG_PORT, database="coati_multihost",
                                netns=svc.namespace, trusted_network=f"{svc.address}/24")
    except PostgresUnavailable as exc:
        redis.kill()
        if os.environ.get("CI") == "true":
            pytest.fail(str(exc))
        pytest.skip(str(exc))
    try:
        yield {"DATABASE_URL": cluster.url, "COATI_QUEUE_BACKEND": "dramatiq",
               "REDIS_URL": f"redis://:{REDIS_PASSWORD}@{svc.address}:{REDIS_PORT}/0"}
    finally:
        redis.kill()
        redis.wait()
        cluster.stop()


def _env(services: dict[str, str]) -> dict[str, str]:
    payroll = {"ACTIVE_EMPLOYEES": "example_project.payroll.services.active_employee_ids",
               "CALCULATE_EMPLOYEE": "example_project.payroll.services.calculate_and_store",
               "CALCULATE_MANY": PACED_HOOK, "CHUNK_SIZE": CHUNK_SIZE}
    env = {key: value for key, value in os.environ.items()
           if not key.startswith(("COATI_", "DATABASE_URL", "REDIS_URL", "QUEUE_"))}
    env.update(services, DJANGO_SETTINGS_MODULE="tests.settings", PYTHONUNBUFFERED="1",
               COATI_TEST_PACE_MS=str(PACE_MS), COATI_TEST_CALCULATE_MANY=PACED_HOOK,
               COATI_TEST_QUEUE_OVERRIDES=json.dumps({**DELIVERY_OVERRIDES,
                                                      "PAYROLL": payroll}))
    return env


def _drive(host: Host, env: dict[str, str], *args: str) -> dict:
    completed = subprocess.run(
        host.command([sys.executable, "-m", "tests.multihost_driver", *args]), cwd=REPO_ROOT,
        env=env, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, f"driver {args}:\n{completed.stdout}\n{completed.stderr}"
    return json.loads(completed.stdout.strip().splitlines()[-1])


def _start_workers(host: Host, env: dict[str, str], log: Path) -> subprocess.Popen:
    command = host.command([sys.executable, "manage.py", "runworkers", "--processes", "2",
                            "--threads", "2"])
    return subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=log.open("w"),
                            stderr=subprocess.STDOUT, start_new_session=True)


def test_a_payroll_split_across_two_hosts_survives_losing_one(network, services, tmp_path):
    env = _env(services)
    svc, host_a, host_b = network.services, *network.hosts
    active = _drive(svc, env, "prepare", str(EMPLOYEES))["active"]
    assert active >= 1000, active
    logs = {host.hostname: tmp_path / f"{host.hostname}.log" for host in network.hosts}
    workers = {host.hostname: _start_workers(host, env, logs[host.hostname])
               for host in network.hosts}

    def output() -> str:
        return "\n".join(f"--- {name} ---\n{path.read_text(errors='replace')[-4000:]}"
                         for name, path in logs.items())

    batch = _drive(svc, env, "start")["batch"]

    before = _drive(svc, env, "cut-point", str(batch), str(DEADLINE))
    assert not before.get("overshot"), (f"the batch reached {before} before host-b could be "
                                        f"cut mid-batch (raise PACE_MS)\n{output()}")
    assert not before.get("timed_out"), f"both hosts never paid: {before}\n{output()}"
    killed = host_b.kill_everything()  # host-b loses power
    assert killed, "host-b ran no process"
    workers["host-b"].wait(timeout=30)
    assert workers["host-b"].returncode == -signal.SIGKILL

    def finished():
        state = _drive(svc, env, "progress", str(batch))
        return state if state["status"] in ("completed", "failed", "cancelled") else None

    wait_until(finished, "host-a to finish the batch", timeout=DEADLINE, describe=output,
               poll=0.3)
    result = _drive(svc, env, "verify", str(batch))
    assert workers["host-a"].poll() is None, "host-a's workers died\n" + output()

    # Exactly one payroll line per employee, every item succeeded.
    assert result["status"] == "completed", (result, output())
    assert result["total"] == active
    assert (result["succeeded"], result["failed"]) == (active, 0), result
    assert result["lines"] == result["employees"] == active, result
    assert result["repeated"] == []
    # Both hosts paid employees; host-b's share before the cut is still there.
    assert result["by_host"]["host-a"] > before["by_host"]["host-a"]
    assert result["by_host"].get("host-b", 0) >= before["by_host"]["host-b"] > 0
    # The overview lists the workers per host: host-a's alive, host-b's lost.
    assert result["overview_status"] == 200
    assert result["overview_host_rows"] == 2  # rendered: one row per host
    hosts = {row["hostname"]: row for row in result["overview_hosts"]}
    assert hosts["host-a"]["alive"] == 2 and hosts["host-a"]["lost"] == 0, hosts
    assert hosts["host-b"]["alive"] == 0 and hosts["host-b"]["lost"] == 2, hosts

    workers["host-a"].send_signal(signal.SIGTERM)
    assert workers["host-a"].wait(timeout=60) == 0, output()
