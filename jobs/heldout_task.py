"""Write a run's held-out perplexity tasks: `python jobs/heldout_task.py data=<the run's data>
heldout.output=runs/<run>/eval_tasks/heldout` (see conf/heldout_task.yaml)."""

import hydra
from omegaconf import DictConfig

from neoray.config import dataclass_from_config
from neoray.data.config import data_config
from neoray.evaluation.heldout import HeldoutConfig, write_heldout_tasks


@hydra.main(config_path="../conf", config_name="heldout_task", version_base=None)
def main(cfg: DictConfig) -> None:
    heldout = dataclass_from_config(HeldoutConfig, cfg.heldout, "heldout")
    names = write_heldout_tasks(data_config(cfg.data), heldout)
    print(f"{', '.join(names)} (tag {heldout.name}) in {heldout.output}")


if __name__ == "__main__":
    main()
