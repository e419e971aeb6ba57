"""Slim export: `python jobs/export.py checkpoint=<checkpoint step dir> output=<dir> dtype=fp16`."""

import hydra
from omegaconf import DictConfig

from neoray.checkpoint.export import ExportConfig, run_export
from neoray.config import dataclass_from_config, to_dict
from neoray.storage import StorageConfig


@hydra.main(config_path="../conf", config_name="export", version_base=None)
def main(cfg: DictConfig) -> None:
    values = to_dict(cfg)
    storage = dataclass_from_config(StorageConfig, values.pop("storage"), "storage")
    print(run_export(dataclass_from_config(ExportConfig, values, "export"), storage))


if __name__ == "__main__":
    main()
