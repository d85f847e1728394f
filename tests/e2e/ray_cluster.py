"""A real two-node Ray cluster on this machine: two `ray start` raylets with distinct ports and a
private temp dir, always torn down (every process the nodes started is killed).

The nodes are started with --node-ip-address 127.0.0.1, but Ray replaces a loopback node address
by the machine's own interface address for multi-node clusters (`resolve_ip_for_localhost`); the
traffic stays on this machine either way, and clients talk to 127.0.0.1."""

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

RAY = str(Path(sys.executable).with_name("ray"))
HOST = "127.0.0.1"


def free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind((HOST, 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _node_ports(index: int) -> list[str]:
    names = ("--node-manager-port", "--object-manager-port", "--dashboard-agent-listen-port",
             "--dashboard-agent-grpc-port", "--runtime-env-agent-port", "--metrics-export-port")
    args = [arg for name, port in zip(names, free_ports(len(names))) for arg in (name, str(port))]
    # Worker ports below Linux's ephemeral range (32768+), where the ports above are picked.
    low = 20000 + (os.getpid() % 50) * 200 + index * 100
    return [*args, "--min-worker-port", str(low), "--max-worker-port", str(low + 99)]


def _session_members(sessions: set[int]) -> list[int]:
    """Processes in the given sessions: `ray start --block` runs in a new session, and Ray's
    daemons, workers and vLLM's engine processes below it never leave it."""
    members = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):
                if os.getsid(int(entry)) in sessions:
                    members.append(int(entry))
    return members


def _stop(nodes: list[subprocess.Popen]) -> None:
    sessions = {node.pid for node in nodes}
    for node in reversed(nodes):  # the worker node first, then the head
        if node.poll() is None:
            node.send_signal(signal.SIGTERM)  # `ray start --block` stops its node's processes
            with contextlib.suppress(subprocess.TimeoutExpired):
                node.wait(timeout=30)
    deadline = time.time() + 15
    while (left := _session_members(sessions)) and time.time() < deadline:
        time.sleep(0.5)
    for pid in left:  # whatever did not exit by itself
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    for node in nodes:
        node.wait()


def _wait_for_nodes(address: str, count: int, deadline: float) -> None:
    import ray

    host, port = address.split(":")
    while True:  # the head's GCS accepts connections once it is up
        with contextlib.suppress(OSError), socket.create_connection((host, int(port)), timeout=1):
            break
        if time.time() > deadline:
            raise TimeoutError(f"the Ray head at {address} did not come up")
        time.sleep(1)
    ray.init(address=address, log_to_driver=False)
    try:
        while sum(n["Alive"] for n in ray.nodes()) < count:
            if time.time() > deadline:
                raise TimeoutError(f"the Ray cluster at {address} did not reach {count} nodes")
            time.sleep(1)
    finally:
        ray.shutdown()


@dataclass
class LocalCluster:
    address: str  # the head's GCS, host:port
    nodes: list[subprocess.Popen] = field(default_factory=list)  # the `ray start --block`s

    def processes(self) -> list[int]:
        """Every live process the nodes started (Ray daemons, workers, vLLM engines)."""
        return _session_members({node.pid for node in self.nodes})


@contextlib.contextmanager
def local_cluster(
    temp_dir: Path, num_cpus_per_node: int = 2, env: dict[str, str] | None = None
) -> Iterator[LocalCluster]:
    """Start a head node and a second node on this machine; stop them whatever happens."""
    gcs_port, client_port = free_ports(2)
    cluster = LocalCluster(f"{HOST}:{gcs_port}")
    # Ray 2.60 turns token auth on for `ray start` when ~/.ray/auth_token exists (any local
    # `ray.init()` writes one) but not for a connecting driver: state the mode both sides use.
    node_env = {**os.environ, "RAY_AUTH_MODE": "disabled", **(env or {})}
    common = ["--block", "--node-ip-address", HOST, "--num-cpus", str(num_cpus_per_node),
              "--disable-usage-stats"]
    head = [RAY, "start", "--head", "--port", str(gcs_port), "--ray-client-server-port",
            str(client_port), "--include-dashboard", "false", "--temp-dir", str(temp_dir),
            *common, *_node_ports(0)]
    worker = [RAY, "start", "--address", cluster.address, *common, *_node_ports(1)]
    log = open(temp_dir / "ray-start.log", "ab")  # noqa: SIM115 -- closed in finally
    try:
        for command in (head, worker):
            cluster.nodes.append(subprocess.Popen(command, env=node_env, stdout=log,
                                                  stderr=log, start_new_session=True))
            _wait_for_nodes(cluster.address, len(cluster.nodes), time.time() + 120)
        yield cluster
    finally:
        _stop(cluster.nodes)
        log.close()
