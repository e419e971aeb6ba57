"""Tokenize corpora into Megatron-format token files. See conf/preprocess.yaml."""

import hydra
from omegaconf import DictConfig, OmegaConf

from neoray.config import dataclass_from_config
from neoray.data.config import data_config
from neoray.data.prepare import prepare_data
from neoray.data.preprocess import PreprocessConfig, preprocess


@hydra.main(config_path="../conf", config_name="preprocess", version_base=None)
def main(cfg: DictConfig) -> None:
    options = OmegaConf.to_container(cfg, resolve=True)
    data = options.pop("data", None)
    if data is not None:
        executor = {k: options[k] for k in ("executor", "shard_mb", "batch_size", "cpus_per_task")}
        summaries = prepare_data(data_config(data), **executor)
    else:
        summaries = [preprocess(dataclass_from_config(PreprocessConfig, options, "preprocess"))]
    for summary in summaries:
        print(summary.describe())
    if not summaries:
        print("nothing to do: every component with `input` already has its .bin/.idx")


if __name__ == "__main__":
    main()
