"""Sweep: `python jobs/sweep.py sweep=<name> [pretrain overrides]` runs a Ray Tune sweep of
pretraining runs over the search space of conf/sweep/<name>.yaml, on a local Ray or the cluster
of RAY_ADDRESS / cluster.address; `neoray submit sweep sweep=<name>` runs it as a Ray job.
Running the same command again continues a sweep whose driver died.
"""

from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from neoray.sweep.run import run_sweep

CONF_DIR = str(Path(__file__).resolve().parents[1] / "conf")


def pretrain_overrides(overrides: list[str]) -> list[str]:
    """The command line's overrides of the pretrain config: not the sweep's or Hydra's own,
    nor the run's name and folder, which each trial sets for itself."""
    kept = []
    for item in overrides:
        key = item.lstrip("+~").split("=", 1)[0]
        if key.split(".")[0] not in ("sweep", "sweep_dir", "run_name", "run_dir", "hydra"):
            kept.append(item)
    return kept


@hydra.main(config_path="../conf", config_name="sweep", version_base=None)
def main(cfg: DictConfig) -> None:
    command_line = pretrain_overrides(list(HydraConfig.get().overrides.task))
    result = run_sweep(cfg, command_line, CONF_DIR)
    for outcome in result.outcomes:
        metric = "-" if outcome.metric is None else f"{outcome.metric:.4f}"
        values = " ".join(f"{k}={v}" for k, v in outcome.values.items())
        print(
            f"{outcome.trial_id}  {outcome.status:<13} {metric:>8}  steps {outcome.trained_steps}  {values}"
        )
    if result.command is None:
        print("no trial reported the metric: nothing to recommend")
        return
    print(f"best: trial {result.best.trial_id}, {result.sweep.metric} {result.best.metric:.4f}")
    print(f"train it: {result.command}")


if __name__ == "__main__":
    main()
