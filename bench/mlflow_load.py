"""MLflow under concurrent writers: SQLite against the stack's PostgreSQL, side by side.

A training rank, a fan-out of evaluation workers and a sweep's trials all write to one tracking
server at once. Here `--writers` processes each create a run and log `--steps` rows of
`--metrics-per-step` metrics (one `log_batch` per row, as the trainer logs a step) and
`--artifacts` small artifacts, all at the same time. Every value is then read back: the run
must hold exactly what was logged. Reported per server: wall time, the time per logged metric,
calls that failed, and values lost.

The two servers: MLflow on SQLite (what a single user's `mlflow server` keeps by default) and
the server of `neoray up` (PostgreSQL, basic auth, artifacts in its S3), both started here.
The ratio is time per metric, PostgreSQL stack over SQLite; the goal is no error and nothing
lost on the stack. With `--url`, only the server there is loaded (credentials from
MLFLOW_TRACKING_USERNAME/PASSWORD); the exit code is non-zero when anything failed or was lost.

    .venv/bin/python bench/mlflow_load.py            # 16 writers x 2,000 metrics, 20 artifacts
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Load:
    writers: int
    steps: int
    metrics_per_step: int
    artifacts: int

    @property
    def metrics(self) -> int:
        """Metric values each writer logs."""
        return self.steps * self.metrics_per_step


@dataclass
class Outcome:
    seconds: float
    errors: list[str]
    lost: int  # values or artifacts not read back as logged

    def ms_per_metric(self, load: Load) -> float:
        return 1000 * self.seconds / (load.writers * load.metrics)


def value(writer: int, step: int, key: int) -> float:
    """A distinct value for every (writer, step, metric), so a mixed-up row is caught."""
    return writer * 1e6 + step * 1e3 + key


def write(args: tuple[str, str, int, Load]) -> tuple[str | None, list[str]]:
    """One writer: its run, every row of metrics, then its artifacts. Returns the run id and
    the calls that raised (after the client's own retries)."""
    url, experiment_id, writer, load = args
    from mlflow import MlflowClient
    from mlflow.entities import Metric

    client = MlflowClient(url)
    errors = []
    try:
        run_id = client.create_run(experiment_id, run_name=f"writer-{writer}").info.run_id
    except Exception as error:
        return None, [f"writer {writer} create_run: {error}"]
    for step in range(load.steps):
        now = int(time.time() * 1000)
        row = [
            Metric(f"m{key}", value(writer, step, key), now, step)
            for key in range(load.metrics_per_step)
        ]
        try:
            client.log_batch(run_id, metrics=row)
        except Exception as error:
            errors.append(f"writer {writer} step {step}: {error}")
    for index in range(load.artifacts):
        try:
            client.log_text(run_id, f"writer {writer} artifact {index}", f"a/{index}.txt")
        except Exception as error:
            errors.append(f"writer {writer} artifact {index}: {error}")
    try:
        client.set_terminated(run_id)
    except Exception as error:
        errors.append(f"writer {writer} set_terminated: {error}")
    return run_id, errors


def lost_values(url: str, run_ids: dict[int, str], load: Load) -> int:
    """Values and artifacts that are not in MLflow exactly as logged."""
    from mlflow import MlflowClient

    client = MlflowClient(url)
    lost = 0
    for writer, run_id in run_ids.items():
        for key in range(load.metrics_per_step):
            history = {m.step: m.value for m in client.get_metric_history(run_id, f"m{key}")}
            expected = {step: value(writer, step, key) for step in range(load.steps)}
            lost += sum(history.get(step) != v for step, v in expected.items())
        stored = {a.path for a in client.list_artifacts(run_id, "a")}
        lost += sum(f"a/{index}.txt" not in stored for index in range(load.artifacts))
    return lost


def run_load(url: str, load: Load) -> Outcome:
    """`load.writers` processes writing at once to the server at `url`, then everything read
    back."""
    from mlflow import MlflowClient

    experiment_id = MlflowClient(url).create_experiment(f"load-{uuid.uuid4().hex[:8]}")
    work = [(url, experiment_id, writer, load) for writer in range(load.writers)]
    context = multiprocessing.get_context("spawn")
    with context.Pool(load.writers) as pool:
        pool.map(_warm, range(load.writers))  # imports done before the clock starts
        start = time.perf_counter()
        results = pool.map(write, work)
        seconds = time.perf_counter() - start
    errors = [error for _, found in results for error in found]
    run_ids = {writer: run_id for writer, (run_id, _) in enumerate(results) if run_id}
    missing_runs = load.writers - len(run_ids)
    lost = lost_values(url, run_ids, load) + missing_runs * (load.metrics + load.artifacts)
    return Outcome(seconds, errors, lost)


def _warm(_: int) -> None:
    import mlflow  # noqa: F401


def report(name: str, load: Load, outcome: Outcome) -> None:
    print(
        f"{name:<28} {outcome.seconds:8.1f} s {outcome.ms_per_metric(load):9.3f} ms/metric "
        f"{len(outcome.errors):6d} failed calls {outcome.lost:7d} lost"
    )
    for error in outcome.errors[:5]:
        print(f"    {error[:300]}")


def sqlite_server(directory: Path, load: Load) -> Outcome:
    from neoray.cluster.services import (
        free_ports,
        mlflow_ready,
        running,
        sqlite_mlflow_command,
    )

    (port,) = free_ports(1)
    url = f"http://127.0.0.1:{port}"
    command = sqlite_mlflow_command(directory, port)
    with running("MLflow", command, log=directory / "mlflow.log", ready=mlflow_ready(url)):
        return run_load(url, load)


def stack_server(directory: Path, load: Load) -> Outcome:
    from neoray.cluster import stack

    state = directory / ".neoray"
    running_stack = stack.up(state, num_cpus=1)
    try:
        os.environ.update(stack.mlflow_client_env(state))  # the writers inherit it
        return run_load(running_stack.mlflow_url, load)
    finally:
        stack.down(state)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--writers", type=int, default=16)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--metrics-per-step", type=int, default=20)
    parser.add_argument("--artifacts", type=int, default=20)
    parser.add_argument("--url", help="load only this server")
    args = parser.parse_args()
    os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] = "true"  # for the writers too
    load = Load(args.writers, args.steps, args.metrics_per_step, args.artifacts)
    print(
        f"{load.writers} writers x {load.metrics} metrics ({load.steps} rows of "
        f"{load.metrics_per_step}) and {load.artifacts} artifacts each, at once"
    )
    if args.url:
        outcome = run_load(args.url, load)
        report(args.url, load, outcome)
        return 0 if not outcome.errors and not outcome.lost else 1

    with tempfile.TemporaryDirectory(prefix="mlflow-load-") as tmp:
        (Path(tmp) / "sqlite").mkdir()
        sqlite = sqlite_server(Path(tmp) / "sqlite", load)
        report("SQLite", load, sqlite)
        postgres = stack_server(Path(tmp) / "stack", load)
        report("PostgreSQL (neoray up)", load, postgres)
    ratio = postgres.ms_per_metric(load) / sqlite.ms_per_metric(load)
    print(f"ratio PostgreSQL/SQLite time per metric: {ratio:.2f}x")
    return 0 if not postgres.errors and not postgres.lost else 1


if __name__ == "__main__":
    sys.exit(main())
