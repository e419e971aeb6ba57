"""Which training precisions the device can run, asked of the accelerator DeepSpeed will use.

DeepSpeed refuses fp16 on a CPU without oneDNN fp16 kernels (AVX-512 FP16 or AMX) deep inside
engine construction, after the process group and the model exist. The same question, asked up
front, turns that into a config error that names the device and a precision it can run.
"""

from __future__ import annotations

import platform
from functools import cache
from pathlib import Path

from neoray.config import ConfigError


@cache
def device_name(device_type: str) -> str:
    """A person-readable name of this machine's device of `device_type` ("cpu" or "cuda")."""
    if device_type == "cuda":
        import torch

        return torch.cuda.get_device_name()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return f"CPU {line.split(':', 1)[1].strip()}"
    return f"CPU {platform.processor() or platform.machine()}"


def supported_precisions() -> list[str]:
    """The precisions DeepSpeed's accelerator on this machine accepts, fp32 first."""
    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator()
    supported = ["fp32"]
    if accelerator.is_bf16_supported():
        supported.append("bf16")
    if accelerator.is_fp16_supported():
        supported.append("fp16")
    return supported


def check_precision(precision: str) -> None:
    """Raise a `ConfigError` when this machine's accelerator cannot train in `precision`."""
    from deepspeed.accelerator import get_accelerator

    supported = supported_precisions()
    if precision in supported:
        return
    device = device_name(get_accelerator().device_name())
    raise ConfigError(
        f"train.precision={precision}: DeepSpeed's {get_accelerator().device_name()} accelerator "
        f"cannot run {precision} on this device ({device}); it supports "
        f"{', '.join(supported)}: set train.precision={supported[-1]}"
    )
