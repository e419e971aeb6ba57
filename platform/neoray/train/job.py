"""`jobs/pretrain.py`: validate the config, then print the plan or train."""

from __future__ import annotations

import os
import socket
from typing import Any

from neoray.config import ConfigError
from neoray.train.config import pretrain_config

LAUNCHERS = ("torchrun",)


def _single_process_environment() -> None:
    """Let one process started without a launcher form its own process group."""
    if "WORLD_SIZE" in os.environ:
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(
        RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )


def run_pretrain(cfg: Any) -> None:
    config = pretrain_config(cfg)  # validates before any process group or tensor exists
    if cfg.dry_run:
        from neoray.train.plan import format_plan

        print(format_plan(config, cfg.plan.tflops, cfg.plan.peak_tflops))
        return
    if cfg.launcher not in LAUNCHERS:
        raise ConfigError(f"launcher={cfg.launcher!r}: choose one of {', '.join(LAUNCHERS)}")
    _single_process_environment()
    from neoray.train.loop import pretrain

    pretrain(config)
