"""The end-to-end demo: `python jobs/demo.py [model=pythia_70m] [batch.train_steps=1000]`."""

import hydra
from omegaconf import DictConfig

from neoray.config import dataclass_from_config
from neoray.data.config import data_config
from neoray.data.loader import BatchSchedule
from neoray.demo import DemoConfig, run_demo
from neoray.model import NeoXConfig


@hydra.main(config_path="../conf", config_name="demo", version_base=None)
def main(cfg: DictConfig) -> None:
    run_demo(
        dataclass_from_config(NeoXConfig, cfg.model, "model"),
        data_config(cfg.data),
        dataclass_from_config(BatchSchedule, cfg.batch, "batch"),
        dataclass_from_config(DemoConfig, cfg.demo, "demo"),
    )


if __name__ == "__main__":
    main()
