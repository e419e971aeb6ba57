"""A suite of lm-eval tasks split over Ray workers and merged as if it had run in one piece.

The driver builds the suite's tasks and groups with lm-eval's TaskManager and splits the
documents into one unit of work per worker: whole tasks, and large tasks cut into contiguous
document shards when their few-shot contexts do not depend on the order documents are
processed in (zero-shot, or the `first_n` sampler; lm-eval's default sampler draws from one
random stream per task, so those tasks stay whole). Each unit runs `lm_eval.simple_evaluate`
with lm-eval's own backend and returns its per-sample results. The driver concatenates each
task's samples in document order and hands them to lm-eval's own aggregation
(`lm_eval_private.process_results`: the task's aggregation functions, stderr, groups weighted
by size), so the merged results are those of one unsplit run.
"""

from __future__ import annotations

import itertools
import logging
import math
import os
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from neoray.evaluation.config import EvalConfig
from neoray.evaluation.mirror import task_manager

log = logging.getLogger(__name__)


class DocIndices(list):
    """Sorted document indices for `simple_evaluate(samples=...)`: a list with set-speed
    membership, since lm-eval tests `i in samples` for every document of the task."""

    def __init__(self, indices) -> None:
        super().__init__(sorted(indices))
        self._members = frozenset(self)

    def __contains__(self, index: object) -> bool:
        return index in self._members

    def __reduce__(self):
        return DocIndices, (list(self),)


@dataclass
class Unit:
    """The work of one worker: task name -> document indices (None: all of them), or the
    whole suite as configured (`eval.limit` applied by lm-eval itself)."""

    docs: dict[str, list[int] | None] = field(default_factory=dict)
    cost: int = 0  # characters of its documents, for balancing
    whole: bool = False


@dataclass
class TaskOutput:
    """What a worker returns for one task: lm-eval's logged samples and the task's config."""

    samples: list[dict]
    config: dict[str, Any]


def effective_fewshot(task, num_fewshot: int | None) -> int:
    """The number of few-shot examples `simple_evaluate` will use for `task`."""
    own = task.get_config("num_fewshot")
    if num_fewshot is not None and own != 0:
        return num_fewshot
    return own or 0


def shardable(task, num_fewshot: int | None) -> bool:
    """True when a task's prompts do not depend on which other documents share its run."""
    from lm_eval.api.samplers import FirstNSampler

    return effective_fewshot(task, num_fewshot) == 0 or isinstance(
        getattr(task, "sampler", None), FirstNSampler
    )


def document_costs(task, count: int) -> list[int]:
    """Characters of each of the task's first `count` documents: a proxy for the tokens, and
    so the time, evaluating each takes (subjects of MMLU differ by a factor of twenty)."""
    return [len(str(doc)) for doc in itertools.islice(task.eval_docs, count)]


def planned_count(task, limit: int | None) -> int:
    """How many documents of `task` a run evaluates: the first `limit`, or all of them."""
    return min(len(task.eval_docs), limit or len(task.eval_docs))


def plan_units(tasks: dict[str, Any], cfg: EvalConfig) -> list[Unit]:
    """Split the suite's documents into at most `cfg.workers` units of about equal cost."""
    costs = {
        name: document_costs(task, planned_count(task, cfg.limit)) for name, task in tasks.items()
    }
    return pack(
        costs,
        sizes={name: len(task.eval_docs) for name, task in tasks.items()},
        shardable={name: shardable(task, cfg.num_fewshot) for name, task in tasks.items()},
        workers=cfg.workers,
    )


def pack(
    costs: dict[str, list[int]],
    sizes: dict[str, int],
    shardable: dict[str, bool],
    workers: int,
) -> list[Unit]:
    """Units covering document 0..len(costs[t])-1 of every task t exactly once.

    `costs[t]` holds the cost of each document to evaluate, `sizes[t]` the task's size (a unit
    of a task evaluated in full carries None instead of indices). A task costing more than an
    even share is cut into contiguous shards of about that share if it is shardable; pieces are
    packed largest first onto the cheapest unit, and shards of one task that land on the same
    unit are joined into one document list.
    """
    share = max(1, math.ceil(sum(map(sum, costs.values())) / workers))
    pieces: list[tuple[int, str, list[int] | None]] = []
    for name, task_costs in costs.items():
        cost, count = sum(task_costs), len(task_costs)
        if cost > share and workers > 1 and shardable[name]:
            shards = min(count, math.ceil(cost / share))
            bounds = [round(i * count / shards) for i in range(shards + 1)]
            pieces += [
                (sum(task_costs[a:b]), name, list(range(a, b)))
                for a, b in itertools.pairwise(bounds)
            ]
        else:
            pieces.append((cost, name, None if count == sizes[name] else list(range(count))))
    units = [Unit() for _ in range(workers)]
    for cost, name, docs in sorted(pieces, key=lambda piece: -piece[0]):
        unit = min(units, key=lambda u: u.cost)
        if name in unit.docs:  # another shard of this task: one worker evaluates both
            unit.docs[name] = sorted(unit.docs[name] + docs)
        else:
            unit.docs[name] = docs
        unit.cost += cost
    return [unit for unit in units if unit.docs]


def model_args(hf_dir: str, cfg: EvalConfig) -> dict[str, Any]:
    """The lm-eval backend's arguments for the exported model directory."""
    args: dict[str, Any] = {"pretrained": hf_dir, "dtype": cfg.dtype}
    if cfg.backend == "vllm":
        args["tensor_parallel_size"] = max(1, int(cfg.gpus_per_worker))
    return args | cfg.model_args


def run_unit(
    unit: Unit, hf_dir: str, cfg: EvalConfig, manager, built: dict[str, Any]
) -> dict[str, TaskOutput]:
    """Evaluate one unit with `lm_eval.simple_evaluate`; per-sample results by task.

    `built` holds the unit's tasks as the driver built them from the suite's own specs (so
    group-level settings apply exactly as in an unsplit run, and no worker builds tasks: the
    driver needs them for the merge anyway). Only the unit's documents are evaluated; stderr
    is left to the merge. `manager` is the driver's TaskManager: without one, lm-eval indexes
    its task configs again (seconds).
    """
    import lm_eval
    import torch

    if cfg.device == "cpu":
        torch.set_num_threads(cfg.threads)
    _quiet_datasets()
    names = list(built)
    samples = {name: DocIndices(docs) for name, docs in unit.docs.items() if docs is not None}
    results = lm_eval.simple_evaluate(
        model=cfg.backend,
        model_args=model_args(hf_dir, cfg),
        tasks=[built[name] for name in names],
        num_fewshot=cfg.num_fewshot,
        batch_size=cfg.batch_size,
        device=cfg.device,
        limit=cfg.limit if unit.whole else None,
        samples=samples or None,
        bootstrap_iters=0,
        log_samples=True,
        gen_kwargs=cfg.gen_kwargs,
        task_manager=manager,
    )
    return {
        name: TaskOutput(samples=results["samples"][name], config=results["configs"][name])
        for name in names
    }


def coverage_problem(samples: list[dict], expected: int) -> str | None:
    """Why `samples` are not exactly one result per filter for documents 0..expected-1."""
    by_filter: dict[str, list[int]] = defaultdict(list)
    for sample in samples:
        by_filter[sample["filter"]].append(sample["doc_id"])
    if not by_filter:
        return f"no samples of the {expected} planned documents came back"
    for name, ids in by_filter.items():
        if sorted(ids) != list(range(expected)):
            missing = sorted(set(range(expected)) - set(ids))
            repeated = len(ids) - len(set(ids))
            return (
                f"filter {name!r}: {len(set(ids))} of {expected} planned documents came back "
                f"(missing {missing[:10]}{'...' if len(missing) > 10 else ''}, "
                f"{repeated} repeated); a score on part of the data would be wrong"
            )
    return None


def merge(
    tasks: dict[str, Any],
    groups: dict[str, Any],
    outputs: dict[str, list[TaskOutput]],
    bootstrap_iters: int,
    expected_docs: dict[str, int],
    incomplete: dict[str, str],
) -> dict[str, Any]:
    """lm-eval's results dict for the tasks whose outputs are all in, as one run computes it.

    A task whose samples are not exactly its `expected_docs[task]` documents is left out and
    reported in `incomplete` (task -> reason), as are the groups it belongs to.
    """
    from neoray.evaluation.lm_eval_private import process_results

    accumulated = {}
    for name, task in tasks.items():
        if name not in outputs:
            continue
        samples = [sample for output in outputs[name] for sample in output.samples]
        if problem := coverage_problem(samples, expected_docs[name]):
            log.error("%s: %s", name, problem)
            incomplete[name] = problem
            continue
        filters = list(dict.fromkeys(sample["filter"] for sample in samples))
        samples.sort(key=lambda s: (filters.index(s["filter"]), s["doc_id"]))
        raw_metrics: dict[tuple[str, str], list] = defaultdict(list)
        for sample in samples:
            for metric in sample["metrics"]:
                raw_metrics[metric, sample["filter"]].append(sample[metric])
        task.set_config(key="num_fewshot", value=outputs[name][0].config.get("num_fewshot"))
        accumulated[name] = {"task": task, "raw_metrics": raw_metrics, "logged_samples": samples}
    complete = {
        name: group
        for name, group in groups.items()
        if all(task.task_name in accumulated for task in group.get_all_tasks())
    }
    return process_results(accumulated, complete, bootstrap_iters)


def evaluate_suite(hf_dir: str, cfg: EvalConfig) -> dict[str, Any]:
    """Run `cfg`'s suite on the Hugging Face directory `hf_dir` over Ray; lm-eval's results
    dict (with `samples`), plus `failed`: tasks whose worker failed after its retries."""
    import ray

    from neoray.cluster.job_env import JobTask

    _quiet_datasets()
    manager = task_manager(cfg.data_dir, cfg.task_dirs)
    remote = JobTask(  # with the job's S3 settings and credentials, on any node
        run_unit,
        num_cpus=cfg.cpus_per_worker,
        num_gpus=cfg.gpus_per_worker,
        max_retries=cfg.max_retries,
        retry_exceptions=True,
        scheduling_strategy="SPREAD",  # one unit per node where there are enough nodes
    )
    hf_dir, manager_ref = os.path.abspath(hf_dir), ray.put(manager)

    loaded = manager.load(cfg.tasks)
    tasks, groups = loaded["tasks"], loaded.get("groups", {})
    units = [Unit(whole=True)] if cfg.workers == 1 else plan_units(tasks, cfg)
    pending = {
        remote.remote(
            unit,
            hf_dir,
            cfg,
            manager_ref,
            {n: tasks[n] for n in (tasks if unit.whole else unit.docs)},
        ): unit
        for unit in units
    }
    log.info("suite %s: %d tasks in %d units", cfg.suite, len(tasks), len(pending))
    outputs: dict[str, list[TaskOutput]] = defaultdict(list)
    failed: dict[str, str] = {}
    while pending:
        [ready], _ = ray.wait(list(pending), num_returns=1)
        unit = pending.pop(ready)
        try:
            for name, output in ray.get(ready).items():
                outputs[name].append(output)
        except Exception as err:  # the unit failed after its retries; keep the others
            names = list(tasks) if unit.whole else list(unit.docs)
            log.error("worker for %s failed: %s", ", ".join(names), err)
            failed.update(dict.fromkeys(names, str(err).splitlines()[0]))
    for name in failed:
        outputs.pop(name, None)
    expected = {name: planned_count(task, cfg.limit) for name, task in tasks.items()}
    results = merge(tasks, groups, outputs, cfg.bootstrap_iters, expected, failed)
    results["failed"] = failed
    return results


def _quiet_datasets() -> None:
    import datasets

    datasets.disable_progress_bars()
