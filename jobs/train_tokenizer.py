"""Train a NeoX-style BPE tokenizer. See conf/train_tokenizer.yaml."""

import hydra
from omegaconf import DictConfig

from neoray.config import dataclass_from_config
from neoray.tokenizer.trainer import TokenizerTrainConfig, train_tokenizer


@hydra.main(config_path="../conf", config_name="train_tokenizer", version_base=None)
def main(cfg: DictConfig) -> None:
    tokenizer = train_tokenizer(dataclass_from_config(TokenizerTrainConfig, cfg, "train_tokenizer"))
    print(f"wrote {tokenizer.source}: {tokenizer.vocab_size:,} tokens")


if __name__ == "__main__":
    main()
