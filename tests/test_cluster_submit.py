"""The local stack and jobs on it: `neoray up` starts a Ray head (`ray start --head` on
127.0.0.1, token authentication), PostgreSQL, an MLflow server (runs in PostgreSQL, artifacts
in S3, basic auth) and a SeaweedFS S3 endpoint, every one on loopback only; `neoray submit` runs
a pretrain job from the uploaded project, whose MLflow run then appears; `neoray down` stops
every process."""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.request
from contextlib import suppress
from pathlib import Path

import boto3
import psutil
import psycopg
import pytest
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from object_store_access import assert_only_s3_with_keys_reaches_objects

from neoray.cluster.services import group_alive
from neoray.cluster.stack import mlflow_client_env
from neoray.code_version import code_version

NEORAY = str(Path(sys.executable).parent / "neoray")
ROOT = Path(__file__).resolve().parents[1]
SECRETS = ("auth_token", "s3_access_key", "s3_secret_key", "postgres_password")
SECRETS += ("mlflow_admin_password", "mlflow_flask_key")
LOOPBACK = ("127.0.0.1", "::ffff:127.0.0.1", "::1")
TINY = ["model=tiny", "data.seq_len=32", "train.peak_tflops=1.0", "tracking=server"]


def neoray(cwd: Path, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """The CLI as a user runs it in `cwd` (where `neoray up` keeps `.neoray/`)."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("RAY_")}
    env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    return subprocess.run(
        [NEORAY, *args], capture_output=True, text=True, timeout=timeout, env=env, cwd=cwd
    )


def stack_s3(cwd: Path, state: dict):
    """A boto3 client for the stack's S3 endpoint, with the credentials `neoray up` made."""
    secrets = cwd / ".neoray"
    return boto3.client(
        "s3",
        endpoint_url=state["s3_endpoint"],
        aws_access_key_id=(secrets / "s3_access_key").read_text(),
        aws_secret_access_key=(secrets / "s3_secret_key").read_text(),
        region_name="us-east-1",
    )


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """`neoray up` in a fresh directory; `neoray down` afterwards (checked to stop it all)."""
    cwd = tmp_path_factory.mktemp("stack")
    started = neoray(cwd, "up", "--num-cpus", "2", "--metrics")
    try:
        assert started.returncode == 0, started.stderr[-3000:]
        assert "MLflow UI:" in started.stdout and "Ray dashboard:" in started.stdout
        assert "Prometheus:" in started.stdout
        with pytest.MonkeyPatch.context() as env:  # the MLflow clients below log in as admin
            for name, value in mlflow_client_env(cwd / ".neoray").items():
                env.setenv(name, value)
            yield cwd, json.loads((cwd / ".neoray" / "stack.json").read_text())
    finally:
        recorded = json.loads((cwd / ".neoray" / "stack.json").read_text())
        stopped = neoray(cwd, "down", timeout=60)
        assert stopped.returncode == 0, stopped.stderr[-3000:]
        assert not any(group_alive(pid) for pid in recorded["pids"].values())


def test_up_serves_mlflow_and_a_dashboard_that_wants_the_token(stack):
    cwd, state = stack
    # Its state is the user's alone: folders 0700, secrets 0600. Ray makes its temporary
    # folder world-writable; the folder that holds it is private.
    for folder in (cwd / ".neoray", cwd / ".neoray" / "logs", Path(state["ray_temp_dir"]).parent):
        assert folder.stat().st_mode & 0o777 == 0o700, folder
    for secret in SECRETS:
        assert (cwd / ".neoray" / secret).stat().st_mode & 0o777 == 0o600, secret
    for secret in (cwd / ".neoray" / "s3" / "security").iterdir():  # SeaweedFS's keys
        assert secret.stat().st_mode & 0o777 == 0o600, secret
    with urllib.request.urlopen(f"{state['mlflow_url']}/health", timeout=5) as health:
        assert health.status == 200
    with pytest.raises(urllib.error.HTTPError, match="401"):
        urllib.request.urlopen(f"{state['ray_dashboard']}/api/jobs/", timeout=5)
    # MLflow keeps artifacts in the stack's bucket.
    client = MlflowClient(state["mlflow_url"])
    run = client.create_run(client.create_experiment("artifacts"))
    client.log_text(run.info.run_id, "kept in S3", "note.txt")
    keys = [
        o["Key"] for o in stack_s3(cwd, state).list_objects_v2(Bucket=state["bucket"])["Contents"]
    ]
    assert any(key.startswith("mlflow/") and key.endswith("/note.txt") for key in keys), keys
    # ... and its runs in the stack's PostgreSQL.
    with psycopg.connect(
        host="127.0.0.1",
        port=state["postgres_port"],
        user="neoray",
        password=(cwd / ".neoray" / "postgres_password").read_text(),
        dbname="mlflow",
    ) as database:
        stored = database.execute("SELECT run_uuid FROM runs").fetchall()
    assert (run.info.run_id,) in stored
    again = neoray(cwd, "up")  # a second `up` finds the stack running
    assert again.returncode == 0 and state["mlflow_url"] in again.stdout
    assert json.loads((cwd / ".neoray" / "stack.json").read_text())["pids"] == state["pids"]


def test_the_stacks_mlflow_asks_every_client_for_the_admin_password(stack):
    _, state = stack
    search = f"{state['mlflow_url']}/api/2.0/mlflow/experiments/search?max_results=1"

    def status(user: str | None, password: str | None) -> int:
        request = urllib.request.Request(search)
        if user is not None:
            token = base64.b64encode(f"{user}:{password}".encode()).decode()
            request.add_header("Authorization", f"Basic {token}")
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return response.status
        except urllib.error.HTTPError as error:
            return error.code

    assert status(None, None) == 401
    assert status("admin", "password1234") == 401  # no default password
    assert status("admin", os.environ["MLFLOW_TRACKING_PASSWORD"]) == 200
    with pytest.MonkeyPatch.context() as env:
        env.delenv("MLFLOW_TRACKING_PASSWORD")
        with pytest.raises(MlflowException, match="401|nauthorized|credentials"):
            MlflowClient(state["mlflow_url"]).search_experiments(max_results=1)


def test_every_server_of_the_stack_listens_on_loopback_only(stack):
    """Ray's own servers (GCS, raylet, agents, workers) included: Ray binds every interface
    unless its node address is loopback."""
    _, state = stack
    groups = set(state["pids"].values())
    listening = {}
    for connection in psutil.net_connections(kind="inet"):
        if connection.status != psutil.CONN_LISTEN or connection.pid is None:
            continue
        with suppress(ProcessLookupError):
            if os.getpgid(connection.pid) in groups:
                listening[connection.laddr] = psutil.Process(connection.pid).name()
    assert len(listening) >= 10  # S3's servers, PostgreSQL, MLflow, GCS, raylet, dashboard, ...
    exposed = {f"{a.ip}:{a.port}": n for a, n in listening.items() if a.ip not in LOOPBACK}
    assert not exposed, f"listening beyond loopback: {exposed}"


def test_the_stacks_objects_are_reached_only_through_s3_with_its_keys(stack):
    """A local user reaches no object through SeaweedFS's other servers (every socket its
    processes listen on, tried over HTTP and gRPC without credentials)."""
    cwd, state = stack
    s3 = stack_s3(cwd, state)
    s3.create_bucket(Bucket="access-probe")
    directory = cwd / ".neoray" / "s3"
    pgid, ports = state["pids"]["s3"], state["weed_ports"]
    assert_only_s3_with_keys_reaches_objects(pgid, directory, ports, s3, "access-probe")


def test_the_stacks_mlflow_loses_nothing_under_concurrent_writers(stack):
    """A smaller run of bench/mlflow_load.py (the issue's 16 writers x 2,000 metrics there):
    8 processes logging rows and artifacts at once; every value read back."""
    _, state = stack
    bench = Path(__file__).resolve().parents[1] / "bench" / "mlflow_load.py"
    load = ["--writers", "8", "--steps", "25", "--metrics-per-step", "10", "--artifacts", "4"]
    result = subprocess.run(
        [sys.executable, str(bench), "--url", state["mlflow_url"], *load],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert re.search(r" 0 failed calls +0 lost", result.stdout), result.stdout


@pytest.mark.slow
def test_submitted_pretrain_job_succeeds_and_is_tracked(stack, tmp_path):
    cwd, state = stack
    run_dir = tmp_path / "submitted"
    result = neoray(
        cwd,
        "submit",
        "pretrain",
        *TINY,
        "parallel.dp=2",
        "train.steps=3",
        "run_name=submitted",
        f"run_dir={run_dir}",
        # Checkpoints into the stack's bucket (NEORAY_BUCKET), whose endpoint and credentials
        # the node has.
        "storage=s3",
        "checkpoint.interval=2",
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    submission = re.search(r"submitted (raysubmit_\w+)", result.stdout).group(1)
    assert f"job {submission} SUCCEEDED" in result.stdout
    assert "RayTrainWorker" in result.stdout  # the job's logs were followed
    assert neoray(cwd, "status", submission).stdout.strip() == "SUCCEEDED"
    assert "RayTrainWorker" in neoray(cwd, "logs", submission).stdout

    client = MlflowClient(state["mlflow_url"])
    experiment = client.get_experiment_by_name("neoray").experiment_id
    [run] = client.search_runs([experiment], "tags.`neoray.run_name` = 'submitted'")
    assert run.info.status == "FINISHED"
    assert run.data.tags["ray.submission_id"] == submission
    assert run.data.tags["neoray.topology"] == "tp=1 pp=1 dp=2"
    # The uploaded project has no git history: the submitter's code version went along.
    assert run.data.tags["neoray.code_version"] == code_version()
    assert run.data.params["train.steps"] == "3"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == [0, 1, 2]
    assert (run_dir / "metrics.jsonl").exists()  # an absolute run_dir is shared with the node
    # Its checkpoints (step 2 and the last, 3) are in the bucket and recorded in MLflow.
    steps = [2, 3]
    assert {
        key: value for key, value in run.data.tags.items() if key.startswith("checkpoint.step_")
    } == {
        f"checkpoint.step_{step:08d}": f"s3://{state['bucket']}/submitted/checkpoints/step_{step:08d}"
        for step in steps
    }
    keys = [
        o["Key"] for o in stack_s3(cwd, state).list_objects_v2(Bucket=state["bucket"])["Contents"]
    ]
    for step in steps:
        assert f"submitted/checkpoints/step_{step:08d}/manifest.json" in keys


@pytest.mark.slow
def test_the_readme_sweep_command_runs_on_the_stack_as_written(stack, demo_data):
    """The demo data built where `python jobs/preprocess.py data=demo` builds it, `neoray up`
    (again) to publish it to the stack's bucket, then the README's sweep command exactly as
    written: a job's copy of the project has no runs/, so its trials read the bucket's copy."""
    cwd, state = stack
    publish_demo_data(cwd, demo_data)
    remote = f"s3://{state['bucket']}/data/demo"
    assert f"demo data: {remote} (up to date)" in neoray(cwd, "up").stdout
    readme = (ROOT / "README.md").read_text().splitlines()
    [command] = [line for line in readme if line.startswith("neoray submit sweep sweep=tiny_lr")]
    env = {key: value for key, value in os.environ.items() if not key.startswith("RAY_")}
    env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    env["PATH"] = f"{Path(NEORAY).parent}{os.pathsep}{env['PATH']}"
    started = time.monotonic()
    result = subprocess.run(
        ["bash", "-c", command], capture_output=True, text=True, timeout=1500, env=env, cwd=cwd
    )
    print(f"the README's sweep took {time.monotonic() - started:.0f} s")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "train it: python jobs/pretrain.py" in result.stdout
    assert (cwd / "runs" / "sweeps" / "tiny_lr" / "best.yaml").exists()
    assert (cwd / "runs" / "sweeps" / "tiny_lr" / "sweep.png").exists()
    assert "no token files" not in result.stdout + result.stderr
    # Its trials ran as Ray Train runs inside the job, each tracked on the stack under the
    # sweep's parent run; ASHA stopped some early.
    client = MlflowClient(state["mlflow_url"])
    experiment = client.get_experiment_by_name("neoray").experiment_id
    runs = client.search_runs([experiment], "tags.`neoray.sweep` = 'tiny_lr'")
    [parent] = [r for r in runs if r.data.tags["neoray.run_name"] == "tiny_lr.sweep"]
    trials = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(trials) == 4 and all("val/loss" in r.data.metrics for r in trials)
    ended = {(r.data.tags["neoray.sweep.status"], r.info.status) for r in trials}
    assert ended <= {("completed", "FINISHED"), ("stopped_early", "KILLED")}
    assert ("completed", "FINISHED") in ended


def publish_demo_data(cwd: Path, demo_data) -> None:
    """The demo data where `python jobs/preprocess.py data=demo` builds it, and `neoray up`
    (again), which publishes it to the stack's bucket for the stack's jobs."""
    shutil.copytree(demo_data.root, cwd / "runs" / "data" / "demo", dirs_exist_ok=True)
    published = neoray(cwd, "up")
    assert published.returncode == 0, published.stderr[-3000:]


@pytest.mark.slow
def test_a_runs_life_submitted_to_the_stack(stack, demo_data, tmp_path):
    """One submitted tp=2 job that starts from weights `transformers` saved, switches its
    mixture at step 2, reads its token files from the bucket and watches for loss spikes: each
    part works on Ray as submitted, and the run records it."""
    from test_init_from import save_transformers_model

    cwd, state = stack
    publish_demo_data(cwd, demo_data)
    released = tmp_path / "released"  # an absolute folder: the stack's node shares it
    save_transformers_model(released, seed=3)
    result = neoray(
        cwd,
        "submit",
        "pretrain",
        *TINY,
        "data=demo",
        "parallel.tp=2",
        "train.steps=4",
        "run_name=life",
        f"run_dir={tmp_path / 'life'}",
        "storage=s3",
        "checkpoint.interval=1",
        f"train.init_from={released}",
        "data.phases=[{from_step: 2, components: {code: 0.2, prose: 0.8}}]",
        "train.spike.enabled=true",
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "of the model's" in result.stdout + result.stderr  # init_from read its share
    s3 = stack_s3(cwd, state)
    body = s3.get_object(Bucket=state["bucket"], Key="life/checkpoints/step_00000004/manifest.json")
    manifest = json.loads(body["Body"].read())
    assert [phase["from_step"] for phase in manifest["mixture_phases"]] == [0, 2]
    assert manifest["skipped_steps"] == []
    assert manifest["data_fingerprint"]  # the bucket's token files, fingerprinted
    client = MlflowClient(state["mlflow_url"])
    experiment = client.get_experiment_by_name("neoray").experiment_id
    [run] = client.search_runs([experiment], "tags.`neoray.run_name` = 'life'")
    shares = client.get_metric_history(run.info.run_id, "mixture/code")
    assert [(m.step, m.value) for m in shares] == [(0, pytest.approx(0.7)), (2, pytest.approx(0.2))]


@pytest.mark.slow
def test_a_job_submitted_without_waiting_can_be_stopped(stack, tmp_path):
    cwd, _ = stack
    result = neoray(
        cwd,
        "submit",
        "--no-wait",
        "pretrain",
        *TINY,
        "train.steps=100000",
        "checkpoint.enabled=false",
        f"run_dir={tmp_path / 'stopped'}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    submission = re.search(r"submitted (raysubmit_\w+)", result.stdout).group(1)
    assert "stopping" in neoray(cwd, "stop", submission).stdout
    deadline = time.monotonic() + 60
    while (status := neoray(cwd, "status", submission).stdout.strip()) != "STOPPED":
        assert time.monotonic() < deadline, status
        time.sleep(1)


def test_unknown_job_and_missing_cluster_are_explained(tmp_path):
    unknown = neoray(tmp_path, "submit", "pretrian")
    assert unknown.returncode != 0
    assert "no job 'pretrian': choose one of" in unknown.stderr and "pretrain" in unknown.stderr
    nowhere = neoray(tmp_path, "status", "raysubmit_x")
    assert nowhere.returncode != 0
    assert "no Ray cluster: start the local one with `neoray up`" in nowhere.stderr


DASHBOARDS = Path(__file__).resolve().parents[1] / "dashboards" / "grafana"


def dashboard_queries() -> dict[str, list[str]]:
    """Every PromQL expression of every dashboard, by dashboard file."""
    return {
        path.name: [t["expr"] for p in json.loads(path.read_text())["panels"] for t in p["targets"]]
        for path in sorted(DASHBOARDS.glob("*.json"))
    }


def test_every_emitted_metric_is_on_a_dashboard_and_every_query_names_one():
    from neoray.live_metrics import ALL

    queried = {
        name
        for exprs in dashboard_queries().values()
        for expr in exprs
        for name in re.findall(r"\bray_(neoray_\w+)", expr)
    }
    assert set(ALL) - queried == set(), "emitted but on no dashboard"
    assert queried - set(ALL) == set(), "queried but emitted by nothing"


def query_range(prometheus: str, expr: str, start: float) -> list:
    from urllib.parse import urlencode

    params = urlencode({"query": expr, "start": start, "end": time.time(), "step": 2})
    with urllib.request.urlopen(f"{prometheus}/api/v1/query_range?{params}", timeout=10) as r:
        answer = json.loads(r.read())
    assert answer["status"] == "success", answer
    return answer["data"]["result"]


@pytest.mark.slow
def test_every_dashboard_query_returns_data_after_a_run_and_its_evaluation(stack, tmp_path):
    """A training run with checkpoints and its scheduled evaluation on the stack; then every
    expression of every dashboard (the run selected) has data in the stack's Prometheus."""
    from neoray.evaluation import testdata

    cwd, state = stack
    start = time.time() - 5
    s3 = ["storage=s3", f"storage.bucket={state['bucket']}", "storage.prefix=dash"]
    trained = neoray(
        cwd, "submit", "pretrain", *TINY, *s3, "train.steps=40", "train.eval_interval=10",
        "checkpoint.interval=10", "run_name=dashed", f"run_dir={tmp_path / 'run'}",
    )  # fmt: skip
    assert trained.returncode == 0, trained.stdout[-3000:] + trained.stderr[-3000:]
    mirror = testdata.write_all(tmp_path / "mirror")
    testdata.write_tokenizer(tmp_path / "tokenizer.json", mirror, vocab_size=512)
    (tmp_path / "suites").mkdir()
    (tmp_path / "suites" / "arith.yaml").write_text("suite: arith\ntasks: [arithmetic_2da]\n")
    evaluated = neoray(
        cwd, "submit", "eval_watch", *s3, "run_name=dashed", "suites=[arith]",
        f"suite_dir={tmp_path / 'suites'}", f"tokenizer={tmp_path / 'tokenizer.json'}",
        f"cache_dir={tmp_path / 'exports'}", f"eval.data_dir={mirror}", "eval.limit=4",
        "tracking=server", "schedule.every=40", "schedule.until_finished=true",
        "schedule.poll_seconds=1", f"hydra.run.dir={tmp_path / 'hydra'}",
    )  # fmt: skip
    assert evaluated.returncode == 0, evaluated.stdout[-3000:] + evaluated.stderr[-3000:]

    pending = {
        (name, expr.replace("$run", "dashed"))
        for name, exprs in dashboard_queries().items()
        for expr in exprs
    }
    deadline = time.monotonic() + 60  # the last values reach Prometheus within a scrape or two
    while pending and time.monotonic() < deadline:
        pending = {(n, e) for n, e in pending if not query_range(state["prometheus_url"], e, start)}
        if pending:
            time.sleep(3)
    assert not pending, f"no data for: {sorted(pending)}"


SUBMITTED = '{"metadata": {"job_submission_id": "raysubmit_abc", "neoray.job": "pretrain"}}'


def test_submitted_jobs_refuse_locations_inside_rays_job_folder(monkeypatch):
    from neoray.cluster.submit import check_durable_locations
    from neoray.config import ConfigError
    from neoray.storage import StorageConfig
    from neoray.tracking import TrackingConfig

    relative_storage, relative_tracking = StorageConfig(root="runs"), TrackingConfig()
    check_durable_locations(relative_storage, relative_tracking)  # not a submitted job: fine
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", SUBMITTED)
    with pytest.raises(ConfigError, match=r"storage.root='runs' is relative.*storage=s3"):
        check_durable_locations(relative_storage)
    for uri in ("sqlite:///mlruns.db", "mlruns", "file://mlruns"):
        with pytest.raises(
            ConfigError, match=r"tracking.uri=.* is a relative path.*tracking=server"
        ):
            check_durable_locations(tracking=TrackingConfig(uri=uri))
    check_durable_locations(
        StorageConfig(kind="s3", bucket="b"), TrackingConfig(uri="http://127.0.0.1:5000")
    )
    check_durable_locations(
        StorageConfig(root="/shared/runs"), TrackingConfig(uri="sqlite:////shared/mlruns.db")
    )
    check_durable_locations(tracking=TrackingConfig(enabled=False))


@pytest.mark.parametrize(
    ("job", "overrides", "field"),
    [
        ("pretrain", ["storage=s3"], "run_dir"),
        ("pretrain", ["run_dir=/r", "storage=s3", "checkpoint.staging_dir=st"], "checkpoint.staging_dir"),
        ("pretrain", ["run_dir=/r", "storage=s3", "cluster.storage_path=ray"], "cluster.storage_path"),
        ("pretrain", ["run_dir=/r"], "storage.root"),
        ("sweep", ["sweep=tiny_lr", "storage=s3"], "sweep_dir"),
        ("sweep", ["sweep_dir=/s", "storage=s3", "checkpoint.staging_dir=st"], "checkpoint.staging_dir"),
        ("memorization", ["checkpoint=x"], "output_dir"),
        ("preprocess", ["output_prefix=data/tokens"], "output_prefix"),
    ],
)  # fmt: skip
def test_a_job_writing_to_a_relative_folder_is_refused_before_submission(job, overrides, field):
    from neoray.cluster.submit import SubmitError, check_submission

    with pytest.raises(SubmitError, match=rf"^{re.escape(field)}=.* is relative.* absolute"):
        check_submission(job, overrides)


def test_absolute_folders_pass_the_submission_check_and_the_cli_refuses_before_any_cluster(
    tmp_path,
):
    from neoray.cluster.submit import check_submission

    check_submission("pretrain", ["run_dir=/r", "checkpoint.staging_dir=/st", "storage=s3"])
    check_submission("pretrain", ["run_dir=/r", "storage.root=/shared/runs"])
    check_submission("sweep", ["sweep_dir=/s", "checkpoint.enabled=false"])
    check_submission("sweep", ["sweep_dir=/s", "sweep.fixed=['storage=s3']"])  # trials' storage
    check_submission("evaluate", ["checkpoint=x"])  # reads storage, writes only a cache
    refused = neoray(tmp_path, "submit", "sweep", "sweep=tiny_lr", "storage=s3")
    assert refused.returncode != 0 and "submitted" not in refused.stdout
    assert "neoray submit: sweep_dir='runs/sweeps/tiny_lr' is relative" in refused.stderr
    assert "no Ray cluster" not in refused.stderr  # refused before a cluster is looked for


def test_a_job_submitted_otherwise_checks_its_folders_itself(monkeypatch):
    """A RayJob or a Jobs API client other than `neoray submit` was not checked before."""
    from omegaconf import OmegaConf

    from neoray.cluster.submit import check_outputs
    from neoray.config import ConfigError

    cfg = OmegaConf.create({"sweep_dir": "runs/sweeps/x", "storage": {"kind": "s3"}})
    check_outputs("sweep", cfg)  # not a submitted job: fine
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", SUBMITTED)
    with pytest.raises(ConfigError, match=r"sweep_dir='runs/sweeps/x' is relative"):
        check_outputs("sweep", cfg)


def test_evaluate_logs_where_the_cluster_says(monkeypatch):
    from hydra import compose, initialize_config_dir

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5999")
    conf = Path(__file__).resolve().parents[1] / "conf"
    with initialize_config_dir(config_dir=str(conf), version_base=None):
        cfg = compose(config_name="evaluate", overrides=["checkpoint=x"])
    assert cfg.tracking.uri == "http://127.0.0.1:5999"


@pytest.mark.slow
def test_a_submitted_job_with_local_storage_is_refused_before_it_trains(stack, tmp_path):
    cwd, _ = stack
    result = neoray(
        cwd, "submit", "pretrain", *TINY, "train.steps=2", "run_name=local",
        f"run_dir={tmp_path / 'local'}",
    )  # fmt: skip
    assert result.returncode != 0
    assert "storage.root='runs' is relative" in result.stderr
    assert "submitted" not in result.stdout
