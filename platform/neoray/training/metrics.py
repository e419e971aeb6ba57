"""Per-step training metrics: throughput, FLOPs utilization, memory, written as JSON lines.

MFU divides the model FLOPs achieved by the peak of the devices (see `neoray.model.flops`).
GPU peaks come from data sheets; a CPU has none, so its peak is measured once by timing large
fp32 matmuls (the best any kernel here will do) and shared by all processes of the run.
"""

from __future__ import annotations

import json
import logging
import math
import resource
import time
from pathlib import Path

import torch

from neoray.model.flops import PEAK_TFLOPS, hardware_flops_per_token, model_flops_per_token
from neoray.model.gpt_neox import NeoXConfig
from neoray.storage import publish_file

log = logging.getLogger(__name__)


def matmul_probe_tflops(size: int = 1024, repeats: int = 8) -> float:
    """Sustained fp32 matmul TFLOPS of this CPU process (best of `repeats` timed products)."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b  # warm up thread pool and caches
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best / 1e12


def device_peak_tflops(device: torch.device) -> float | None:
    """The data-sheet peak of a known GPU (bf16/fp16 dense), None if unknown or on a CPU."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device).lower()
    return next((peak for key, peak in PEAK_TFLOPS.items() if key in name), None)


def peak_memory_gib(device: torch.device) -> float:
    """Peak memory of this process: allocated GPU memory, or the CPU resident set size."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


class StepMetrics:
    """Turns (loss, time taken, ...) of a step into the metrics row written to metrics.jsonl."""

    def __init__(
        self, model: NeoXConfig, seq_len: int, tokens_per_step: int, devices: int, peak: float
    ) -> None:
        self.tokens_per_step = tokens_per_step
        self.devices = devices
        self.peak_tflops = peak
        self.model_flops = model_flops_per_token(model, seq_len)
        self.hardware_flops = hardware_flops_per_token(model, seq_len)

    def row(self, step: int, seconds: float, **values: float) -> dict:
        tokens_per_s = self.tokens_per_step / seconds
        model_tflops = self.model_flops * tokens_per_s / self.devices / 1e12
        hardware_tflops = self.hardware_flops * tokens_per_s / self.devices / 1e12
        return {
            "step": step,
            "tokens": (step + 1) * self.tokens_per_step,  # trained on once this step is done
            **values,
            "step_time_s": seconds,
            "tokens_per_s": tokens_per_s,
            "model_tflops_per_device": model_tflops,
            "hardware_tflops_per_device": hardware_tflops,
            "mfu": model_tflops / self.peak_tflops,
            "hfu": hardware_tflops / self.peak_tflops,
        }


class MetricsFile:
    """Appends one JSON object per step to `<run_dir>/metrics.jsonl`, flushed each step.

    A NaN or infinite value (a diverged loss, an overflowed gradient norm) is written as null:
    JSON has no such numbers, and strict readers reject Python's `NaN`/`Infinity` spellings.
    """

    def __init__(self, run_dir: str | Path, start_step: int = 0) -> None:
        """A run resumed at `start_step` keeps the rows of the steps before it (a crashed run
        may have written rows past its last checkpoint: those steps are trained again). A line
        a crash cut short is dropped with a warning; the kept rows replace the file by rename,
        so a crash while resuming loses nothing either."""
        self.path = Path(run_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.kept: list[dict] = []  # the rows of the steps before start_step
        if start_step > 0 and self.path.exists():
            kept, torn = [], 0
            for line in self.path.read_text(errors="replace").splitlines():
                try:
                    row = json.loads(line)
                except ValueError:
                    torn += bool(line.strip())
                    continue
                if row["step"] < start_step:
                    kept.append(line + "\n")
                    self.kept.append(row)
            if torn:
                log.warning("%s: dropped %d line(s) cut short by a crash", self.path, torn)
            publish_file(self.path, lambda out: out.write("".join(kept).encode()))
            self._file = self.path.open("a")
        else:
            self._file = self.path.open("w")

    def write(self, row: dict) -> None:
        finite = {
            key: None if isinstance(value, float) and not math.isfinite(value) else value
            for key, value in row.items()
        }
        self._file.write(json.dumps(finite, allow_nan=False) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()
