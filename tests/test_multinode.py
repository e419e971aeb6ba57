"""neoray on a Ray cluster of three nodes on this machine (tests/ray_cluster.py): a head without
CPUs and two worker nodes that share no credentials with the job: every node is started
without AWS variables, only the driver has them, and checkpoints and data live in S3 (a real
SeaweedFS). Training places one worker per node, survives the loss of a node by resuming on a
replacement, and a run the cluster cannot place stops naming what to do; preprocessing and the
evaluation fan-out spread over the nodes and read S3 there with the job's credentials.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import layouts
import pytest
from distributed import run_command, torchrun_launcher
from mlflow import MlflowClient
from ray_cluster import RayCluster
from run_history import check_history, resumed_at

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
STEPS = 40
CONFIG = [
    "model=tiny",
    "parallel.dp=2",
    f"train.steps={STEPS}",
    "data.seq_len=32",
    "train.peak_tflops=1.0",
    "tracking.system_metrics=false",
]
ELASTIC = (2, 1, 2)  # the elastic run's layout (tp, pp, dp) before it loses a node


@pytest.fixture(scope="module")
def cluster(s3_server, tmp_path_factory):
    """The head and worker nodes a and b (two CPUs each), none of them with S3 settings."""
    directory = Path(tempfile.mkdtemp(prefix="rc-", dir="/tmp"))  # short socket paths
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env |= {"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    ray = RayCluster(directory, env)
    try:
        ray.add_node("node_a", 2)
        ray.add_node("node_b", 2)
        yield ray
    finally:
        ray.shutdown()
        shutil.rmtree(directory, ignore_errors=True)


def two_worker_nodes(cluster: RayCluster) -> None:
    """Start worker nodes until two run (after a test that lost one)."""
    for name in ("node_x", "node_y"):
        if len(cluster.worker_nodes()) < 2:
            cluster.add_node(name, 2)


def job_env(cluster: RayCluster, s3_server) -> dict[str, str]:
    """A driver of the cluster: the only process with the S3 endpoint and credentials."""
    return {**cluster.driver_env(), **s3_server.env()}


def rows(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def committed(client, bucket: str, run: str) -> list[int]:
    """Steps whose manifest is in the bucket (what a resume would find)."""
    listed = client.list_objects_v2(Bucket=bucket, Prefix=f"{run}/checkpoints/")
    keys = [item["Key"] for item in listed.get("Contents", [])]
    return sorted(
        int(key.split("/")[-2].removeprefix("step_"))
        for key in keys
        if key.endswith("/manifest.json")
    )


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    """The run dir of CONFIG's run under torchrun on this machine, never interrupted."""
    run_dir = tmp_path_factory.mktemp("uninterrupted")
    run_command(
        [
            *torchrun_launcher(2),
            "jobs/pretrain.py",
            "launcher=torchrun",
            *CONFIG,
            "checkpoint.enabled=false",
            "tracking.enabled=false",
            f"run_dir={run_dir}",
        ],
        timeout=400,
        cwd=ROOT,
        env={**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"},
    )
    return run_dir


def test_a_lost_node_is_replaced_and_the_run_resumes_as_if_never_interrupted(
    cluster, s3_server, tmp_path, uninterrupted
):
    bucket, client = s3_server.new_bucket(), s3_server.client()
    env = job_env(cluster, s3_server) | {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/ml.db"}
    run_dir = tmp_path / "run"
    command = [
        sys.executable,
        "jobs/pretrain.py",
        *CONFIG,
        "run_name=spread",
        "storage=s3",
        f"storage.bucket={bucket}",
        "checkpoint.interval=4",
        "cluster.max_failures=1",
        "cluster.placement_strategy=STRICT_SPREAD",
        "cluster.placement_timeout_s=120",
        f"run_dir={run_dir}",
    ]
    log = tmp_path / "job.log"
    with open(log, "wb") as out:
        job = subprocess.Popen(
            command, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        # Once a checkpoint past step 0 is in S3 and a later step is logged, lose node b: the
        # steps since that checkpoint are trained again after the restart.
        deadline, placed = time.monotonic() + 300, None
        while True:
            assert job.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, "no checkpoint committed in time"
            newest = max(committed(client, bucket, "spread"), default=0)
            logged = max((row["step"] for row in rows(run_dir)), default=-1)
            if newest > 0 and logged > newest:
                break
            if logged >= 0 and placed is None:  # the workers train: where are they?
                placed = {
                    name: len(node.processes_named("RayTrainWorker"))
                    for name, node in cluster.nodes.items()
                }
            time.sleep(0.05)
        cluster.kill("node_b")
        committed_before = committed(client, bucket, "spread")
        assert logged < STEPS - 1, "training ended before the node was lost"
        assert placed == {"head": 0, "node_a": 1, "node_b": 1}, "one worker on each node"
        replacement = cluster.add_node("node_c", 2)
        assert job.wait(timeout=400) == 0, log.read_text()[-5000:]
        assert "node_c" in cluster.nodes and replacement.proc.poll() is None
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
            job.wait()

    # metrics.jsonl is cut back to the checkpoint on resume: one row per step, as trained last.
    resumed, expected = rows(run_dir), rows(uninterrupted)
    assert [row["step"] for row in resumed] == list(range(STEPS))
    assert [row["loss"] for row in resumed] == pytest.approx(
        [row["loss"] for row in expected], rel=1e-6
    )
    # MLflow has every step as promised, whenever the node was lost.
    tracking = MlflowClient(env["MLFLOW_TRACKING_URI"])
    experiment = tracking.get_experiment_by_name("neoray").experiment_id
    [run] = tracking.search_runs([experiment], "tags.`neoray.run_name` = 'spread'")
    assert run.info.status == "FINISHED"
    resumed_step = resumed_at(log.read_text(), "spread")
    assert newest in committed_before and newest <= resumed_step
    check_history(tracking.get_metric_history(run.info.run_id, "loss"), resumed, resumed_step)
    assert committed(client, bucket, "spread")[-1] == STEPS


def test_an_elastic_run_continues_on_the_nodes_left_resharded_with_the_same_losses(
    cluster, s3_server, tmp_path, reference_runs
):
    """tp=2 x dp=2, two workers on each worker node; one node is lost and the run continues at
    tp=2 x dp=1 on the node left, accumulating twice the micro-batches. Its losses are those
    of the uninterrupted tp=2 x dp=2 run (`layouts`, shared with the resume tests) up to the
    float rounding that another dp changes."""
    two_worker_nodes(cluster)
    bucket, client = s3_server.new_bucket(), s3_server.client()
    run_dir = tmp_path / "run"
    command = [
        sys.executable,
        "jobs/pretrain.py",
        *layouts.overrides(ELASTIC),
        "run_name=elastic",
        "storage=s3",
        f"storage.bucket={bucket}",
        "checkpoint.interval=4",
        f"optim.decay_steps={layouts.STEPS}",  # the reference's schedule, whatever train.steps
        "cluster.placement_strategy=SPREAD",  # four workers need both worker nodes' CPUs
        "cluster.placement_timeout_s=5",
        "cluster.elastic=true",
        "tracking.enabled=false",
        f"run_dir={run_dir}",
    ]
    env = job_env(cluster, s3_server)
    run_command([*command, "train.steps=4"], timeout=400, cwd=ROOT, env=env)
    assert committed(client, bucket, "elastic")[-1] == 4
    cluster.kill(cluster.worker_nodes()[-1])  # no replacement: one worker node is left
    output = run_command([*command, "train.steps=8"], timeout=400, cwd=ROOT, env=env)
    assert "continuing with dp=1 and grad_accum_steps=4 (was dp=2, 2)" in output
    assert "resharded step 4 from tp=2, pp=1, dp=2 to tp=2, pp=1, dp=1" in output
    resumed, expected = rows(run_dir), layouts.metrics(reference_runs(ELASTIC).run_dir)
    assert [row["step"] for row in resumed] == list(range(8))
    assert [row["loss"] for row in resumed] == pytest.approx(
        [expected[step]["loss"] for step in range(8)], rel=1e-5
    )
    assert committed(client, bucket, "elastic")[-1] == 8


def test_a_run_the_cluster_cannot_place_stops_naming_the_fix(cluster, s3_server, tmp_path):
    # No node has three CPUs: the group of two such workers never fits.
    result = subprocess.run(
        [
            sys.executable,
            "jobs/pretrain.py",
            *CONFIG,
            "cluster.cpus_per_worker=3",
            "cluster.placement_timeout_s=3",
            "checkpoint.enabled=false",
            "tracking.enabled=false",
            f"run_dir={tmp_path / 'run'}",
        ],
        cwd=ROOT,
        env=job_env(cluster, s3_server),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert "PlacementError: Ray could not place the run's 2 workers" in output, output[-3000:]
    for words in ("cluster.placement_timeout_s=3", "cluster.elastic", "ray start --address"):
        assert words in output


def node_names(cluster: RayCluster) -> dict[str, str]:
    """Node id (hex) -> the name of the node, for every node the head knows, dead ones too."""
    from ray._raylet import GcsClient

    infos = GcsClient(address=cluster.address).get_all_node_info(timeout=10)
    return {
        node_id.hex(): next(
            (n for n in info.resources_total if n.startswith(("node_", "head"))), ""
        )
        for node_id, info in infos.items()
    }


def task_nodes(cluster: RayCluster, name: str, count: int) -> list[str]:
    """The names of the nodes that ran the `count` finished tasks called `name` (Ray's task
    records, as the dashboard shows them; they arrive within seconds)."""
    from ray.util.state import list_tasks

    deadline = time.monotonic() + 60
    while True:
        tasks = list_tasks(
            address=cluster.dashboard,
            filters=[("name", "=", name), ("state", "=", "FINISHED")],
            limit=1000,
            raise_on_missing_output=False,
        )
        if len(tasks) >= count or time.monotonic() > deadline:
            break
        time.sleep(1)
    names = node_names(cluster)
    return sorted(names[task.node_id] for task in tasks)


def test_nodes_start_without_s3_settings(cluster):
    for node in cluster.nodes.values():
        assert not [name for name in node.raylet().environ() if name.startswith("AWS_")]


def test_preprocessing_on_every_node_reads_s3_with_the_jobs_credentials(
    cluster, s3_server, tmp_path, monkeypatch
):
    from neoray.data.preprocess import PreprocessConfig, preprocess
    from neoray.tokenizer.load import RELEASED_20B

    two_worker_nodes(cluster)
    bucket, client = s3_server.new_bucket(), s3_server.client()
    for part in range(4):
        text = "".join(
            json.dumps({"text": f"part {part} document {n}: " + "lorem ipsum " * n}) + "\n"
            for n in range(40)
        )
        client.put_object(Bucket=bucket, Key=f"corpus/{part}.jsonl", Body=text.encode())
    config = {
        "input": f"s3://{bucket}/corpus/*.jsonl",
        "tokenizer": RELEASED_20B,
        "shard_mb": 0.005,
    }
    run_command(
        [
            sys.executable,
            "jobs/preprocess.py",
            *[f"{k}={v}" for k, v in config.items()],
            "executor=ray",
            f"output_prefix={tmp_path / 'ray' / 'out'}",
        ],
        timeout=300,
        cwd=ROOT,
        env=job_env(cluster, s3_server),
    )
    for name, value in s3_server.env().items():
        monkeypatch.setenv(name, value)
    prefix = str(tmp_path / "local" / "out")
    preprocess(PreprocessConfig(**config, output_prefix=prefix), show_progress=False)
    for suffix in (".bin", ".idx"):
        ray_output = (tmp_path / "ray" / f"out{suffix}").read_bytes()
        assert ray_output == Path(prefix + suffix).read_bytes()
    assert json.loads(Path(prefix + ".report.json").read_text())["documents"] == 160
    ran_on = task_nodes(cluster, "tokenize_shard", count=8)
    assert len(ran_on) >= 8 and len(set(ran_on)) == 2 and "head" not in ran_on, ran_on


EVAL_TASK, EVAL_LIMIT = "arithmetic_2da", 40


def evaluate_on_cluster(hf_dir: str, data_dir: str, out: str) -> None:
    """The child's part: the fan-out as the driver of the cluster (RAY_ADDRESS), results to
    `out` as JSON."""
    from neoray.cluster.ray_start import start_or_join
    from neoray.evaluation.config import EvalConfig
    from neoray.evaluation.fanout import evaluate_suite

    start_or_join(log_to_driver=False)
    config = EvalConfig(
        suite="test",
        tasks=[EVAL_TASK],
        limit=EVAL_LIMIT,
        workers=2,
        batch_size=1,
        data_dir=data_dir,
    )
    results = evaluate_suite(hf_dir, config)
    Path(out).write_text(json.dumps({"results": results["results"], "failed": results["failed"]}))


def test_evaluation_units_run_on_several_nodes_from_an_s3_mirror(cluster, s3_server, tmp_path):
    import lm_eval

    from neoray.evaluation import testdata
    from neoray.evaluation.mirror import task_manager

    two_worker_nodes(cluster)
    mirror = testdata.write_all(tmp_path / "mirror")
    model_dir = testdata.write_random_model(tmp_path / "model" / "hf", mirror, output_scale=6.0)
    bucket, client = s3_server.new_bucket(), s3_server.client()
    for path in sorted(mirror.rglob("*.jsonl")):
        client.upload_file(str(path), bucket, f"mirror/{path.relative_to(mirror)}")
    out = tmp_path / "results.json"
    run_command(
        [sys.executable, __file__, str(model_dir), f"s3://{bucket}/mirror", str(out)],
        timeout=300,
        cwd=ROOT,
        env=job_env(cluster, s3_server) | {"NEORAY_EVAL_CACHE": str(tmp_path / "cache")},
    )
    merged = json.loads(out.read_text())
    direct = lm_eval.simple_evaluate(
        model="hf",
        model_args={"pretrained": str(model_dir), "dtype": "float32"},
        tasks=[EVAL_TASK],
        device="cpu",
        limit=EVAL_LIMIT,
        batch_size=1,
        task_manager=task_manager(mirror),
    )
    assert merged["failed"] == {}
    assert merged["results"] == json.loads(json.dumps(direct["results"]))
    ran_on = task_nodes(cluster, "run_unit", count=2)
    assert len(ran_on) == 2 and len(set(ran_on)) == 2 and "head" not in ran_on, ran_on


if __name__ == "__main__":
    evaluate_on_cluster(*sys.argv[1:])
