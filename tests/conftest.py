"""Shared fixtures. Services (S3, MLflow, Ray) are started by the fixtures that need them."""

from pathlib import Path

import pytest
import services
import torch
import transformers

from neoray.model import GPTNeoX, NeoXConfig
from neoray.model.hf import save_hf

# Parallel and sequential residual, rotary on a quarter, all or half of each head, odd head counts.
CONFIGS = {
    "parallel_rot25": NeoXConfig(
        vocab_size=1000, num_layers=3, hidden_size=96, num_heads=6, max_seq_len=96
    ),
    "sequential_rot100_5heads": NeoXConfig(
        vocab_size=700,
        num_layers=2,
        hidden_size=80,
        num_heads=5,
        max_seq_len=96,
        rotary_pct=1.0,
        parallel_residual=False,
    ),
    "parallel_rot50_3heads_ffn100": NeoXConfig(
        vocab_size=300,
        num_layers=2,
        hidden_size=48,
        num_heads=3,
        max_seq_len=96,
        rotary_pct=0.5,
        intermediate_size=100,
        rotary_base=500.0,
        vocab_multiple=64,
    ),
}


@pytest.fixture(params=list(CONFIGS), scope="module")
def pair(request, tmp_path_factory):
    """A random neoray model and the same weights loaded by transformers from our export."""
    torch.manual_seed(0)
    ours = GPTNeoX(CONFIGS[request.param]).eval()
    out = save_hf(ours, tmp_path_factory.mktemp("hf") / request.param)
    theirs = transformers.GPTNeoXForCausalLM.from_pretrained(out).eval()
    return ours, theirs


# Data pipeline: a real local Ray, and a small demo corpus tokenized once per session.

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"


@pytest.fixture(scope="session")
def ray_local():
    """A real local Ray (two CPUs, no dashboard), started once and shared."""
    import ray

    if not ray.is_initialized():
        ray.init(address="local", num_cpus=2, include_dashboard=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory):
    """The demo data config (conf/data/demo.yaml) built in a temporary root, made small:
    80 standard-library files and the pydoc topics, a 1,000-token tokenizer trained on them,
    and both components tokenized into .bin/.idx by `prepare_data`."""
    from omegaconf import OmegaConf

    from neoray.data.config import data_config
    from neoray.data.demo_corpus import (
        code_documents,
        prose_documents,
        stdlib_code_files,
        write_jsonl,
    )
    from neoray.data.prepare import prepare_data

    root = tmp_path_factory.mktemp("demo")
    write_jsonl(str(root / "raw" / "code.jsonl"), code_documents(stdlib_code_files()[:80]))
    write_jsonl(str(root / "raw" / "prose.jsonl"), prose_documents())
    section = OmegaConf.create({"data": OmegaConf.load(CONF_DIR / "data" / "demo.yaml")})
    section.data.root = str(root)
    section.data.tokenizer_training.vocab_size = 1000
    cfg = data_config(section.data)
    prepare_data(cfg, show_progress=False)
    return cfg


# S3: a real SeaweedFS server for the session, and a fresh bucket per test.

S3_ENV_OVERRIDES = ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3")


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A real S3 endpoint (SeaweedFS) on 127.0.0.1, started once and shared."""
    with services.seaweedfs(tmp_path_factory.mktemp("seaweedfs")) as server:
        yield server


@pytest.fixture
def s3_bucket(s3_server, monkeypatch):
    """The name of a new, empty bucket, with the environment pointing boto3 at the server
    (and nothing else, such as a profile or a session token, that would take precedence)."""
    for name in S3_ENV_OVERRIDES:
        monkeypatch.delenv(name, raising=False)
    for name, value in s3_server.env().items():
        monkeypatch.setenv(name, value)
    return s3_server.new_bucket()


@pytest.fixture(params=["local", "s3"])
def storage(request, tmp_path):
    """A `neoray.storage` backend of each kind: a local directory, and a prefix of a new bucket."""
    from neoray.storage import StorageConfig, open_storage

    if request.param == "local":
        return open_storage(StorageConfig(root=str(tmp_path / "root")))
    bucket = request.getfixturevalue("s3_bucket")
    return open_storage(StorageConfig(kind="s3", bucket=bucket, prefix="some/prefix"))


# Tracking: training jobs started by any test log to a throwaway MLflow database, not the
# checkout's mlruns.db (conf/tracking/local.yaml honours MLFLOW_TRACKING_URI).


@pytest.fixture(scope="session", autouse=True)
def mlflow_tracking_uri(tmp_path_factory):
    import os

    uri = f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlruns.db'}"
    previous = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = uri
    yield uri
    if previous is None:
        del os.environ["MLFLOW_TRACKING_URI"]
    else:
        os.environ["MLFLOW_TRACKING_URI"] = previous


# Runs of the tiny model at a parallel layout, never interrupted: the reference of the resume
# tests (tests/layouts.py), each trained once per session, on first use.


@pytest.fixture(scope="session")
def reference_runs(tmp_path_factory):
    """`reference_runs(layout)`: the uninterrupted run at `layout` (a `layouts.TrainedRun`)."""
    from layouts import TrainedRun, launch, name

    root = tmp_path_factory.mktemp("reference_runs")
    trained: dict = {}

    def reference(layout: tuple[int, int, int]) -> TrainedRun:
        if layout not in trained:
            run = TrainedRun(root / name(layout) / "run", root / name(layout) / "store")
            launch(layout, run.run_dir, [f"storage.root={run.store}"])
            trained[layout] = run
        return trained[layout]

    return reference
