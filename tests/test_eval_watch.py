"""Scheduled evaluation: the policy, the ledger's claims, and the watcher, on real storage (a local
directory and SeaweedFS). The end-to-end test trains a run that commits four checkpoints to S3,
SIGKILLs a watcher in the middle of an evaluation and restarts it: every selected (checkpoint,
suite) ends done exactly once, in the ledger and in a real MLflow server."""

from __future__ import annotations

import concurrent.futures
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import pytest
import services

from neoray.checkpoint.manifest import CorruptCheckpointError, manifest_key, read_manifest
from neoray.config import ConfigError
from neoray.evaluation import testdata
from neoray.evaluation.config import EvalConfig
from neoray.evaluation.ledger import Ledger, entry_key
from neoray.evaluation.report import ledger_table
from neoray.evaluation.run import check_tasks, load_suite
from neoray.evaluation.schedule import Policy, ScheduleConfig
from neoray.evaluation.watch import ExportCache, Watcher
from neoray.storage import StorageConfig, StorageError, open_storage

ROOT = Path(__file__).resolve().parents[1]
MODEL_PARALLEL = (2, 2, 1)  # (tp, pp, dp) of the model-parallel run watched
T0 = datetime(2026, 3, 2, 0, 0, tzinfo=timezone.utc).timestamp()  # a Monday, midnight UTC


# -- the policy


def test_every_k_milestones_and_the_final_step():
    committed = {step: T0 + step for step in (0, 1, 2, 4, 6, 8, 9, 10, 512, 1000, 1001)}
    select = lambda **kw: sorted(Policy(ScheduleConfig(**kw)).select(committed, 1001, T0 + 1e6))  # noqa: E731
    assert select() == sorted(committed)
    assert select(every=4) == [0, 4, 8, 512, 1000, 1001]
    assert select(milestones=True) == [0, 1, 2, 4, 8, 512, 1001]
    assert select(every=5, milestones=True) == [0, 1, 2, 4, 8, 10, 512, 1000, 1001]
    assert sorted(Policy(ScheduleConfig(every=4)).select(committed, None, T0)) == [
        0, 4, 8, 512, 1000
    ]  # fmt: skip


def test_cron_takes_the_latest_checkpoint_committed_by_each_time():
    """Checkpoints every 40 minutes, cron at the top of every hour; the clock is advanced by
    hand. Each hour selects what was committed by then; the walk resumes where it stopped."""
    policy = Policy(ScheduleConfig(cron="0 * * * *"))
    committed = {}
    for minute in range(0, 5 * 60, 40):  # steps 0, 40, ..., 280 at T0 + that many minutes
        committed[minute] = T0 + 60 * minute

    def seen(now: float) -> list[int]:
        return sorted(policy.select({s: t for s, t in committed.items() if t <= now}, None, now))

    assert seen(T0 + 59 * 60) == []  # no full hour yet
    assert seen(T0 + 60 * 60) == [40]  # 01:00 -> committed at 00:40
    assert seen(T0 + 3 * 3600 + 5) == [40, 120, 160]  # 02:00 -> 02:00 itself; 03:00 -> 02:40
    assert seen(T0 + 3 * 3600 + 10) == [40, 120, 160]  # nothing new within the hour
    assert seen(T0 + 5 * 3600) == [40, 120, 160, 240, 280]
    assert policy.cron_walked_to == T0 + 5 * 3600


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"cron": "every hour"}, "schedule.cron='every hour' is not a cron expression"),
        ({"every": 0}, "schedule.every=0"),
        ({"heartbeat_seconds": 30, "stale_seconds": 40}, "schedule.stale_seconds=40"),
        ({"max_concurrent": 0}, "schedule.max_concurrent"),
        ({"poll_seconds": 0}, "schedule.poll_seconds"),
    ],
)
def test_bad_schedules_are_refused(fields, message):
    with pytest.raises(ConfigError, match=message):
        ScheduleConfig(**fields)


def test_unknown_suite_lists_the_known_ones(tmp_path):
    (tmp_path / "mine.yaml").write_text("suite: mine\ntasks: [arithmetic_2da]\n")
    assert load_suite("mine", {"limit": 3}, str(tmp_path)).limit == 3
    assert load_suite("math", {}).tasks == ["gsm8k", "hendrycks_math", "arithmetic"]
    with pytest.raises(
        ConfigError, match=r"no suite 'mmlu_7shot' .* choose from .*math, memorization, mine"
    ):
        load_suite("mmlu_7shot", {}, str(tmp_path))


def test_a_suite_takes_its_own_task_folders_and_the_jobs(tmp_path, monkeypatch):
    for name in ("suites", "ours/held", "theirs", "empty"):
        (tmp_path / name).mkdir(parents=True)
    (tmp_path / "ours" / "held" / "t.yaml").write_text("task: t\n")
    (tmp_path / "theirs" / "u.yaml").write_text("task: u\n")
    (tmp_path / "suites" / "mine.yaml").write_text("suite: mine\ntasks: [t]\ntask_dirs: [theirs]\n")
    monkeypatch.chdir(tmp_path)  # relative folders: from the working directory
    suite = load_suite("mine", {"task_dirs": ["ours/held"]}, str(tmp_path / "suites"))
    assert suite.task_dirs == [str(tmp_path / "ours" / "held"), str(tmp_path / "theirs")]
    check_tasks(suite)  # task t: in the folder ours/held
    with pytest.raises(ConfigError, match=r"suite heldout: lm-eval has no task, group or tag he"):
        check_tasks(load_suite("heldout", {}))  # its folder not given
    with pytest.raises(ConfigError, match=r"eval.task_dirs: no folder 'elsewhere'"):
        load_suite("mine", {"task_dirs": ["elsewhere"]}, str(tmp_path / "suites"))
    with pytest.raises(ConfigError, match=r"eval.task_dirs: .*empty holds no task YAML"):
        EvalConfig(suite="x", tasks=["t"], task_dirs=["empty"])


@pytest.mark.parametrize("job", ["evaluate", "eval_watch"])
def test_both_evaluation_jobs_take_the_same_eval_settings(job):
    from hydra import compose, initialize_config_dir

    from neoray.config import dataclass_from_config, to_dict

    named = "checkpoint=x" if job == "evaluate" else "run_name=x"
    with initialize_config_dir(str(ROOT / "conf"), version_base=None):
        cfg = compose(job, overrides=[named, "eval.limit=3", "eval.workers=2"])
    if job == "evaluate":  # the suite's fields and the settings under one `eval`
        suite = dataclass_from_config(EvalConfig, cfg.eval, "eval")
    else:
        suite = load_suite(cfg.suites[0], to_dict(cfg.eval))
        assert dataclass_from_config(ScheduleConfig, cfg.schedule, "schedule").max_attempts == 3
    assert (suite.suite, suite.tasks, suite.limit, suite.workers) == ("mmlu_0shot", ["mmlu"], 3, 2)


# -- the watcher on storage, with an evaluation that records its calls


def commit(storage, run: str, step: int, final: int = 4, at: float = T0) -> None:
    """A committed checkpoint as the watcher sees it (its files are not read here)."""
    testdata.commit_stand_in_checkpoint(storage, run, step, created=at + step, final_step=final)


SUITES = [EvalConfig(suite="a", tasks=["t"]), EvalConfig(suite="b", tasks=["t"])]


class Recorder:
    """An evaluation that scores step/10 and records what it was asked, optionally failing or
    running a hook first."""

    def __init__(self, fail=(), hook=None, seconds=0.0):
        self.calls, self.fail, self.hook, self.seconds = [], set(fail), hook, seconds
        self.lock = threading.Lock()

    def __call__(self, storage, manifest, cfg):
        with self.lock:
            self.calls.append((manifest.step, cfg.suite))
        if self.hook:
            self.hook(manifest.step, cfg.suite)
        time.sleep(self.seconds)
        if manifest.step in self.fail:
            raise CorruptCheckpointError(f"layer_01-model_00-model_states.pt of {manifest.step}")
        return {"results": {"t": {"acc,none": manifest.step / 10, "acc_stderr,none": 0.01}}}


def watch(storage, evaluate, run="R", lines=None, **schedule):
    schedule = {"poll_seconds": 0.05, "until_finished": True, **schedule}
    say = lines.append if lines is not None else lambda _: None
    watcher = Watcher(storage, run, SUITES, ScheduleConfig(**schedule), evaluate, say=say)
    return watcher.run()


def test_backfill_newest_first_once_across_restarts(storage):
    for step in (1, 2, 3, 4):
        commit(storage, "R", step)
    evaluate, lines = Recorder(), []
    settled = watch(storage, evaluate, lines=lines, every=2)
    assert evaluate.calls == [(4, "a"), (4, "b"), (2, "a"), (2, "b")]
    assert {pair: e.state for pair, e in settled.items()} == dict.fromkeys(evaluate.calls, "done")
    entries = Ledger(storage, "R").entries()
    assert [(e.step, e.suite, e.attempts, e.metrics["t/acc"]) for e in entries] == [
        (2, "a", 1, 0.2), (2, "b", 1, 0.2), (4, "a", 1, 0.4), (4, "b", 1, 0.4)
    ]  # fmt: skip
    assert any(line.startswith("queued 4 evaluation(s), newest first: step 4 a") for line in lines)
    assert "finished step 2 b: t/acc 0.2000" in lines

    again, lines = Recorder(), []  # a restarted watcher: everything is in the ledger
    assert set(watch(storage, again, lines=lines, every=2)) == set(settled)
    assert again.calls == []
    assert "the ledger has 4 evaluation(s) settled already" in lines
    assert not any(line.startswith(("queued", "started")) for line in lines)
    table = ledger_table(entries)
    assert table.splitlines()[1].split() == ["2", "0.2000", "0.2000"]
    assert "t/acc" in table


def test_neoray_evals_prints_the_ledger(tmp_path, capsys):
    from neoray.cli import main

    storage = open_storage(StorageConfig(root=str(tmp_path)))
    for step in (1, 2):
        commit(storage, "R", step, final=2)
    watch(storage, Recorder(fail={1}), max_attempts=1)
    with pytest.raises(SystemExit) as ended:
        main(["evals", "R", "--root", str(tmp_path)])
    assert ended.value.code == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["step", "a", "b"]
    assert lines[1].split() == ["1", "failed", "x1", "failed", "x1"]
    assert lines[2].split() == ["2", "0.2000", "0.2000"]
    assert "step 1 a failed: CorruptCheckpointError: layer_01" in "\n".join(lines)


def test_a_failing_checkpoint_is_retried_then_recorded_and_does_not_block_others(storage):
    for step in (1, 2, 3):
        commit(storage, "R", step, final=3)
    evaluate, lines = Recorder(fail={2}), []
    settled = watch(storage, evaluate, lines=lines, max_attempts=2)
    assert evaluate.calls.count((2, "a")) == 2 and evaluate.calls.count((3, "a")) == 1
    failed = settled[2, "a"]
    assert (failed.state, failed.attempts) == ("failed", 2)
    assert "layer_01-model_00-model_states.pt" in failed.reason
    assert all(settled[step, s].state == "done" for step in (1, 3) for s in "ab")
    assert any("(will retry)" in line for line in lines)


def test_a_malformed_ledger_file_is_reported_and_only_that_pair_evaluated_again(storage):
    for step in (1, 2):
        commit(storage, "R", step, final=2)
    watch(storage, Recorder())
    keep = {key: storage.get_bytes(key) for key in storage.list("R/evals/")}
    storage.put_bytes(entry_key("R", 2, "b"), b"{not json")
    evaluate, lines = Recorder(), []
    watch(storage, evaluate, lines=lines)
    assert evaluate.calls == [(2, "b")]
    assert any("is malformed" in line and "step_00000002/b.json" in line for line in lines)
    for key, data in keep.items():
        if not key.endswith("step_00000002/b.json"):
            assert storage.get_bytes(key) == data
    assert Ledger(storage, "R").read(2, "b")[0].state == "done"


def test_a_checkpoint_deleted_before_its_turn_is_skipped_with_the_reason(storage):
    for step in (1, 2, 3):
        commit(storage, "R", step, final=3)

    def retention(step, suite):  # while step 3 is evaluated, retention deletes step 1
        if (step, suite) == (3, "a"):
            storage.delete(manifest_key("R", 1))

    settled = watch(storage, Recorder(hook=retention))
    assert settled[1, "a"].state == settled[1, "b"].state == "skipped"
    assert "deleted before it was evaluated" in settled[1, "a"].reason
    assert all(settled[step, s].state == "done" for step in (2, 3) for s in "ab")


def test_a_malformed_manifest_is_named_once_and_the_other_checkpoints_are_evaluated(storage):
    for step in (1, 2, 3):
        commit(storage, "R", step, final=3)
    key = manifest_key("R", 1)
    storage.put_bytes(key, storage.get_bytes(key)[:40])  # cut short
    evaluate, lines = Recorder(), []
    settled = watch(storage, evaluate, lines=lines)
    assert sorted(evaluate.calls) == [(2, "a"), (2, "b"), (3, "a"), (3, "b")]
    assert set(settled) == set(evaluate.calls)
    named = [line for line in lines if storage.uri(key) in line]
    assert len(named) == 1 and named[0].startswith("skipping checkpoint step 1: ")


def test_no_checkpoint_yet_it_waits_saying_so(storage):
    lines = []
    watcher = Watcher(storage, "R", SUITES, ScheduleConfig(), Recorder(), say=lines.append)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        watcher.poll(pool)
        commit(storage, "R", 1)
        watcher.poll(pool)
    assert lines[0].startswith("run R has no committed checkpoint yet in ")
    assert lines[0].endswith("R/checkpoints; waiting")
    assert "found checkpoint step 1" in lines[1]


def test_a_stale_claim_is_taken_over_and_a_fresh_one_is_left_alone(storage):
    commit(storage, "R", 1, final=1)
    now = [T0]
    ghost = Ledger(storage, "R", clock=lambda: now[0]).claim(1, "a", "ghost", None, attempts=1)
    assert ghost is not None
    evaluate, lines = Recorder(), []
    watcher = Watcher(
        storage,
        "R",
        SUITES[:1],
        ScheduleConfig(stale_seconds=60, heartbeat_seconds=10),
        evaluate,
        say=lines.append,
        clock=lambda: now[0],
    )
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        now[0] = T0 + 59
        watcher.poll(pool)
        assert evaluate.calls == [] and not watcher.running
        now[0] = T0 + 61
        watcher.poll(pool)
        watcher.running[1, "a"].future.result()
    assert evaluate.calls == [(1, "a")]
    assert any("its owner ghost has been silent for 61 s; taking over" in line for line in lines)
    entry = Ledger(storage, "R").read(1, "a")[0]
    assert (entry.state, entry.attempts, entry.owner) == ("done", 2, watcher.owner)
    assert not Ledger(storage, "R").heartbeat(ghost)  # the ghost cannot write over it


def test_two_watchers_started_together_evaluate_no_pair_twice(storage):
    for step in (1, 2, 3, 4, 5, 6):
        commit(storage, "R", step, final=6)
    evaluate = Recorder(seconds=0.02)
    with concurrent.futures.ThreadPoolExecutor(2) as both:
        runs = [both.submit(watch, storage, evaluate, max_concurrent=2) for _ in range(2)]
        settled = [run.result(timeout=120) for run in runs]
    pairs = [(step, s) for step in range(1, 7) for s in "ab"]
    assert sorted(evaluate.calls) == pairs  # each pair exactly once, by one of the two
    assert set(settled[0]) == set(settled[1]) == set(pairs)
    assert {e.attempts for e in Ledger(storage, "R").entries()} == {1}


# -- storage errors: said, retried, and the watcher goes on


class FailsOnce:
    """A real storage whose first call of `method` for which `when(*args)` holds does
    `instead(storage, *args)` first: by default, raise a StorageError (then nothing is done)."""

    def __init__(self, storage, method: str, when=lambda *args: True, instead=None):
        self.storage, self.method, self.when, self.instead = storage, method, when, instead
        self.lock, self.failed = threading.Lock(), False
        self.calls_after = 0  # calls of `method` (matching `when`) after the failure

    def raise_error(self, storage, key, *_):
        raise StorageError(f"{storage.uri(key)}: connection reset by peer")

    def __getattr__(self, name: str):
        real = getattr(self.storage, name)
        if name != self.method:
            return real

        def call(*args, **kwargs):
            with self.lock:
                now = not self.failed and self.when(*args)
                self.calls_after += self.failed and self.when(*args)
                self.failed |= now
            if now:
                (self.instead or self.raise_error)(self.storage, *args)
            return real(*args, **kwargs)

        return call


def retried(lines: list[str], what: str) -> list[str]:
    return [line for line in lines if line.startswith(f"{what} failed (") and "retrying in" in line]


def in_heartbeat_thread(*_) -> bool:
    return threading.current_thread().name == "heartbeats"


def test_a_heartbeat_that_fails_once_is_retried_and_the_claims_stay_alive(storage):
    for step in (1, 2):
        commit(storage, "R", step, final=2)
    flaky, lines = FailsOnce(storage, "put_if", in_heartbeat_thread), []
    settled = watch(
        flaky, Recorder(seconds=0.4), lines=lines, heartbeat_seconds=0.05, stale_seconds=5
    )
    assert flaky.failed and flaky.calls_after > 0  # the heartbeats went on
    [said] = [line for line in lines if "failed (StorageError: " in line]
    assert said.startswith("the heartbeat of step 2 a failed (StorageError: ")
    assert "connection reset by peer); retrying in 0.0125 s" in said
    assert {pair: (e.state, e.attempts) for pair, e in settled.items()} == {
        (step, s): ("done", 1) for step in (1, 2) for s in "ab"
    }


def test_recording_a_result_that_fails_once_is_retried_and_the_result_kept(storage):
    commit(storage, "R", 1, final=1)

    def recording_done(key, data, version) -> bool:
        return b'"state": "done"' in data

    flaky, lines, evaluate = FailsOnce(storage, "put_if", recording_done), [], Recorder()
    settled = watch(flaky, evaluate, lines=lines, heartbeat_seconds=0.2, stale_seconds=1)
    [said] = retried(lines, "recording step 1 a")
    assert "StorageError: " in said
    assert evaluate.calls == [(1, "a"), (1, "b")]  # evaluated once each
    assert {pair: (e.state, e.attempts) for pair, e in settled.items()} == {
        (1, "a"): ("done", 1),
        (1, "b"): ("done", 1),
    }


def test_a_poll_that_fails_once_is_retried_and_everything_is_evaluated(storage):
    for step in (1, 2):
        commit(storage, "R", step, final=2)
    flaky, lines = FailsOnce(storage, "folders"), []
    evaluate = Recorder()
    settled = watch(flaky, evaluate, lines=lines)
    [said] = retried(lines, "polling")
    assert "StorageError: " in said and "R/checkpoints: connection reset by peer" in said
    assert sorted(evaluate.calls) == sorted(settled) == [(1, "a"), (1, "b"), (2, "a"), (2, "b")]


def test_a_manifest_deleted_as_it_is_read_is_passed_over_and_the_rest_evaluated(storage):
    for step in (1, 2, 3):
        commit(storage, "R", step, final=3)

    def retention(storage, key):  # after the watcher saw the manifest exist
        storage.delete(key)

    key = manifest_key("R", 2)
    flaky = FailsOnce(storage, "get_bytes", lambda asked: asked == key, retention)
    evaluate, lines = Recorder(), []
    settled = watch(flaky, evaluate, lines=lines)
    assert flaky.failed and not storage.exists(key)
    assert "checkpoint step 2 was deleted as it was read (retention)" in lines
    assert sorted(evaluate.calls) == sorted(settled) == [(1, "a"), (1, "b"), (3, "a"), (3, "b")]


def test_a_setting_error_ends_the_watcher(storage):
    commit(storage, "R", 1, final=1)

    def misconfigured(storage, *_):
        raise ConfigError("storage.bucket: no such bucket")

    with pytest.raises(ConfigError, match="no such bucket"):
        watch(FailsOnce(storage, "folders", instead=misconfigured), Recorder())


# -- the export cache: one export per step, deleted once its suites are settled


def test_exports_are_deleted_once_their_suites_are_settled_and_kept_while_in_use(storage, tmp_path):
    for step in (1, 2):
        commit(storage, "R", step, final=2)
    cache = tmp_path / "exports"

    def export(storage, manifest) -> Path:  # as export_committed: made once, then reused
        hf_dir = cache / "R" / f"step_{manifest.step:08d}" / "hf_fp16-0123"
        if not hf_dir.exists():
            hf_dir.mkdir(parents=True)
            (hf_dir / "model.safetensors").write_bytes(b"weights of %d" % manifest.step)
        return hf_dir

    exports, scores, read = ExportCache(export, cache), Recorder(), []

    def evaluate(storage, manifest, cfg):
        hf_dir = exports.get(storage, manifest)
        deadline = time.monotonic() + 30
        while cfg.suite == "b" and (manifest.step, "a") not in watcher.settled:
            assert time.monotonic() < deadline  # reading the export after suite a settled
            time.sleep(0.01)
        read.append((manifest.step, cfg.suite, (hf_dir / "model.safetensors").read_bytes()))
        return scores(storage, manifest, cfg)

    def watch() -> dict:
        """Every pair evaluated by a new watcher (the one `evaluate` waits on)."""
        nonlocal watcher
        schedule = ScheduleConfig(
            poll_seconds=0.05, until_finished=True, max_concurrent=2, max_attempts=1
        )
        watcher = Watcher(
            storage, "R", SUITES, schedule, evaluate, say=lambda _: None, release=exports.release
        )
        return watcher.run()

    watcher: Watcher | None = None
    assert {e.state for e in watch().values()} == {"done"}
    assert sorted(read) == [(step, s, b"weights of %d" % step) for step in (1, 2) for s in "ab"]
    assert list(cache.iterdir()) == [] and exports.made == {}

    # An export that was in the cache before (another job's) is left as found.
    commit(storage, "R", 3, final=3)
    kept = export(storage, read_manifest(storage, "R", 3))
    assert {e.state for e in watch().values()} == {"done"}
    assert (kept / "model.safetensors").read_bytes() == b"weights of 3"


def test_sigterm_stops_the_watcher_and_ends_a_process_forked_from_it():
    """lm-eval computes a perplexity's stderr in a forked multiprocessing pool and stops its
    workers with SIGTERM: there the inherited handler must end the process, or the pool's
    join waits forever (it hung the watcher); in the watcher's process it stops the watcher."""
    import multiprocessing

    from neoray.evaluation.run import stop_on_sigterm

    class Stoppable:
        stopped = False

        def stop(self) -> None:
            self.stopped = True

    watcher, previous = Stoppable(), signal.getsignal(signal.SIGTERM)
    stop_on_sigterm(watcher)
    try:
        fork = multiprocessing.get_context("fork")
        running = fork.Event()  # a signal in the child's first instants is dropped by Python
        child = fork.Process(target=lambda: running.set() or time.sleep(60))
        child.start()
        assert running.wait(timeout=30)
        child.terminate()
        child.join(timeout=30)
        assert child.exitcode == -signal.SIGTERM and not watcher.stopped
        os.kill(os.getpid(), signal.SIGTERM)
        assert watcher.stopped
    finally:
        signal.signal(signal.SIGTERM, previous)


# -- end to end: a trained run in S3, watcher processes, lm-eval on Ray, a real MLflow server


def write_eval_inputs(tmp: Path, suites: dict[str, str]) -> Path:
    """Under `tmp`: a mirror of the evaluation data, a tokenizer.json for the exports (the runs
    evaluated here train on synthetic data, which has none) and suites/<suite>.yaml of one
    zero-shot task each ({suite: task}). Returns the mirror."""
    mirror = testdata.write_all(tmp / "mirror")
    testdata.write_tokenizer(tmp / "tokenizer.json", mirror, vocab_size=512)
    (tmp / "suites").mkdir()
    for suite, task in suites.items():
        (tmp / "suites" / f"{suite}.yaml").write_text(
            f"suite: {suite}\ntasks: [{task}]\nnum_fewshot: 0\n"
        )
    return mirror


@pytest.fixture(scope="module")
def trained(s3_server, tmp_path_factory):
    """Run W trained for 4 steps on S3, a checkpoint committed at every step; an evaluation
    mirror, a tokenizer for the exports (the run's data is synthetic) and two small suites."""
    tmp = tmp_path_factory.mktemp("watch")
    bucket = s3_server.new_bucket()
    env = {**os.environ, **s3_server.env(), "DS_ACCELERATOR": "cpu"}
    storage = ["storage=s3", f"storage.bucket={bucket}", "storage.prefix=runs"]
    pretrain = [
        *("jobs/pretrain.py", "launcher=torchrun", "run_name=W", "train.steps=4"),
        *("checkpoint.interval=1", "checkpoint.keep_last=8", "data.seq_len=32"),
        *("train.peak_tflops=1.0", "tracking.enabled=false", f"run_dir={tmp / 'run'}"),
    ]
    done = subprocess.run(
        [sys.executable, *pretrain, *storage], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-3000:]
    mirror = write_eval_inputs(tmp, {"arith": "arithmetic_2da", "anatomy": "mmlu_anatomy"})
    (tmp / "mlflow").mkdir()
    with services.mlflow_server(tmp / "mlflow") as mlflow, pytest.MonkeyPatch.context() as env_of:
        for name, value in s3_server.env().items():  # this process reads the ledger too
            env_of.setenv(name, value)
        yield {
            "tmp": tmp,
            "env": env,
            "mlflow": mlflow.url,
            "storage": open_storage(StorageConfig(kind="s3", bucket=bucket, prefix="runs")),
            "args": [
                *storage,
                "run_name=W",
                f"suite_dir={tmp / 'suites'}",
                f"tokenizer={tmp / 'tokenizer.json'}",
                f"cache_dir={tmp / 'exports'}",
                f"eval.data_dir={mirror}",
                *("eval.limit=6", "eval.batch_size=4", f"tracking.uri={mlflow.url}"),
                *("schedule.poll_seconds=1", "schedule.heartbeat_seconds=1"),
                *("schedule.stale_seconds=4", f"hydra.run.dir={tmp / 'hydra'}"),
            ],
        }


def start_watcher(trained, *overrides) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "jobs/eval_watch.py", *trained["args"], *overrides],
        cwd=ROOT,
        env=trained["env"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # its own process group: SIGKILL takes its Ray with it
    )


def finish(process: subprocess.Popen, timeout: float = 480) -> str:
    output, _ = process.communicate(timeout=timeout)
    assert process.returncode == 0, output[-4000:]
    return output


@pytest.mark.slow
def test_a_watcher_killed_mid_evaluation_is_restarted_and_every_pair_is_done_once(trained):
    storage, ledger = trained["storage"], Ledger(trained["storage"], "W")
    policy = ["suites=[arith,anatomy]", "schedule.every=2", "tracking.experiment=killed"]
    first = start_watcher(trained, *policy)
    deadline = time.monotonic() + 240
    while not any(e.state == "running" for e in ledger.entries()):
        assert time.monotonic() < deadline and first.poll() is None, first.stdout.read()
        time.sleep(0.2)
    time.sleep(1.0)  # in the middle of the evaluation
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    [killed] = [(e.step, e.suite) for e in ledger.entries() if e.state == "running"]

    output = finish(start_watcher(trained, *policy, "schedule.until_finished=true"))
    assert f"step {killed[0]} {killed[1]}: its owner" in output and "taking over" in output
    assert "finished: the final step 4 is evaluated" in output
    # Each export is deleted once its step is evaluated, but for the one the killed watcher
    # made: the restarted watcher found it in the cache, and leaves what it did not make.
    left = [path.parent.name for path in (trained["tmp"] / "exports").rglob("hf_*")]
    assert left in ([], [f"step_{killed[0]:08d}"])

    from neoray.evaluation.tracking import EvalTracker

    tracker = EvalTracker(trained["mlflow"], "killed")
    entries = {(e.step, e.suite): e for e in ledger.entries()}
    assert set(entries) == {(step, s) for step in (2, 4) for s in ("arith", "anatomy")}
    for (step, suite), entry in entries.items():
        assert entry.state == "done", entry
        assert entry.attempts == (2 if (step, suite) == killed else 1)
        [run] = tracker.evaluation_runs("W", step, suite)  # exactly one in MLflow
        assert run.info.run_id == entry.mlflow_run_id
        name = "arithmetic_2da/acc" if suite == "arith" else "mmlu_anatomy/acc"
        assert run.data.metrics[name] == entry.metrics[name]
    assert storage.list("W/evals/step_00000001/") == []  # not selected by every=2


@pytest.mark.slow
def test_a_corrupt_checkpoint_fails_naming_the_file_and_later_ones_are_evaluated(trained):
    storage = trained["storage"]
    layer = next(k for k in storage.list("W/checkpoints/step_00000001/") if "layer_01" in k)
    storage.put_bytes(layer, b"not the bytes the manifest lists")
    output = finish(
        start_watcher(
            trained,
            "suites=[arith]",
            "schedule.max_attempts=2",
            "schedule.until_finished=true",
            "tracking.experiment=corrupt",
        )
    )
    entries = {e.step: e for e in Ledger(storage, "W").entries() if e.suite == "arith"}
    assert (entries[1].state, entries[1].attempts) == ("failed", 2)
    assert "CorruptCheckpointError" in entries[1].reason and layer in entries[1].reason
    assert [entries[step].state for step in (2, 3, 4)] == ["done"] * 3
    assert "failed step 1 arith" in output
    assert "failed x2" in output  # the ledger table printed at the end


def test_a_model_parallel_runs_checkpoint_scores_as_its_weights_at_tp_1(
    reference_runs, tmp_path, ray_local
):
    """The watcher on the tp=2 x pp=2 run of the resume tests (`layouts`): its final checkpoint
    is exported from the four model-parallel ranks' files and evaluated, and the ledger holds
    the metrics of the same weights at tp=1: rebuilt by another reader (the fp32 master weights
    of the optimizer partitions, `neoray.checkpoint.reshard`), saved as one Hugging Face
    directory and evaluated by `evaluate`."""
    import layouts
    from hydra import compose, initialize_config_dir

    from neoray.checkpoint.manifest import read_manifest
    from neoray.evaluation.report import suite_metrics
    from neoray.evaluation.run import ModelSource, evaluate, run_eval_watch

    run = reference_runs(MODEL_PARALLEL)
    store = tmp_path / "store"
    shutil.copytree(run.store, store)  # the watcher writes its ledger and export there
    mirror = write_eval_inputs(tmp_path, {"lambada": "lambada_openai"})
    settings = {"data_dir": str(mirror), "limit": 4}
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base=None):
        cfg = compose(
            "eval_watch",
            overrides=[
                f"run_name={layouts.RUN}",
                "suites=[lambada]",
                f"suite_dir={tmp_path / 'suites'}",
                f"storage.root={store}",
                f"tokenizer={tmp_path / 'tokenizer.json'}",
                f"cache_dir={tmp_path / 'exports'}",
                "dtype=fp32",
                *(f"eval.{key}={value}" for key, value in settings.items()),
                "tracking.enabled=false",
                f"schedule.every={layouts.STEPS}",  # the final step only
                "schedule.poll_seconds=0.1",
                "schedule.until_finished=true",
            ],
        )
    run_eval_watch(cfg)
    [entry] = Ledger(open_storage(StorageConfig(root=str(store))), layouts.RUN).entries()
    assert (entry.step, entry.suite, entry.state) == (layouts.STEPS, "lambada", "done")

    manifest = read_manifest(run.storage, layouts.RUN, layouts.STEPS)
    assert manifest.topology == {"tp": 2, "pp": 2, "dp": 1}
    hf_dir = layouts.master_weights_export(
        run.folder(layouts.STEPS), manifest, tmp_path / "tp1", tmp_path / "tokenizer.json"
    )
    suite = load_suite("lambada", settings, str(tmp_path / "suites"))
    expected = suite_metrics(evaluate(ModelSource(hf_dir, None, layouts.STEPS), suite), suite.tasks)
    assert "lambada_openai/perplexity" in expected
    assert entry.metrics == expected


def test_unreachable_storage_is_a_clear_error_naming_the_uri(tmp_path):
    [port] = services.free_ports(1)
    result = subprocess.run(
        [
            *(sys.executable, "jobs/eval_watch.py", "run_name=W", "storage=s3"),
            *("storage.bucket=b", f"storage.endpoint_url=http://127.0.0.1:{port}"),
            *("storage.max_attempts=1", f"hydra.run.dir={tmp_path}"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "y"},
    )
    assert result.returncode != 0
    assert "eval_watch: cannot reach s3://b/W/checkpoints" in result.stderr


def test_logging_a_pair_again_keeps_the_earlier_run_until_the_new_one_is_complete(
    tmp_path, monkeypatch
):
    from neoray.evaluation.tracking import EvalTracker

    tracker = EvalTracker(f"sqlite:///{tmp_path / 'mlflow.db'}", "relog")
    scored = lambda acc: {"results": {"t": {"acc,none": acc}}, "n-shot": {"t": 0}}  # noqa: E731
    first = tracker.log_evaluation("R", 1, "a", scored(0.5), "src", ["t"])

    def unreachable(*_, **__):
        raise OSError("artifact store unreachable")

    monkeypatch.setattr(tracker.client, "log_artifacts", unreachable)
    with pytest.raises(OSError, match="unreachable"):
        tracker.log_evaluation("R", 1, "a", scored(0.7), "src", ["t"])
    [kept] = tracker.evaluation_runs("R", 1, "a")  # the earlier result, and no partial run
    assert (kept.info.run_id, kept.data.metrics["t/acc"]) == (first, 0.5)
    monkeypatch.undo()
    second = tracker.log_evaluation("R", 1, "a", scored(0.7), "src", ["t"])
    [run] = tracker.evaluation_runs("R", 1, "a")
    assert (run.info.run_id, run.data.metrics["t/acc"]) == (second, 0.7)
    history = tracker.client.get_metric_history(tracker.training_run_id("R"), "eval/a/t/acc")
    assert [(m.step, m.value) for m in history][-1] == (1, 0.7)


@pytest.fixture(scope="module")
def mlflow_url(tmp_path_factory):
    with services.mlflow_server(tmp_path_factory.mktemp("mlflow-relog")) as server:
        yield server.url


def test_a_pair_evaluated_again_counts_once_in_the_report_with_its_latest_value(
    mlflow_url, tmp_path
):
    """MLflow keeps both points of a pair logged twice on the training run; the report's data
    holds one per step, the one logged last."""
    from neoray.evaluation.tracking import EvalTracker
    from neoray.report.data import collect
    from neoray.tracking import TrackingConfig

    tracker = EvalTracker(mlflow_url, "again")
    scored = lambda acc: {"results": {"t": {"acc,none": acc}}, "n-shot": {"t": 0}}  # noqa: E731
    for step, acc in ((100, 0.25), (200, 0.5), (100, 0.30)):
        tracker.log_evaluation("R", step, "a", scored(acc), "src", ["t"])
    history = tracker.client.get_metric_history(tracker.training_run_id("R"), "eval/a/t/acc")
    assert sorted((m.step, m.value) for m in history) == [(100, 0.25), (100, 0.30), (200, 0.5)]
    data = collect("R", tmp_path, TrackingConfig(uri=mlflow_url, experiment="again"))
    assert data.evals["eval/a/t/acc"] == [(100, 0.30), (200, 0.5)]
