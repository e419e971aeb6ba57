"""Which training sequences a checkpoint reproduces, against how often and when it saw them:
`python jobs/memorization.py checkpoint=<uri | dir | run name> [step=<n|latest>] samples=<n>`.
See conf/memorization.yaml."""

import hydra
from omegaconf import DictConfig

from neoray.evaluation.memorization import run_memorization


@hydra.main(config_path="../conf", config_name="memorization", version_base=None)
def main(cfg: DictConfig) -> None:
    run_memorization(cfg)


if __name__ == "__main__":
    main()
