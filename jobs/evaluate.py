"""Evaluate a checkpoint on a suite: `python jobs/evaluate.py checkpoint=<dir> eval=mmlu_5shot`."""

import hydra
from omegaconf import DictConfig

from neoray.evaluation.run import run_evaluate


@hydra.main(config_path="../conf", config_name="evaluate", version_base=None)
def main(cfg: DictConfig) -> None:
    run_evaluate(cfg)


if __name__ == "__main__":
    main()
