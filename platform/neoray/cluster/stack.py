"""The local stack behind `neoray up` / `neoray down`: a Ray head (dashboard and Jobs API), an
MLflow server (runs in PostgreSQL, artifacts in the object store, a user and password asked of
every client) and a SeaweedFS S3 endpoint with a bucket, all on 127.0.0.1, all state under one
directory (default `.neoray/`).

The services outlive the command that starts them; `stack.json` in the state directory records
their process groups and addresses, so `neoray down` stops them and `neoray submit` finds the
head. The Ray head requires token authentication (the token file lives in the state
directory); the S3 credentials and the PostgreSQL and MLflow admin passwords are generated once
and kept there too. MLflow runs on PostgreSQL, not SQLite: a training rank, evaluation workers
and a sweep's trials write at once, and SQLite serialises writers behind one file lock. The state directory
and Ray's temporary directory are this user's own (created 0700; an existing one owned by
someone else, or a symlink, is refused) and every secret file is 0600 from its creation. Jobs
inherit the head's environment, which points boto3 at the S3 endpoint and MLflow at the server.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
import stat
import subprocess
from contextlib import suppress
from dataclasses import asdict, dataclass, field
from pathlib import Path

from neoray.cluster.services import (
    BIN,
    ServiceError,
    boot_time,
    free_ports,
    group_alive,
    group_is_ours,
    initdb_command,
    log_tail,
    mlflow_command,
    mlflow_ready,
    postgres_command,
    postgres_ready,
    prometheus_command,
    prometheus_ready,
    ray_dashboard_ready,
    ray_head_command,
    ray_ports,
    remove_weed_sockets,
    start,
    start_time,
    stop_group,
    wait_ready,
    weed_command,
    weed_ports,
)

STATE_DIR = Path(".neoray")
BUCKET = "neoray"
REGION = "us-east-1"
POSTGRES_USER = "neoray"
MLFLOW_DATABASES = ("mlflow", "mlflow_auth")  # runs, and the auth app's users and permissions
MLFLOW_ADMIN = "admin"
S3_SECRETS = ("s3_access_key", "s3_secret_key")  # files in the state directory


@dataclass
class Stack:
    """Where the services of a running local stack are."""

    state_dir: str
    ray_address: str  # GCS address, for `ray.init` and workers joining
    ray_dashboard: str  # dashboard and Jobs API, for `neoray submit` and the browser
    ray_temp_dir: str
    token_path: str
    mlflow_url: str
    s3_endpoint: str
    bucket: str
    pids: dict[str, int]  # process group of each service
    weed_ports: dict[str, int]
    prometheus_url: str | None = None  # with `neoray up --metrics`
    postgres_port: int | None = None
    # When each service's group leader started, and when the machine booted: a process id in
    # this file names one of ours only while both still hold (see `group_is_ours`).
    started: dict[str, float] = field(default_factory=dict)
    boot_time: float | None = None

    def runs(self, name: str) -> bool:
        """Whether service `name` still runs as the process group `up` started."""
        return group_is_ours(self.pids[name], self.started.get(name), self.boot_time)

    def record(self, name: str, pid: int) -> None:
        """Service `name` runs as process group `pid` (just started: its leader is there)."""
        self.pids[name], self.started[name], self.boot_time = pid, start_time(pid), boot_time()
        _stack_file(Path(self.state_dir)).write_text(json.dumps(asdict(self), indent=2))

    def client_env(self) -> dict[str, str]:
        """What a Jobs API client needs: the head's address and its token."""
        return {
            "RAY_ADDRESS": self.ray_dashboard,
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN_PATH": self.token_path,
        }


def _stack_file(state_dir: Path) -> Path:
    return state_dir / "stack.json"


def running_stack(state_dir: Path = STATE_DIR) -> Stack | None:
    """The stack recorded in `state_dir` if any of its services still runs."""
    path = _stack_file(state_dir)
    if not path.exists():
        return None
    stack = Stack(**json.loads(path.read_text()))
    return stack if any(stack.runs(name) for name in stack.pids) else None


def _private_dir(path: Path) -> None:
    """`path` as a directory only this user can enter: created 0700, or an existing directory
    of this user made 0700; one owned by another user, or a symlink, is refused."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    info = path.lstat()
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid():
        raise ServiceError(
            f"{path} is not a directory of this user (uid {os.getuid()}; it is "
            f"{'a symlink' if stat.S_ISLNK(info.st_mode) else f'owned by uid {info.st_uid}'}): "
            "another user may control it; remove it, or use another state directory (--dir)"
        )
    if info.st_mode & 0o077:
        path.chmod(0o700)


def _secret(path: Path, make: str) -> str:
    """The secret kept in `path`, created readable by the owner only (0600) on first use; an
    existing one that others can read, or that another user owns, is refused."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        info = path.lstat()
        if not stat.S_ISREG(info.st_mode) or info.st_uid != os.getuid() or info.st_mode & 0o077:
            raise ServiceError(
                f"{path} must be a file of this user that only it can read (mode 0600); it is "
                f"mode {stat.S_IMODE(info.st_mode):o}, uid {info.st_uid}: check who read it, "
                "then delete it (a new secret is made) or `chmod 600` it"
            ) from None
    else:
        with os.fdopen(fd, "w") as out:
            out.write(make)
    return path.read_text().strip()


def s3_client_env(stack: Stack) -> dict[str, str]:
    """The endpoint and credentials of the stack's S3, as its jobs have them."""
    state = Path(stack.state_dir)
    access_key, secret_key = ((state / name).read_text().strip() for name in S3_SECRETS)
    return _s3_env(stack.s3_endpoint, access_key, secret_key)


def demo_data_uri(stack: Stack) -> str:
    """Where the stack's jobs find the demo data (conf/data/demo.yaml reads NEORAY_DEMO_DATA)."""
    return f"s3://{stack.bucket}/data/demo"


def _s3_env(endpoint: str, access_key: str, secret_key: str) -> dict[str, str]:
    return {
        "AWS_ENDPOINT_URL": endpoint,
        "MLFLOW_S3_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": access_key,
        "AWS_SECRET_ACCESS_KEY": secret_key,
        "AWS_DEFAULT_REGION": REGION,
    }


def mlflow_client_env(state_dir: Path) -> dict[str, str]:
    """The MLflow user and password that every client of the stack's server sends."""
    password = (Path(state_dir) / "mlflow_admin_password").read_text().strip()
    return {"MLFLOW_TRACKING_USERNAME": MLFLOW_ADMIN, "MLFLOW_TRACKING_PASSWORD": password}


def head_environment(
    stack: Stack, s3_env: dict[str, str], mlflow_env: dict[str, str]
) -> dict[str, str]:
    """The environment of the Ray head, which its jobs inherit: the stack's S3, MLflow (and its
    credentials) and bucket, and Ray's token authentication (docker/compose.yaml gives its head
    the same). Ray's servers listen on 127.0.0.1 only: Ray allows loopback addressing for a
    single-machine cluster (its mode for laptops), which this stack is."""
    env = {
        **s3_env,
        **mlflow_env,
        "MLFLOW_TRACKING_URI": stack.mlflow_url,
        "NEORAY_BUCKET": stack.bucket,  # storage=s3 in a job means the stack's bucket
        "NEORAY_DEMO_DATA": demo_data_uri(stack),  # data=demo: the copy `neoray up` publishes
        # Ray's own lookups inside the cluster (Ray Train's placement-group cleaner asks the
        # state API) find this head, not another Ray that runs on the same machine.
        "RAY_ADDRESS": stack.ray_address,
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN_PATH": stack.token_path,
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",  # one machine: every Ray server on loopback
        # A job's `python` is this environment's interpreter.
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    if stack.prometheus_url:  # the Ray dashboard's metrics pages query it
        env["RAY_PROMETHEUS_HOST"] = stack.prometheus_url
    return env


def _bucket_ready(endpoint: str, access_key: str, secret_key: str):
    """A probe that is true once the stack's bucket exists and stores an object."""
    import boto3
    from botocore.config import Config
    from botocore.exceptions import BotoCoreError, ClientError

    client = boto3.client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id=access_key,
        aws_secret_access_key=secret_key,
        region_name=REGION,
        config=Config(retries={"max_attempts": 1}, connect_timeout=1, read_timeout=2),
    )

    def probe() -> bool:
        try:
            with suppress(client.exceptions.BucketAlreadyOwnedByYou):
                client.create_bucket(Bucket=BUCKET)
            client.put_object(Bucket=BUCKET, Key=".ready", Body=b"")
        except (BotoCoreError, ClientError):
            return False
        return True

    return probe


def _postgres_cluster(state_dir: Path, password_file: Path) -> Path:
    """The stack's PostgreSQL data folder, initialised on first use: `initdb` writes into a
    temporary folder that is renamed into place once complete, so an interrupted `up` never
    leaves a half-made cluster that looks ready."""
    data = state_dir / "postgres"
    if (data / "PG_VERSION").exists():
        return data
    partial = state_dir / "postgres.partial"
    shutil.rmtree(partial, ignore_errors=True)
    log = state_dir / "logs" / "initdb.log"
    with open(log, "wb") as out:
        made = subprocess.run(
            initdb_command(partial, POSTGRES_USER, password_file), stdout=out, stderr=out
        )
    if made.returncode != 0:
        raise ServiceError(
            f"initdb failed (exit {made.returncode}); last lines of {log}:\n" + log_tail(log)
        )
    partial.rename(data)
    return data


def _create_databases(port: int, password: str) -> None:
    """MLflow's databases, made on the first start."""
    import psycopg

    with psycopg.connect(
        host="127.0.0.1",
        port=port,
        user=POSTGRES_USER,
        password=password,
        dbname="postgres",
        autocommit=True,  # CREATE DATABASE cannot run inside a transaction
    ) as connection:
        for name in MLFLOW_DATABASES:
            known = connection.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,))
            if known.fetchone() is None:
                connection.execute(f'CREATE DATABASE "{name}"')


def _mlflow_auth_config(state_dir: Path, postgres_port: int) -> Path:
    """The auth app's settings: its users in PostgreSQL, nothing allowed to a user that was not
    granted it, passwords checked once a minute per user (PBKDF2 costs ~0.1 s a request)."""
    path = state_dir / "mlflow" / "basic_auth.ini"
    path.write_text(
        "[mlflow]\n"
        "default_permission = NO_PERMISSIONS\n"
        f"database_uri = postgresql://{POSTGRES_USER}@127.0.0.1:{postgres_port}/mlflow_auth\n"
        f"admin_username = {MLFLOW_ADMIN}\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
        "auth_cache_ttl_seconds = 60\n"
    )
    return path


def stack_mlflow_command(port: int, postgres_port: int) -> list[str]:
    """The stack's MLflow server: runs in PostgreSQL (its password from PGPASSWORD, not the
    command line, which every user can read), artifacts in the bucket, the basic-auth app."""
    runs = f"postgresql://{POSTGRES_USER}@127.0.0.1:{postgres_port}/mlflow"
    return mlflow_command(port, runs, f"s3://{BUCKET}/mlflow", app_name="basic-auth")


def up(
    state_dir: Path = STATE_DIR,
    num_cpus: int | None = None,
    timeout: float = 180,
    metrics: bool = False,
) -> Stack:
    """Start the stack (or return the one already running from `state_dir`); with `metrics`,
    Prometheus too, scraping the Ray node's metrics (training, checkpoints, evaluation)."""
    if stack := running_stack(state_dir):
        dead = sorted(name for name in stack.pids if not stack.runs(name))
        if dead:
            raise ServiceError(
                f"the stack in {state_dir} runs only in part ({', '.join(dead)} stopped): "
                "`neoray down`, then `neoray up`"
            )
        return stack
    state_dir = state_dir.resolve()
    for folder in (state_dir, *(state_dir / sub for sub in ("s3", "mlflow", "logs"))):
        _private_dir(folder)
    access_key = _secret(state_dir / S3_SECRETS[0], "neoray")
    secret_key = _secret(state_dir / S3_SECRETS[1], secrets.token_hex(20))
    token_path = state_dir / "auth_token"
    _secret(token_path, secrets.token_hex(32))
    postgres_password_file = state_dir / "postgres_password"
    postgres_password = _secret(postgres_password_file, secrets.token_hex(20))
    mlflow_password = _secret(state_dir / "mlflow_admin_password", secrets.token_hex(20))
    mlflow_flask_key = _secret(state_dir / "mlflow_flask_key", secrets.token_hex(32))
    # Ray's socket paths must stay under 107 bytes: its temporary directory goes in /tmp.
    digest = hashlib.sha256(str(state_dir).encode()).hexdigest()[:10]
    # A predictable name in /tmp, which anyone could have made first; Ray makes its temporary
    # directory world-writable, so it goes one level inside the private one.
    private = Path(f"/tmp/neoray-{os.getuid()}-{digest}")
    _private_dir(private)
    ray_temp = private / "r"
    postgres_data = _postgres_cluster(state_dir, postgres_password_file)

    s3_ports = weed_ports()
    mlflow_port, prometheus_port, postgres_port = free_ports(3)
    head_ports = ray_ports()
    endpoint = f"http://127.0.0.1:{s3_ports['s3']}"
    stack = Stack(
        state_dir=str(state_dir),
        ray_address=f"127.0.0.1:{head_ports['gcs']}",
        ray_dashboard=f"http://127.0.0.1:{head_ports['dashboard']}",
        ray_temp_dir=str(ray_temp),
        token_path=str(token_path),
        mlflow_url=f"http://127.0.0.1:{mlflow_port}",
        s3_endpoint=endpoint,
        bucket=BUCKET,
        pids={},
        weed_ports=s3_ports,
        prometheus_url=f"http://127.0.0.1:{prometheus_port}" if metrics else None,
        postgres_port=postgres_port,
    )
    s3_env = _s3_env(endpoint, access_key, secret_key)
    mlflow_env = {
        **s3_env,
        "PGPASSWORD": postgres_password,  # for libpq: no password on MLflow's command line
        "MLFLOW_AUTH_CONFIG_PATH": str(_mlflow_auth_config(state_dir, postgres_port)),
        "MLFLOW_AUTH_ADMIN_PASSWORD": mlflow_password,  # creates the admin on the first start
        "MLFLOW_FLASK_SERVER_SECRET_KEY": mlflow_flask_key,  # signs the UI's CSRF tokens
    }
    logs = state_dir / "logs"
    services = [
        (
            "postgres",
            postgres_command(postgres_data, postgres_port),
            {},
            postgres_ready(postgres_port, POSTGRES_USER, postgres_password),
        ),
        (
            "s3",
            weed_command(state_dir / "s3", s3_ports, access_key, secret_key),
            {},
            _bucket_ready(endpoint, access_key, secret_key),
        ),
        (
            "mlflow",
            stack_mlflow_command(mlflow_port, postgres_port),
            mlflow_env,
            mlflow_ready(stack.mlflow_url),
        ),
        (
            "ray",
            ray_head_command(ray_temp, head_ports, num_cpus),
            head_environment(stack, s3_env, mlflow_client_env(state_dir)),
            ray_dashboard_ready(stack.ray_dashboard, token_path.read_text()),
        ),
    ]
    processes = {}
    try:
        for name, command, env, ready in services:
            processes[name] = start(command, logs / f"{name}.log", env, die_with_parent=False)
            stack.record(name, processes[name].pid)
            if name == "postgres":  # MLflow connects to it as it starts
                wait_ready(name, processes[name], ready, logs / f"{name}.log", timeout)
                _create_databases(postgres_port, postgres_password)
        for name, _, _, ready in services:
            wait_ready(name, processes[name], ready, logs / f"{name}.log", timeout)
        if stack.prometheus_url:
            _start_prometheus(stack, processes["ray"], ray_temp, prometheus_port, timeout)
    except BaseException:  # a service that failed, an error or ^C: nothing is left running
        down(state_dir)
        raise
    return stack


def _start_prometheus(
    stack: Stack, ray: subprocess.Popen, ray_temp: Path, port: int, timeout: float
) -> None:
    """Prometheus with the scrape config the Ray head wrote for its session."""
    state_dir = Path(stack.state_dir)
    config = ray_temp / "session_latest" / "metrics" / "prometheus" / "prometheus.yml"
    wait_ready("ray's prometheus.yml", ray, config.exists, state_dir / "logs" / "ray.log", timeout)
    log = state_dir / "logs" / "prometheus.log"
    command = prometheus_command(config.resolve(), state_dir / "prometheus", port)
    process = start(command, log, {}, die_with_parent=False)
    stack.record("prometheus", process.pid)
    wait_ready("prometheus", process, prometheus_ready(stack.prometheus_url), log, timeout)


def down(state_dir: Path = STATE_DIR) -> bool:
    """Stop the stack recorded in `state_dir`; its data stays for the next `up`. Returns False
    when nothing was recorded."""
    path = _stack_file(state_dir)
    if not path.exists():
        return False
    stack = Stack(**json.loads(path.read_text()))
    for name, pid in reversed(stack.pids.items()):  # clients first, PostgreSQL last
        if not stack.runs(name):
            if group_alive(pid):
                print(
                    f"not stopping process group {pid}, recorded for {name} in {path}: it is "
                    "not the one `neoray up` started (the machine restarted since, or the id "
                    "was given to another process)",
                    flush=True,
                )
            continue
        # SeaweedFS's graceful stop waits 15 s for gRPC streams: not worth waiting for.
        stop_group(pid, timeout=2.0 if name == "s3" else 5.0)
    remove_weed_sockets(stack.weed_ports)
    shutil.rmtree(stack.ray_temp_dir, ignore_errors=True)
    path.unlink()
    return True


def describe(stack: Stack) -> str:
    """What a user needs to use the stack."""
    return "\n".join(
        [
            f"Ray dashboard:  {stack.ray_dashboard}",
            f"MLflow UI:      {stack.mlflow_url} (user {MLFLOW_ADMIN}, password in "
            f"{Path(stack.state_dir) / 'mlflow_admin_password'})",
            f"S3 endpoint:    {stack.s3_endpoint} (bucket {stack.bucket})",
            *([f"Prometheus:     {stack.prometheus_url}"] if stack.prometheus_url else []),
            "submit a job:   neoray submit pretrain train.steps=20 storage=s3",
            f"state:          {stack.state_dir} (stop with `neoray down`)",
        ]
    )
