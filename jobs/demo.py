"""The end-to-end demo: `python jobs/demo.py [train.steps=600] [model.num_layers=6] ...`."""

import hydra
from omegaconf import DictConfig

from neoray.demo import run_demo


@hydra.main(config_path="../conf", config_name="demo", version_base=None)
def main(cfg: DictConfig) -> None:
    run_demo(cfg)


if __name__ == "__main__":
    main()
