"""Turning a `data` config into token files: corpus, tokenizer, then each component's .bin/.idx."""

from __future__ import annotations

import os
from typing import Any

from neoray.config import ConfigError, dataclass_from_config
from neoray.data.config import DataConfig
from neoray.data.demo_corpus import write_demo_corpus
from neoray.data.indexed import IndexedDataset, IndexedFormatError, token_files_exist
from neoray.data.preprocess import PreprocessConfig, PreprocessSummary, preprocess
from neoray.storage import StorageError
from neoray.tokenizer.trainer import TokenizerTrainConfig, train_tokenizer


def prepare_data(
    cfg: DataConfig, show_progress: bool = True, **preprocess_options: Any
) -> list[PreprocessSummary]:
    """Build what is missing: the demo corpus, the tokenizer, then every component with `input`.

    Components whose `<prefix>.idx` exists are kept as they are (delete it to rebuild), so this
    is cheap to run before every training run; when all exist (token files published to S3
    included), nothing else is looked at either. `preprocess_options` are further
    PreprocessConfig fields (executor, shard_mb, ...).
    """
    if all(token_files_exist(c.prefix) for c in cfg.components.values()):
        return []
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


def check_token_files(cfg: DataConfig) -> None:
    """Every component's token files open from here (`IndexedDataset` checks that the pair is
    complete); otherwise a ConfigError naming the component, the file and what to do. Called
    where a job's workers are about to start: an error no retry can fix stops it once."""
    for name, component in cfg.components.items():
        try:
            IndexedDataset(component.prefix)
        except (FileNotFoundError, IndexedFormatError, StorageError) as err:
            found = not isinstance(err, FileNotFoundError)
            raise ConfigError(
                f"data.components.{name}: "
                + (str(err) if found else f"no token files at {component.prefix}.idx")
                + f" (as seen from {os.getcwd()}): build them with jobs/preprocess.py (`python "
                "jobs/preprocess.py data=demo`) where every node of the cluster reads them: a "
                "filesystem all of them mount, or S3 (data.components.<name>.prefix="
                "s3://bucket/folder/name); a submitted job runs in a copy of the project "
                "without runs/"
            ) from err
