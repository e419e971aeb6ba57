"""A Ray cluster of several nodes on this machine, as Ray's own multi-node tests build one.

Each node is a `ray start --block` process group of its own (raylet, object store, agents) on
127.0.0.1 with its own CPUs and a custom resource naming it ({"node_a": 1}); worker nodes join
the head's GCS as on separate machines. Nothing more is needed on Linux (the `neoray up` stack
sets RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, Ray's single-machine mode in which no node can join,
so it is removed here). Every node gets the environment given to it and nothing else of the
test's: a worker node started without AWS credentials has none, as on another machine.

The head checks its nodes' health every second, so a lost node is declared dead within a few
seconds (Ray's default takes about half a minute).
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path

import psutil

from neoray.cluster.services import (
    ServiceError,
    log_tail,
    ray_head_command,
    ray_ports,
    ray_worker_command,
    start,
    stop,
)

FAST_HEALTH_CHECKS = {
    "health_check_period_ms": 1000,
    "health_check_timeout_ms": 1000,
    "health_check_failure_threshold": 3,
}
# Settings of the test's environment that no node may inherit.
NOT_INHERITED = ("RAY_ADDRESS", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")
CREDENTIALS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE")


@dataclass
class Node:
    name: str
    proc: subprocess.Popen
    log: Path

    def raylet(self) -> psutil.Process:
        for process in psutil.Process(self.proc.pid).children(recursive=True):
            if process.name() == "raylet":
                return process
        raise ServiceError(f"node {self.name} has no raylet; log:\n{log_tail(self.log)}")

    def processes_named(self, marker: str) -> list[psutil.Process]:
        """This node's processes whose command line contains `marker` (e.g. RayTrainWorker)."""
        found = []
        for process in self.raylet().children(recursive=True):
            try:
                if marker in " ".join(process.cmdline()):
                    found.append(process)
            except psutil.Error:
                continue
        return found


class RayCluster:
    """A head (no CPUs unless asked: only drivers and Ray Train's controller run there) and
    worker nodes added with `add_node`; `kill` loses a node as a crashed machine would."""

    def __init__(self, directory: Path, env: dict[str, str], head_cpus: int = 0) -> None:
        self.directory = directory
        self.temp_dir = Path(directory) / "ray"  # one session directory tree for all nodes
        self.env = {k: v for k, v in env.items() if k not in NOT_INHERITED}
        self.env["RAY_AUTH_MODE"] = "disabled"
        self.nodes: dict[str, Node] = {}
        ports = ray_ports()
        self.address = f"127.0.0.1:{ports['gcs']}"
        self.dashboard = f"http://127.0.0.1:{ports['dashboard']}"
        command = ray_head_command(self.temp_dir, ports, head_cpus, {"head": 1})
        command.append(f"--system-config={json.dumps(FAST_HEALTH_CHECKS)}")
        self._start("head", command, self.env)

    def driver_env(self) -> dict[str, str]:
        """The environment of a job whose driver joins this cluster."""
        return {**self.env, "RAY_ADDRESS": self.address}

    def add_node(self, name: str, num_cpus: int, credentials: bool = False) -> Node:
        """A worker node with `num_cpus` CPUs and the resource `name`; without `credentials`,
        none of the AWS credentials of the cluster's environment."""
        env = {k: v for k, v in self.env.items() if credentials or k not in CREDENTIALS}
        command = ray_worker_command(self.address, self.temp_dir, num_cpus, {name: 1})
        return self._start(name, command, env)

    def _start(self, name: str, command: list[str], env: dict[str, str]) -> Node:
        """Start a node and wait until the head lists it. A loaded machine can keep a raylet
        from registering within the 30 s `ray start` allows it: one more try then."""
        log = Path(self.directory) / f"{name}.log"
        for attempt in (1, 2):
            proc = start(command, log, env, inherit_env=False, append=attempt > 1)
            self.nodes[name] = Node(name, proc, log)
            try:
                self._wait_alive(name, proc, log)
                return self.nodes[name]
            except ServiceError:
                del self.nodes[name]
                stop(proc, 2.0)
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def worker_nodes(self) -> list[str]:
        return [name for name in self.nodes if name != "head"]

    def _alive(self) -> set[str]:
        """Names of the live nodes, by the resource that names each (from the GCS)."""
        from ray._raylet import GcsClient
        from ray.core.generated.gcs_pb2 import GcsNodeInfo

        try:
            nodes = GcsClient(address=self.address).get_all_node_info(
                timeout=10, state_filter=GcsNodeInfo.GcsNodeState.ALIVE
            )
        except Exception:  # the GCS is not up yet
            return set()
        return {
            name for node in nodes.values() for name in node.resources_total if name in self.nodes
        }

    def _wait_alive(self, name: str, proc: subprocess.Popen, log: Path) -> None:
        deadline = time.monotonic() + 90
        while name not in self._alive():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise ServiceError(f"Ray node {name} did not join; log:\n{log_tail(log)}")
            time.sleep(0.5)

    def kill(self, name: str) -> None:
        """SIGKILL the node's raylet and every process it started (its workers), as if its
        machine crashed (a worker outlives its raylet by a moment, long enough to finish a
        short run); `ray start --block` then stops what is left of the node. Returns once the
        head has declared the node dead."""
        node = self.nodes.pop(name)
        raylet = node.raylet()
        for process in [raylet, *raylet.children(recursive=True)]:
            with suppress(psutil.NoSuchProcess):
                process.send_signal(signal.SIGKILL)
        deadline = time.monotonic() + 60
        while name in self._alive():
            assert time.monotonic() < deadline, f"the head still lists node {name} as alive"
            time.sleep(0.2)
        stop(node.proc, 2.0)

    def shutdown(self) -> None:
        for name in [*self.worker_nodes(), "head"]:
            if name in self.nodes:
                stop(self.nodes.pop(name).proc, 5.0)
