"""Compare tokenizers' token counts per corpus component. See conf/token_report.yaml."""

import hydra
from omegaconf import DictConfig

from neoray.config import dataclass_from_config
from neoray.tokenizer.report import TokenReportConfig, write_report


@hydra.main(config_path="../conf", config_name="token_report", version_base=None)
def main(cfg: DictConfig) -> None:
    config = dataclass_from_config(TokenReportConfig, cfg, "token_report")
    _, table = write_report(config)
    print(table)
    print(f"written to {config.output_dir}/token_report.md and token_report.png")


if __name__ == "__main__":
    main()
