"""When checkpoints are taken and how many are kept."""

from __future__ import annotations

from dataclasses import dataclass, field

from neoray.config import ConfigError

# Pythia's log-spaced early checkpoints: steps 0, 1, 2, 4, ..., 512.
MILESTONES = frozenset([0] + [2**i for i in range(10)])


@dataclass
class CheckpointConfig:
    enabled: bool = True
    interval: int = 1000  # save every this many optimizer steps (and always the final step)
    milestones: bool = False  # also save (and keep forever) steps 0, 1, 2, 4, ..., 512
    keep_last: int = 2  # committed checkpoints kept besides milestones; older ones are deleted
    # where ranks write shards before upload (in <staging_dir>/<run_name>/); None: <run_dir>/staging
    staging_dir: str | None = None
    # stop when one rank's uncommitted checkpoints (storage failing) take more; None: no limit
    max_staging_gb: float | None = None
    # one live job per run: a job's lease (<run_name>/lease.json), refreshed every
    # lease_timeout_s / 4, is taken over by another job that has seen it unchanged this long
    lease_timeout_s: float = 120.0
    # Scheduled evaluation (conf/eval_watch.yaml) of this run on these suites: a checkpoint past
    # keep_last is kept until the evaluation ledger settles it for each suite (done, skipped,
    # failed for good), since a watcher may start after the run or fall behind it
    hold_for_eval: list[str] = field(default_factory=list)
    hold_for_eval_every: int | None = None  # the schedule's `every`: hold only its multiples
    # held checkpoints past this total are deleted anyway, oldest first, and the ledger says so
    # (skipped); None: no cap
    hold_for_eval_max_gb: float | None = 1000.0

    def __post_init__(self) -> None:
        if self.interval < 1:
            raise ConfigError(f"checkpoint.interval={self.interval} must be at least 1")
        if self.keep_last < 1:
            raise ConfigError(
                f"checkpoint.keep_last={self.keep_last} must be at least 1 (resume needs one)"
            )
        if self.lease_timeout_s <= 0:
            raise ConfigError(
                f"checkpoint.lease_timeout_s={self.lease_timeout_s} must be positive (seconds "
                "without a heartbeat after which another job may take the run over)"
            )
        if self.max_staging_gb is not None and self.max_staging_gb <= 0:
            raise ConfigError(
                f"checkpoint.max_staging_gb={self.max_staging_gb} must be positive (or null: "
                "no limit)"
            )
        if self.hold_for_eval_every is not None and self.hold_for_eval_every < 1:
            raise ConfigError(
                f"checkpoint.hold_for_eval_every={self.hold_for_eval_every} must be at least 1 "
                "(or null: every checkpoint)"
            )
        if self.hold_for_eval_max_gb is not None and self.hold_for_eval_max_gb <= 0:
            raise ConfigError(
                f"checkpoint.hold_for_eval_max_gb={self.hold_for_eval_max_gb} must be positive "
                "(or null: no cap)"
            )

    def is_milestone(self, step: int) -> bool:
        return self.milestones and step in MILESTONES

    def should_save(self, step: int, final_step: int) -> bool:
        """Whether to save once `step` optimizer steps are done (step 0: the initial weights)."""
        if not self.enabled:
            return False
        periodic = step > 0 and step % self.interval == 0
        return periodic or step == final_step or self.is_milestone(step)
