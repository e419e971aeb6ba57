"""The end-to-end demo: `python jobs/demo.py [model=pythia_70m] [demo.steps=200]`."""

import hydra
from omegaconf import DictConfig

from neoray.config import dataclass_from_config
from neoray.demo import DemoConfig, run_demo
from neoray.model import NeoXConfig


@hydra.main(config_path="../conf", config_name="demo", version_base=None)
def main(cfg: DictConfig) -> None:
    model = dataclass_from_config(NeoXConfig, cfg.model, "model")
    run_demo(model, dataclass_from_config(DemoConfig, cfg.demo, "demo"))


if __name__ == "__main__":
    main()
