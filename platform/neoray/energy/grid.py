"""From energy to CO2: a grid's carbon intensity (a generation mix or a plain figure) and the
data centre's PUE.

The GPT-NeoX-20B paper's mix (coal 30.4% at 0.95 t/MWh, gas 31.3% at 0.6078 t/MWh, the rest
hydro, nuclear, solar, wind and other at zero) is the default. It gives 0.479 t/MWh, so the
paper's 66.24 MWh comes to 31.7 t of CO2: the 35 t of the paper's slides does not follow from
the mix it states, and the platform reports what the mix gives.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from neoray.config import ConfigError

# kg CO2 per kWh (= t per MWh) of each source, as the GPT-NeoX-20B paper counts them.
SOURCE_INTENSITY = {
    "coal": 0.95,
    "gas": 0.6078,
    "oil": 0.89,
    "hydro": 0.0,
    "nuclear": 0.0,
    "solar": 0.0,
    "wind": 0.0,
    "other": 0.0,
}
PAPER_MIX = {
    "coal": 0.304,
    "gas": 0.313,
    "hydro": 0.013,
    "nuclear": 0.174,
    "solar": 0.003,
    "wind": 0.181,
    "other": 0.013,
}
# Board power of a device at full load (W), for plans and for estimates where nothing measures.
DEVICE_WATTS = {"a100": 400.0, "h100": 700.0, "h200": 700.0}


@dataclass
class EnergyConfig:
    """`energy` config section: how a run's energy is measured and turned into CO2."""

    enabled: bool = True
    grid_mix: dict[str, float] = field(default_factory=lambda: dict(PAPER_MIX))  # shares
    grid_g_per_kwh: float | None = None  # a plain intensity; when set, the mix is not used
    pue: float = 1.0  # facility energy / device energy
    interval: int = 10  # steps between readings (each is a collective over the ranks)
    cpu_watts: float = 10.0  # per core at full load: the estimate where no counter is readable

    def __post_init__(self) -> None:
        if self.pue < 1:
            raise ConfigError(f"energy.pue={self.pue}: a PUE is at least 1.0 (1.1 is typical)")
        if self.interval < 1:
            raise ConfigError("energy.interval must be at least 1 step")
        if self.cpu_watts < 0:
            raise ConfigError("energy.cpu_watts must be >= 0")
        if self.grid_g_per_kwh is not None and self.grid_g_per_kwh < 0:
            raise ConfigError(f"energy.grid_g_per_kwh={self.grid_g_per_kwh} must be >= 0")
        mix_intensity(self.grid_mix)  # refuse a bad mix now, not at the first reading

    @property
    def kg_per_kwh(self) -> float:
        """kg CO2 per kWh drawn from the grid (= t per MWh)."""
        if self.grid_g_per_kwh is not None:
            return self.grid_g_per_kwh / 1000
        return mix_intensity(self.grid_mix)


def mix_intensity(mix: dict[str, float]) -> float:
    """kg CO2 per kWh of a generation mix: each source's share times its intensity."""
    unknown = sorted(set(mix) - set(SOURCE_INTENSITY))
    if unknown:
        raise ConfigError(
            f"energy.grid_mix: unknown source(s) {', '.join(unknown)}; known: "
            f"{', '.join(SOURCE_INTENSITY)} (or set energy.grid_g_per_kwh)"
        )
    total = sum(mix.values())
    if abs(total - 1) > 0.01 or any(share < 0 for share in mix.values()):
        raise ConfigError(f"energy.grid_mix: the shares add up to {total:.3f}, not 1")
    # As stated, not renormalised: published mixes are rounded (the paper's adds up to 1.001).
    return sum(share * SOURCE_INTENSITY[source] for source, share in mix.items())


def co2_kg(kwh: float, config: EnergyConfig) -> float:
    """CO2 of `kwh` of device energy, through the facility's PUE and the grid's intensity."""
    return kwh * config.pue * config.kg_per_kwh


def projected_kwh(devices: int, watts_per_device: float, hours: float, pue: float = 1.0) -> float:
    """Facility energy of `devices` drawing `watts_per_device` for `hours` (a plan)."""
    return devices * watts_per_device * hours * pue / 1000
