"""neoray: train and evaluate GPT-NeoX-style language models, orchestrated by Ray."""

from pathlib import Path

__version__ = "0.1.0"

# The Hydra configs (presets, suites, layouts): `conf/` of the repository, shipped in the wheel as
# package data (`neoray/conf` links to it in a checkout), so an installed neoray finds them too.
CONF_DIR = Path(__file__).resolve().parent / "conf"
