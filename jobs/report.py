"""The run report: `python jobs/report.py run_name=<run>` writes runs/<run>/report.html (one
self-contained page with the run's plots and config) and attaches it to the run in MLflow."""

from pathlib import Path

import hydra
from omegaconf import DictConfig

from neoray.config import dataclass_from_config
from neoray.report.page import write_report
from neoray.tracking import TrackingConfig


@hydra.main(config_path="../conf", config_name="report", version_base=None)
def main(cfg: DictConfig) -> None:
    tracking = dataclass_from_config(TrackingConfig, cfg.tracking, "tracking")
    path = write_report(cfg.run_name, Path(cfg.run_dir), tracking, Path(cfg.output))
    print(f"report: {path}")


if __name__ == "__main__":
    main()
