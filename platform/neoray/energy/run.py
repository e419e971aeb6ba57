"""A training run's energy and CO2, read every `energy.interval` steps.

Every rank takes part in each reading (one all-reduce): what each meter counted since the last
reading is added up over the run's processes, so rank 0 logs the whole run, all nodes, with
the number of meters and whether any of them estimated.
"""

from __future__ import annotations

import os
import time

import torch
import torch.distributed as dist

from neoray.energy.grid import EnergyConfig, co2_kg
from neoray.energy.meter import ESTIMATED, process_meter

JOULES_PER_KWH = 3.6e6


class RunEnergy:
    def __init__(self, config: EnergyConfig, device: torch.device, start_kwh: float = 0.0) -> None:
        """`start_kwh`: what earlier attempts of a resumed run used (rank 0's metrics)."""
        self.config = config
        self.device = device
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        self.meter, self.kind = process_meter(device, local_rank, config.cpu_watts)
        self.kwh = start_kwh
        self._last_joules = 0.0
        self._started = self._last_time = time.monotonic()
        self._joules = 0.0  # all processes, since this attempt started

    def read(self) -> dict[str, float]:
        """`energy/kwh` (the run so far), `energy/co2_kg`, `energy/power_w` (all processes,
        since the last reading), `energy/average_power_w` (since this attempt started),
        `energy/meters` and `energy/estimated` (1 if any meter estimates). A collective: every
        rank calls it at the same step."""
        joules = self.meter.read() if self.meter is not None else 0.0
        local = [
            joules - self._last_joules,
            float(self.meter is not None),
            float(self.kind == ESTIMATED),
        ]
        self._last_joules = joules
        totals = torch.tensor(local, dtype=torch.float64, device=self.device)
        dist.all_reduce(totals)
        interval, meters, estimated = totals.tolist()
        now = time.monotonic()
        power = interval / max(now - self._last_time, 1e-9)
        self._last_time = now
        self._joules += interval
        self.kwh += interval / JOULES_PER_KWH
        return {
            "energy/kwh": self.kwh,
            "energy/co2_kg": co2_kg(self.kwh, self.config),
            "energy/power_w": power,
            "energy/average_power_w": self._joules / max(now - self._started, 1e-9),
            "energy/meters": meters,
            "energy/estimated": float(estimated > 0),
        }
