"""neoray: train and evaluate GPT-NeoX-style language models, orchestrated by Ray."""

__version__ = "0.1.0"
