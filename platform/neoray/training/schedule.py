"""Learning rate: linear warmup, then cosine decay to a floor (GPT-NeoX's `cosine` schedule)."""

from __future__ import annotations

import math

from neoray.training.config import OptimConfig


def learning_rate(step: int, optim: OptimConfig, train_steps: int) -> float:
    """The learning rate of optimizer step `step` (0-based)."""
    decay_steps = optim.decay_steps or train_steps
    warmup_steps = int(optim.warmup * decay_steps)
    if step < warmup_steps:
        return optim.lr * (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, decay_steps - warmup_steps))
    return optim.min_lr + (optim.lr - optim.min_lr) * 0.5 * (1 + math.cos(math.pi * progress))
