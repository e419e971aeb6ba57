"""Slim export: `python jobs/export.py checkpoint=<checkpoint step dir> output=<dir> dtype=fp16`."""

import hydra
from omegaconf import DictConfig

from neoray.checkpoint.export import ExportConfig, run_export
from neoray.config import dataclass_from_config


@hydra.main(config_path="../conf", config_name="export", version_base=None)
def main(cfg: DictConfig) -> None:
    print(run_export(dataclass_from_config(ExportConfig, cfg, "export")))


if __name__ == "__main__":
    main()
