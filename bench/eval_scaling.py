"""Scaling: the same suite on 2 Ray workers of 1 thread vs 1 worker of 1 thread (this machine
has 2 cores). Goal: >= 1.6x."""

import ray
from common import compare
from eval_workload import prepare, suite

from neoray.evaluation.fanout import evaluate_suite


def main() -> None:
    mirror, model = prepare()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    one, two = suite(mirror, workers=1), suite(mirror, workers=2)
    documents = sum(n["effective"] for n in evaluate_suite(str(model), one)["n-samples"].values())
    try:
        compare(
            "2_workers",
            lambda: evaluate_suite(str(model), two),
            "1_worker",
            lambda: evaluate_suite(str(model), one),
            rounds=3,
            warmup=1,
            units_per_call=documents,
            unit="docs/s",
            goal=1.6,
        )
    finally:
        ray.shutdown()


if __name__ == "__main__":
    main()
