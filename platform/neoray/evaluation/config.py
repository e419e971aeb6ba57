"""The evaluation job's config: which tasks, on how many Ray workers, with which backend."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from neoray.config import ConfigError
from neoray.evaluation.task_folders import resolve_folder

BACKENDS = ("hf", "vllm")


@dataclass
class EvalConfig:
    """One suite of lm-eval tasks and how to fan it out (see conf/evaluate.yaml, conf/eval/)."""

    suite: str
    tasks: list[str]
    # folders of the suite's own lm-eval task YAMLs (neoray.evaluation.task_folders)
    task_dirs: list[str] = field(default_factory=list)
    num_fewshot: int | None = None  # None: each task's own default
    limit: int | None = None  # documents per task (the first `limit`); None: all
    workers: int = 1  # Ray tasks the suite is split into
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0
    threads_per_worker: int | None = None  # torch threads; None: cpus_per_worker
    backend: str = "hf"  # lm-eval model type: hf, or vllm on GPU clusters
    batch_size: int = 8
    dtype: str = "float32"  # the dtype the model is evaluated in
    device: str = "cpu"
    data_dir: str | None = None  # an evaluation mirror (neoray.evaluation.mirror); None: the hub
    bootstrap_iters: int = 100000  # lm-eval's stderr bootstrap for non-mean metrics
    gen_kwargs: dict[str, Any] | None = None  # e.g. {max_gen_toks: 64} for generative tasks
    max_retries: int = 2  # a failed worker is retried this often
    model_args: dict[str, Any] = field(default_factory=dict)  # extra backend arguments

    def __post_init__(self) -> None:
        self.tasks = list(self.tasks or [])
        if not self.tasks:
            raise ConfigError(f"eval.tasks of suite {self.suite!r} is empty: list lm-eval tasks")
        if self.backend not in BACKENDS:
            raise ConfigError(f"eval.backend={self.backend!r}: choose one of {', '.join(BACKENDS)}")
        for name in ("workers", "batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"eval.{name} must be at least 1, got {getattr(self, name)}")
        if self.limit is not None and self.limit < 1:
            raise ConfigError(f"eval.limit must be at least 1 or null (all), got {self.limit}")
        if self.num_fewshot is not None and self.num_fewshot < 0:
            raise ConfigError(f"eval.num_fewshot must be >= 0 or null, got {self.num_fewshot}")
        if self.cpus_per_worker <= 0 or self.gpus_per_worker < 0 or self.max_retries < 0:
            raise ConfigError(
                "eval.cpus_per_worker must be > 0, eval.gpus_per_worker and eval.max_retries >= 0"
            )
        self.task_dirs = [str(resolve_folder(name)) for name in self.task_dirs or []]
        self.gen_kwargs = dict(self.gen_kwargs) if self.gen_kwargs else None
        self.model_args = dict(self.model_args or {})

    @property
    def threads(self) -> int:
        return self.threads_per_worker or max(1, int(self.cpus_per_worker))
