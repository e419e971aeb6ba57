"""Turning a `data` config into token files: corpus, tokenizer, then each component's .bin/.idx."""

from __future__ import annotations

import os
from typing import Any

from neoray.config import dataclass_from_config
from neoray.data.config import DataConfig
from neoray.data.demo_corpus import write_demo_corpus
from neoray.data.indexed import token_files_exist
from neoray.data.preprocess import PreprocessConfig, PreprocessSummary, preprocess
from neoray.tokenizer.trainer import TokenizerTrainConfig, train_tokenizer


def prepare_data(
    cfg: DataConfig, show_progress: bool = True, **preprocess_options: Any
) -> list[PreprocessSummary]:
    """Build what is missing: the demo corpus, the tokenizer, then every component with `input`.

    Components whose `<prefix>.idx` exists are kept as they are (delete it to rebuild), so this
    is cheap to run before every training run. `preprocess_options` are further PreprocessConfig
    fields (executor, shard_mb, ...).
    """
    if cfg.demo_corpus is not None:
        write_demo_corpus(cfg.demo_corpus)
    inputs = [path for c in cfg.components.values() for path in (c.input or [])]
    if not os.path.exists(cfg.tokenizer) and cfg.tokenizer_training is not None:
        fields = {"input": inputs, "output": cfg.tokenizer, "text_field": cfg.text_field}
        tokenizer_cfg = dataclass_from_config(
            TokenizerTrainConfig, {**fields, **cfg.tokenizer_training}, "data.tokenizer_training"
        )
        train_tokenizer(tokenizer_cfg, show_progress)
    summaries = []
    for component in cfg.components.values():
        if not component.input or token_files_exist(component.prefix):
            continue
        job = PreprocessConfig(
            input=component.input,
            tokenizer=cfg.tokenizer,
            output_prefix=component.prefix,
            text_field=cfg.text_field,
            **preprocess_options,
        )
        summaries.append(preprocess(job, show_progress))
    return summaries
