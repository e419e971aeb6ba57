"""Scheduled evaluation of a run's checkpoints: `python jobs/eval_watch.py run_name=<run>
'suites=[mmlu_0shot,mmlu_5shot]' schedule.every=1000` (see conf/eval_watch.yaml)."""

import hydra
from omegaconf import DictConfig

from neoray.evaluation.run import run_eval_watch


@hydra.main(config_path="../conf", config_name="eval_watch", version_base=None)
def main(cfg: DictConfig) -> None:
    run_eval_watch(cfg)


if __name__ == "__main__":
    main()
