"""Scheduled evaluation: watch a run's committed checkpoints and evaluate each (checkpoint, suite)
the policy selects exactly once, across restarts and next to other watchers.

Each poll lists the run's step folders (one listing; a folder is read only when it is new or
still uncommitted, or its manifest was malformed: skipped, and said once), asks the policy
which steps it wants, and claims pairs that the ledger (`neoray.evaluation.ledger`) does not
show as settled, newest first, up to `max_concurrent`.
A claimed pair is evaluated on a thread of this process (the evaluation itself fans out over
Ray), logged to MLflow while the claim is still ours, and recorded in the ledger. A heartbeat
thread keeps the claims fresh; a claim whose owner stopped heartbeating is taken over.

A watcher runs for days next to training, so a storage error (a network blip, a checkpoint
deleted by retention while it is read) is said and retried with backoff, in the poll, the
heartbeat and the recording of a result alike; only a setting error (`ConfigError`) ends it.
Once every suite of a step is settled, the step's local export is deleted (`ExportCache`).
"""

from __future__ import annotations

import concurrent.futures
import os
import shutil
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from neoray.checkpoint.manifest import (
    STEP_DIR,
    MalformedManifestError,
    Manifest,
    checkpoints_key,
    manifest_key,
    read_manifest,
    step_tag,
)
from neoray.config import ConfigError
from neoray.evaluation.config import EvalConfig
from neoray.evaluation.ledger import Claim, Entry, Ledger, is_final
from neoray.evaluation.report import flat_metrics, headline, suite_metrics
from neoray.evaluation.schedule import Policy, ScheduleConfig, created_time
from neoray.live_metrics import EvaluationExporter
from neoray.storage import Storage

Pair = tuple[int, str]  # (step, suite)
# (manifest, suite) -> lm-eval's merged results
Evaluate = Callable[[Storage, Manifest, EvalConfig], dict[str, Any]]
# (manifest, suite, results) -> the MLflow run id, or None when not tracked
Log = Callable[[Manifest, EvalConfig, dict[str, Any]], str | None]


# (storage, manifest) -> the local folder of the checkpoint's export
Export = Callable[[Storage, Manifest], Path]


def default_owner() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def final_step(manifest: Manifest) -> int | None:
    """The step the run ends at, from the run config its manifests carry."""
    steps = manifest.config.get("train.steps")
    return int(steps) if isinstance(steps, int) else None


@dataclass
class Running:
    claim: Claim
    future: concurrent.futures.Future


class Backoff:
    """How long to wait before retrying what keeps failing: `first` seconds, doubled at each
    failure in a row up to `cap`; a success starts again from `first`."""

    def __init__(self, first: float, cap: float) -> None:
        self.first, self.cap, self.failures = first, cap, 0

    def failed(self) -> float:
        delay = min(self.cap, self.first * 2**self.failures)
        self.failures += 1
        return delay

    def succeeded(self) -> None:
        self.failures = 0


class ExportCache:
    """The local exports of the checkpoints a watcher evaluates: made once per step and shared
    by its suites (`get`), deleted once the watcher has settled every suite of the step
    (`release`, the watcher's hook). One export of a 20B model is about 41 GB in fp16 and a
    watcher evaluates a run's checkpoints for days; the copy published next to the checkpoint
    in storage stays, for a later evaluation to fetch."""

    def __init__(self, export: Export, root: str | Path) -> None:
        self.export = export
        self.root = Path(root).absolute()  # the cache folder: kept, even when emptied
        self.locks: dict[int, threading.Lock] = {}
        self.made: dict[int, Path] = {}  # step -> its export, while its suites may need it
        self.lock = threading.Lock()

    def get(self, storage: Storage, manifest: Manifest) -> Path:
        """The export of `manifest`'s checkpoint, made by the first suite of the step to ask.
        Only an export this watcher made is deleted at `release`: one already in the cache
        (another job's: `jobs/export.py`, the demo, an earlier watcher) is left as found."""
        with self.lock:
            step_lock = self.locks.setdefault(manifest.step, threading.Lock())
        with step_lock:
            folder = self.root / manifest.run_name / step_tag(manifest.step)  # see `cache_path`
            found = {p.absolute() for p in folder.iterdir()} if folder.is_dir() else set()
            hf_dir = self.export(storage, manifest)
        with self.lock:
            if hf_dir.absolute() not in found:
                self.made[manifest.step] = hf_dir
        return hf_dir

    def release(self, step: int) -> None:
        """Delete the export of `step` (none made: nothing to do) and the folders it leaves
        empty in the cache. The watcher calls it once no suite of the step runs or will run."""
        with self.lock:
            hf_dir = self.made.pop(step, None)
            self.locks.pop(step, None)
        if hf_dir is None:
            return
        hf_dir = hf_dir.absolute()
        if hf_dir.exists():
            shutil.rmtree(hf_dir)
        for folder in hf_dir.parents:
            if folder == self.root or self.root not in folder.parents:
                break
            try:
                folder.rmdir()
            except OSError:  # not empty: another export, or one being made
                break


class Watcher:
    """Evaluates the selected (checkpoint, suite) pairs of one run (see the module doc)."""

    def __init__(
        self,
        storage: Storage,
        run_name: str,
        suites: list[EvalConfig],
        schedule: ScheduleConfig,
        evaluate: Evaluate,
        log: Log | None = None,
        say: Callable[[str], None] = print,
        clock: Callable[[], float] = time.time,
        owner: str | None = None,
        metrics: EvaluationExporter | None = None,
        release: Callable[[int], None] | None = None,
    ) -> None:
        self.storage, self.run_name, self.schedule = storage, run_name, schedule
        self.suites = {cfg.suite: cfg for cfg in suites}
        self.evaluate, self.log, self.say, self.clock = evaluate, log, say, clock
        self.metrics = metrics  # live gauges for Prometheus (queue, latency, failures)
        # called with a step once every suite of it is settled here (`ExportCache.release`)
        self.release = release
        self.released: set[int] = set()
        self.owner = owner or default_owner()
        self.ledger = Ledger(storage, run_name, clock)
        self.policy = Policy(schedule)
        self.manifests: dict[int, Manifest] = {}  # committed checkpoints seen
        self.deleted: set[int] = set()  # committed checkpoints seen, then gone
        self.malformed: set[int] = set()  # steps whose manifest could not be read (said once)
        self.wanted: set[int] = set()  # every step the policy has selected so far
        self.final_step: int | None = None
        self.settled: dict[Pair, Entry] = {}  # pairs whose ledger state is final
        self.running: dict[Pair, Running] = {}
        self.announced: set[Pair] = set()  # pairs already reported (queued or settled)
        self.woken = threading.Event()  # set when an evaluation ends: start the next now
        self.stopped = threading.Event()
        self.said_waiting = False
        self.checked_hold = False  # whether the run was checked for an evaluation hold

    # -- what the run has committed

    def discover(self) -> None:
        """Read manifests of new step folders; note committed checkpoints that disappeared."""
        folders = self.storage.folders(checkpoints_key(self.run_name))
        present = {int(m.group(1)) for name in folders if (m := STEP_DIR.match(name))}
        manifest = None
        for step in sorted(present - set(self.manifests) - self.deleted):
            if not self.storage.exists(manifest_key(self.run_name, step)):
                continue  # still uploading: looked at again next poll
            try:
                manifest = read_manifest(self.storage, self.run_name, step)
            except FileNotFoundError:  # retention deleted it since `exists`: never committed here
                self.say(f"checkpoint step {step} was deleted as it was read (retention)")
                continue
            except MalformedManifestError as err:  # said once; training may save it afresh
                if step not in self.malformed:
                    self.malformed.add(step)
                    self.say(f"skipping checkpoint step {step}: {err}")
                continue
            self.malformed.discard(step)
            self.manifests[step] = manifest
            self.final_step = final_step(manifest) or self.final_step
            self.say(f"found checkpoint step {step} (committed {manifest.created})")
        if manifest is not None and not self.checked_hold:
            self._check_hold(manifest)
        # A step is gone when its folder is, or (object stores may keep empty folders, and
        # retention deletes the manifest first) when a step still to evaluate lost its manifest.
        pending = {
            step
            for step in self.manifests.keys() & self.wanted
            if any((step, suite) not in self.settled for suite in self.suites)
            and not any(pair[0] == step for pair in self.running)
        }
        gone = set(self.manifests) - present
        gone |= {
            s for s in pending - gone if not self.storage.exists(manifest_key(self.run_name, s))
        }
        for step in sorted(gone):
            self.deleted.add(step)
            del self.manifests[step]
            self.say(f"checkpoint step {step} was deleted (retention)")

    def _check_hold(self, manifest: Manifest) -> None:
        """Say once if the run (as of its newest checkpoint found) does not keep checkpoints
        for these suites until they are evaluated: retention may delete some first."""
        self.checked_hold = True
        held = manifest.config.get("checkpoint.hold_for_eval") or []
        if missing := [suite for suite in self.suites if suite not in held]:
            self.say(
                f"run {self.run_name} does not hold its checkpoints for {', '.join(missing)} "
                "(checkpoint.hold_for_eval): retention may delete some before they are evaluated"
            )

    def selected(self) -> set[int]:
        committed = {step: created_time(m.created) for step, m in self.manifests.items()}
        return self.policy.select(committed, self.final_step, self.clock())

    # -- one round

    def poll(self, pool: concurrent.futures.Executor) -> None:
        self.discover()
        if not self.manifests and not self.said_waiting:
            where = self.storage.uri(checkpoints_key(self.run_name))
            self.say(f"run {self.run_name} has no committed checkpoint yet in {where}; waiting")
            self.said_waiting = True
        selected = self.selected()
        self.wanted |= selected
        for step in sorted(self.deleted & self.wanted):
            for suite in self.suites:
                if (step, suite) not in self.settled:
                    self._skip_deleted(step, suite)
        todo = [
            (step, suite)
            for step in sorted(selected, reverse=True)
            for suite in self.suites
            if (step, suite) not in self.settled and (step, suite) not in self.running
        ]
        fresh = [pair for pair in todo if pair not in self.announced]
        if fresh:  # newly selected: what the ledger has settled (a restart) is not queued
            for pair in fresh:
                entry, _, _ = self.ledger.read(*pair)
                if self._is_final(entry):
                    self._settle(pair, entry)
            self.announced.update(fresh)  # only once all were read: a failed poll reads again
            queued = [pair for pair in fresh if pair not in self.settled]
            if len(queued) < len(fresh):
                self.say(f"the ledger has {len(fresh) - len(queued)} evaluation(s) settled already")
            if queued:
                self.say(f"queued {len(queued)} evaluation(s), newest first: {describe(queued)}")
            todo = [pair for pair in todo if pair not in self.settled]
        for pair in todo:
            if len(self.running) >= self.schedule.max_concurrent:
                break
            self._try_start(pair, pool)
        if self.metrics is not None:
            waiting = [p for p in todo if p not in self.running and p not in self.settled]
            self.metrics.queue(len(waiting), len(self.running))

    def _skip_deleted(self, step: int, suite: str) -> None:
        entry, version, _ = self.ledger.read(step, suite)
        if self._is_final(entry):
            self._settle((step, suite), entry)
            return
        if entry is not None and entry.state == "running":
            return  # its owner records the skip itself
        reason = f"checkpoint step {step} was deleted before it was evaluated"
        if self.ledger.record(step, suite, version, "skipped", reason=reason):
            self.say(f"skipped step {step} {suite}: {reason}")
        entry, _, _ = self.ledger.read(step, suite)
        if entry is not None and entry.state != "running":
            self._settle((step, suite), entry)

    def _is_final(self, entry: Entry | None) -> bool:
        return is_final(entry, self.schedule.max_attempts)

    def _settle(self, pair: Pair, entry: Entry) -> None:
        """Note `pair` as settled; when that settles its step (every suite, none running
        here), the step's export is released: no evaluation of this watcher needs it again."""
        self.settled[pair] = entry
        step = pair[0]
        if self.release is None or step in self.released:
            return
        if any((step, suite) not in self.settled for suite in self.suites) or any(
            running[0] == step for running in self.running
        ):
            return
        self.released.add(step)
        try:
            self.release(step)
        except OSError as err:
            self.say(f"could not delete the export of step {step}: {err}")

    def _try_start(self, pair: Pair, pool: concurrent.futures.Executor) -> None:
        step, suite = pair
        entry, version, problem = self.ledger.read(step, suite)
        if problem:
            self.say(f"ledger: {problem}; evaluating step {step} {suite} again")
        s = self.schedule
        if self._is_final(entry):
            self._settle(pair, entry)
            return
        if entry is not None and entry.state == "running":
            silent = self.clock() - (entry.heartbeat or 0.0)
            if silent <= s.stale_seconds:
                return  # another watcher is on it
            self.say(
                f"step {step} {suite}: its owner {entry.owner} has been silent for "
                f"{silent:.0f} s; taking over"
            )
            if entry.attempts >= s.max_attempts:
                reason = f"the watcher evaluating it stopped, {entry.attempts} time(s)"
                if self.ledger.record(
                    step, suite, version, "failed", attempts=entry.attempts, reason=reason
                ):
                    self.say(f"failed step {step} {suite}: {reason}")
                return
        attempts = (entry.attempts if entry else 0) + 1
        claim = self.ledger.claim(step, suite, self.owner, version, attempts)
        if claim is None:
            return  # another watcher claimed it first
        self.say(f"started step {step} {suite} (attempt {attempts} of {s.max_attempts})")
        future = pool.submit(self._evaluate, claim, self.manifests[step])
        future.add_done_callback(lambda _: self.woken.set())
        self.running[pair] = Running(claim, future)

    def _evaluate(self, claim: Claim, manifest: Manifest) -> None:
        """Evaluate, log to MLflow while the claim is ours, record the outcome."""
        cfg = self.suites[claim.entry.suite]
        which = f"step {manifest.step} {cfg.suite}"
        started = time.monotonic()
        try:
            results = self.evaluate(self.storage, manifest, cfg)
            if results.get("failed"):
                raise RuntimeError(f"task(s) failed: {results['failed']}")
            if not self._written(f"the heartbeat of {which}", lambda: self.ledger.heartbeat(claim)):
                return  # taken over: the new owner logs and records it
            run_id = self.log(manifest, cfg, results) if self.log else None
            best = headline(suite_metrics(results, cfg.tasks))
            self._written(
                f"recording {which}",
                lambda: self.ledger.finish(
                    claim,
                    "done",
                    metrics=flat_metrics(results),
                    headline=best[0] if best else None,
                    mlflow_run_id=run_id,
                    reason=None,
                ),
            )
        except Exception as err:
            failure = f"{type(err).__name__}: {err}".splitlines()[0]

            def record_failure() -> bool:
                if not self.storage.exists(manifest_key(self.run_name, manifest.step)):
                    reason = f"checkpoint step {manifest.step} was deleted during its evaluation"
                    return self.ledger.finish(claim, "skipped", reason=reason)
                return self.ledger.finish(claim, "failed", reason=failure)

            self._written(f"recording {which}", record_failure)
        if self.metrics is not None:
            failed = claim.entry.state == "failed"
            self.metrics.evaluated(cfg.suite, time.monotonic() - started, failed)

    def _written(self, what: str, write: Callable[[], bool]) -> bool:
        """`write()`, a ledger write of an evaluation that ended, retried with backoff while
        storage fails (saying so): one error must not throw hours of evaluation away. Once
        the watcher stops, the error is raised: the claim, gone stale, is taken over."""
        backoff = self._backoff()
        while True:
            try:
                return write()
            except Exception as err:  # said, and the write retried
                if self.stopped.is_set():
                    raise
                self.stopped.wait(self._retrying(what, err, backoff))

    def reap(self) -> None:
        """Report evaluations that ended; settle what will not run again."""
        for pair, job in list(self.running.items()):
            if not job.future.done():
                continue
            del self.running[pair]
            entry, (step, suite) = job.claim.entry, pair
            if job.claim.lost:
                self.say(f"step {step} {suite}: another watcher took it over")
            elif entry.state == "done":
                name = entry.headline
                score = f"{name} {entry.metrics[name]:.4f}" if name else "no metrics"
                self.say(f"finished step {step} {suite}: {score}")
            else:
                self.say(
                    f"{entry.state} step {step} {suite}: {entry.reason}"
                    + ("" if self._is_final(entry) else " (will retry)")
                )
            if not job.claim.lost and self._is_final(entry):
                self._settle(pair, entry)

    def finished(self) -> bool:
        """The final step is committed and every pair selected so far (by `poll`) is settled."""
        if self.final_step is None or self.final_step not in self.manifests or self.running:
            return False
        return all((step, suite) in self.settled for step in self.wanted for suite in self.suites)

    # -- the loop

    def _backoff(self) -> Backoff:
        """Of a poll or a ledger write that failed: from 1 s (or `poll_seconds`, if shorter)
        up to a minute (or `poll_seconds`, if longer)."""
        every = self.schedule.poll_seconds
        return Backoff(min(1.0, every), max(60.0, every))

    def _retrying(self, what: str, err: Exception, backoff: Backoff) -> float:
        """Say that `what` failed with `err` and is retried; the seconds to wait first."""
        delay = backoff.failed()
        self.say(f"{what} failed ({type(err).__name__}: {err}); retrying in {delay:g} s")
        return delay

    def _heartbeats(self) -> None:
        """Refresh each claim every `heartbeat_seconds`. A beat that fails is retried sooner,
        with backoff, and the thread goes on: were it to end, the claims would look dead and
        be taken over (evaluated again) or end as failed."""
        every = self.schedule.heartbeat_seconds
        backoff, wait = Backoff(min(1.0, every / 4), every), every
        while not self.stopped.wait(wait):
            wait = every
            for (step, suite), job in list(self.running.items()):
                try:
                    if not job.claim.lost and not self.ledger.heartbeat(job.claim):
                        self.say(f"step {step} {suite}: lost the claim to another watcher")
                except Exception as err:  # said, and the beat retried
                    wait = self._retrying(f"the heartbeat of step {step} {suite}", err, backoff)
                    break
            else:
                backoff.succeeded()

    def run(self) -> dict[Pair, Entry]:
        """Watch until stopped (`stop()`, or Ctrl-C) or, with `until_finished`, until done;
        the settled pairs."""
        s = self.schedule
        self.say(
            f"watching {self.run_name} in {self.storage.uri(self.run_name)}: suites "
            f"{', '.join(self.suites)}; {s.describe() or 'every checkpoint'}; polling every "
            f"{s.poll_seconds:g} s, {s.max_concurrent} at a time (owner {self.owner})"
        )
        heartbeats = threading.Thread(target=self._heartbeats, name="heartbeats", daemon=True)
        heartbeats.start()
        pool = concurrent.futures.ThreadPoolExecutor(s.max_concurrent, "evaluation")
        backoff = self._backoff()
        try:
            while not self.stopped.is_set():
                self.reap()
                try:
                    self.poll(pool)
                except ConfigError:
                    raise  # a setting: retrying cannot fix it
                except Exception as err:  # said, and the poll retried
                    self.stopped.wait(self._retrying("polling", err, backoff))
                    continue
                backoff.succeeded()
                if s.until_finished and self.finished():
                    self.say(f"finished: the final step {self.final_step} is evaluated")
                    break
                self.woken.wait(s.poll_seconds)
                self.woken.clear()
        finally:
            self.stopped.set()
            pool.shutdown(wait=False, cancel_futures=True)
        return dict(self.settled)

    def stop(self) -> None:
        self.stopped.set()
        self.woken.set()


def describe(pairs: list[Pair], shown: int = 6) -> str:
    text = ", ".join(f"step {step} {suite}" for step, suite in pairs[:shown])
    return text + (f" and {len(pairs) - shown} more" if len(pairs) > shown else "")
