"""Pretrain: `torchrun --nproc_per_node <tp*pp*dp> jobs/pretrain.py launcher=torchrun ...`.

`dry_run=true` prints the plan instead (no process group, no tensors). A single process may
also be started without torchrun.
"""

import hydra
from omegaconf import DictConfig

from neoray.train.job import run_pretrain


@hydra.main(config_path="../conf", config_name="pretrain", version_base=None)
def main(cfg: DictConfig) -> None:
    run_pretrain(cfg)


if __name__ == "__main__":
    main()
