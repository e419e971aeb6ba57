"""Print the decoded text of one training step's batch. See conf/inspect_batch.yaml."""

import hydra
from omegaconf import DictConfig

from neoray.config import dataclass_from_config
from neoray.data.config import data_config
from neoray.data.inspect import batch_samples, format_batch
from neoray.data.loader import BatchSchedule, train_mixture
from neoray.tokenizer.load import load_tokenizer


@hydra.main(config_path="../conf", config_name="inspect_batch", version_base=None)
def main(cfg: DictConfig) -> None:
    data = data_config(cfg.data)
    schedule = dataclass_from_config(BatchSchedule, cfg.batch, "batch")
    samples = batch_samples(
        train_mixture(data, schedule), load_tokenizer(data.tokenizer), schedule, cfg.step, cfg.rank
    )
    print(format_batch(cfg.step, samples))


if __name__ == "__main__":
    main()
