"""Pretrain: `python jobs/pretrain.py ...` runs tp*pp*dp Ray Train workers (a local Ray, or
the cluster of RAY_ADDRESS / cluster.address); `neoray submit pretrain ...` runs it as a Ray job.
`torchrun --nproc_per_node <tp*pp*dp> jobs/pretrain.py launcher=torchrun ...` needs no Ray.

`dry_run=true` prints the plan instead (no process group, no tensors). A single process may
also be started with `launcher=torchrun` but without torchrun.
"""

import hydra
from omegaconf import DictConfig

from neoray.training.job import run_pretrain


@hydra.main(config_path="../conf", config_name="pretrain", version_base=None)
def main(cfg: DictConfig) -> None:
    run_pretrain(cfg)


if __name__ == "__main__":
    main()
