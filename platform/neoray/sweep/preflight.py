"""Before a sweep's first trial: can its trials reach their data and their storage from here?

The sweep's driver runs where its trials run (on the cluster, for `neoray submit sweep`), so
what it cannot open, no trial can: token files left in the submitter's `runs/` (a submitted
job runs in a copy of the project without it), a bucket that does not exist, credentials that
are refused. Each would otherwise fail every trial, and every retry of every trial, with the
same error; here the sweep stops once, with that error, before any trial starts.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

from neoray.config import ConfigError
from neoray.data.config import DataConfig
from neoray.data.prepare import check_token_files
from neoray.storage import S3Storage, StorageConfig, s3_error
from neoray.training.config import PretrainConfig


def check_storage(storage: StorageConfig) -> None:
    """The checkpoint storage answers: the bucket exists and takes these credentials, or the
    local root can be created and written."""
    if storage.kind == "s3":
        store = S3Storage(storage)
        try:
            store.client.head_bucket(Bucket=store.bucket)
        except Exception as err:
            raise ConfigError(
                f"storage.bucket={storage.bucket!r}: {s3_error(store.uri(''), 'lookup of', err)}"
            ) from err
        return
    try:
        os.makedirs(storage.root, exist_ok=True)
    except OSError as err:
        raise ConfigError(f"storage.root={storage.root!r}: {err}") from err
    if not os.access(storage.root, os.W_OK):
        raise ConfigError(f"storage.root={storage.root!r}: not writable from {os.getcwd()}")


def check_reachable(configs: Iterable[PretrainConfig]) -> None:
    """The token files (`check_token_files`) and the checkpoint storage (`check_storage`) of
    each of `configs` (the sweep's base config and those of its space's extreme values), each
    distinct one once."""
    checked: list[DataConfig | StorageConfig] = []
    for config in configs:
        if isinstance(config.data, DataConfig) and config.data not in checked:
            check_token_files(config.data)
            checked.append(config.data)
        if config.checkpoint.enabled and config.storage not in checked:
            check_storage(config.storage)
            checked.append(config.storage)
