"""Several hosts on one machine: network namespaces for tests/test_multihost.py.

``Network`` makes a services namespace holding a bridge (10.77.0.1) and one
namespace per "host" joined to that bridge by a veth pair (10.77.0.2, .3 …).
Those addresses exist only inside the namespaces, so traffic between the hosts
and the services crosses a real network stack and never the machine's own
interfaces. A host's processes also get a hostname of their own (a UTS namespace
from ``unshare``), which is how coati tells workers on different machines apart.

Everything is torn down at the end: every process left in a namespace is
SIGKILLed, then the namespaces (and the veths and bridge in them) are deleted.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
from dataclasses import dataclass, field

import pytest

SUBNET = "10.77.0"


def require_namespaces() -> None:
    """Skip (outside CI) or fail (``CI=true``) where namespaces cannot be made."""
    problem = None
    if os.geteuid() != 0:
        problem = "network namespaces need root"
    else:
        for tool in ("ip", "unshare", "hostname"):
            if shutil.which(tool) is None:
                problem = f"{tool} is not installed (apt-get install iproute2 util-linux)"
    if problem:
        if os.environ.get("CI") == "true":
            pytest.fail(problem)
        pytest.skip(problem)


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


@dataclass
class Host:
    """One namespace with its own address and hostname."""

    namespace: str
    address: str
    hostname: str

    def command(self, argv: list[str]) -> list[str]:
        """``argv`` run inside this host: its network and its hostname."""
        script = 'hostname "$0" && exec "$@"'
        return ["ip", "netns", "exec", self.namespace, "unshare", "--uts", "--",
                "sh", "-c", script, self.hostname, *argv]

    def pids(self) -> list[int]:
        listed = subprocess.run(["ip", "netns", "pids", self.namespace],
                                capture_output=True, text=True, check=False).stdout
        return [int(pid) for pid in listed.split()]

    def kill_everything(self) -> list[int]:
        """SIGKILL every process in the namespace, as when the machine loses power."""
        killed = []
        for pid in self.pids():
            try:
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
            except ProcessLookupError:
                pass
        return killed


@dataclass
class Network:
    """A services host (the bridge) and worker hosts, each a network namespace."""

    services: Host
    hosts: list[Host] = field(default_factory=list)

    @classmethod
    def create(cls, host_names: list[str]) -> "Network":
        tag = secrets.token_hex(3)
        services = Host(f"coati-svc-{tag}", f"{SUBNET}.1", "services")
        network = cls(services)
        _ip("netns", "add", services.namespace)
        try:
            _ip("-n", services.namespace, "link", "set", "lo", "up")
            _ip("-n", services.namespace, "link", "add", "br0", "type", "bridge")
            _ip("-n", services.namespace, "addr", "add", f"{services.address}/24", "dev", "br0")
            _ip("-n", services.namespace, "link", "set", "br0", "up")
            for number, name in enumerate(host_names, start=2):
                network.hosts.append(network._add_host(f"coati-{name}-{tag}", number, name))
        except BaseException:
            network.destroy()
            raise
        return network

    def _add_host(self, namespace: str, number: int, hostname: str) -> Host:
        host = Host(namespace, f"{SUBNET}.{number}", hostname)
        _ip("netns", "add", namespace)
        self.hosts.append(host)  # so destroy() removes it even if the rest fails
        svc = self.services.namespace
        port = f"veth{number}"
        _ip("-n", svc, "link", "add", port, "type", "veth", "peer", "name", "eth0",
            "netns", namespace)
        _ip("-n", svc, "link", "set", port, "master", "br0")
        _ip("-n", svc, "link", "set", port, "up")
        _ip("-n", namespace, "link", "set", "lo", "up")
        _ip("-n", namespace, "addr", "add", f"{host.address}/24", "dev", "eth0")
        _ip("-n", namespace, "link", "set", "eth0", "up")
        self.hosts.remove(host)
        return host

    def destroy(self) -> None:
        for host in [*self.hosts, self.services]:
            host.kill_everything()
            subprocess.run(["ip", "netns", "del", host.namespace], capture_output=True,
                           check=False)

