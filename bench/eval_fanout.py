"""Fan-out overhead: `evaluate` with one Ray worker vs `lm_eval.simple_evaluate` called directly,
same export, same tasks (zero-shot MMLU), one thread each. The Ray cluster is up before timing starts (as for
any job); each call builds its own TaskManager, as a fresh lm-eval run does. Goal: >= 0.95x."""

import lm_eval
import ray
import torch
from common import compare
from eval_workload import TASKS, prepare, suite

from neoray.evaluation.fanout import evaluate_suite
from neoray.evaluation.mirror import task_manager


def main() -> None:
    mirror, model = prepare()
    cfg = suite(mirror, workers=1)
    torch.set_num_threads(1)
    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)

    def direct():
        return lm_eval.simple_evaluate(
            model="hf",
            model_args={"pretrained": str(model), "dtype": cfg.dtype},
            tasks=TASKS,
            num_fewshot=cfg.num_fewshot,
            batch_size=cfg.batch_size,
            device="cpu",
            bootstrap_iters=0,
            task_manager=task_manager(mirror),
        )

    results = direct()
    documents = sum(n["effective"] for n in results["n-samples"].values())
    try:
        compare(
            "fanout",
            lambda: evaluate_suite(str(model), cfg),
            "lm_eval",
            direct,
            rounds=3,
            warmup=0,
            units_per_call=documents,
            unit="docs/s",
            goal=0.95,
        )
    finally:
        ray.shutdown()


if __name__ == "__main__":
    main()
