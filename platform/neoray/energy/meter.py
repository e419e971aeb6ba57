"""Reading energy counters: NVIDIA GPUs through NVML, CPUs through RAPL, or an estimate.

A GPU is read by the rank that drives it (its NVML total-energy counter, matched by UUID), so
each GPU of a node counts once however many ranks the node has. A CPU-only node is read once,
by its local rank 0: RAPL's package counters where `/sys/class/powercap` is readable, else an
estimate, the cores' utilisation times `energy.cpu_watts` per core, labelled as an estimate
wherever it appears.
"""

from __future__ import annotations

import glob
import os
import re
import time

import torch

POWERCAP = "/sys/class/powercap"
MEASURED, ESTIMATED = "measured", "estimated"


class RaplCounters:
    """The package domains of RAPL (`intel-rapl:<n>`, on AMD too; sub-domains such as the
    cores are part of their package and not added again), their wrap-arounds included."""

    def __init__(self, root: str = POWERCAP) -> None:
        self.domains = sorted(
            path
            for path in glob.glob(os.path.join(root, "intel-rapl:*"))
            if re.fullmatch(r"intel-rapl:\d+", os.path.basename(path))
        )
        self._last = [self._read(d, "energy_uj") for d in self.domains]
        self._range = [self._read(d, "max_energy_range_uj") for d in self.domains]
        self.joules = 0.0

    @staticmethod
    def readable(root: str = POWERCAP) -> bool:
        try:
            return bool(RaplCounters(root).domains)
        except OSError:  # present but root-only, as on most distributions
            return False

    @staticmethod
    def _read(domain: str, name: str) -> int:
        with open(os.path.join(domain, name)) as f:
            return int(f.read())

    def read(self) -> float:
        """Joules since this object was created."""
        for i, domain in enumerate(self.domains):
            now = self._read(domain, "energy_uj")
            step = now - self._last[i]
            if step < 0:  # the counter wrapped around
                step += self._range[i]
            self.joules += step / 1e6
            self._last[i] = now
        return self.joules


class CpuEstimate:
    """Energy of this node's cores, estimated: utilisation x cores x `watts_per_core`."""

    def __init__(self, watts_per_core: float) -> None:
        import psutil

        self.psutil = psutil
        self.watts = watts_per_core * (psutil.cpu_count() or 1)
        psutil.cpu_percent(interval=None)  # the first call starts the measurement
        self._last = time.monotonic()
        self.joules = 0.0

    def read(self) -> float:
        now = time.monotonic()
        utilisation = self.psutil.cpu_percent(interval=None) / 100
        self.joules += utilisation * self.watts * (now - self._last)
        self._last = now
        return self.joules


class GpuCounter:
    """The NVML total-energy counter of this process's GPU (millijoules since the driver
    loaded), from the moment this object was created."""

    def __init__(self, device: torch.device) -> None:
        import pynvml

        pynvml.nvmlInit()
        self.nvml = pynvml
        uuid = str(torch.cuda.get_device_properties(device).uuid)
        handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
        self.handle = next(h for h in handles if uuid in str(pynvml.nvmlDeviceGetUUID(h)))
        self._start = self._millijoules()

    def _millijoules(self) -> int:
        return self.nvml.nvmlDeviceGetTotalEnergyConsumption(self.handle)

    def read(self) -> float:
        return (self._millijoules() - self._start) / 1e3


def process_meter(device: torch.device, local_rank: int, cpu_watts: float):
    """What this process measures, and how: its GPU, else its node's CPUs (local rank 0
    only), else nothing (None)."""
    if device.type == "cuda":
        return GpuCounter(device), MEASURED
    if local_rank != 0:
        return None, None
    if RaplCounters.readable():
        return RaplCounters(), MEASURED
    return CpuEstimate(cpu_watts), ESTIMATED
