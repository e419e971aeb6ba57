"""Checks that muP does what it is for, on tiny models in one process (plain PyTorch, no
DeepSpeed), cheap enough for the test suite and `bench/mup_coord_check.py`.

- The coordinate check (Tensor Programs V, section 4): the typical size of each layer's
  activations (mean |x|) after a few Adam steps, at several widths. Under muP it stays flat as
  the width grows; under the standard parametrization updates of a fixed learning rate grow
  the activations with the width.
- Learning-rate transfer: the loss after a short run over a grid of learning rates at two
  widths. Under muP the best learning rate of the narrow model is (near) that of the wide one.

The model, optimizer setup (parameter groups, muP's per-group lr) and schedule are the
training engine's; the data is a fixed random first-order Markov chain, which a tiny model
learns measurably in a few dozen steps (uniform random tokens teach nothing).
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch

from neoray.model.gpt_neox import GPTNeoX, NeoXConfig, init_weights
from neoray.training.config import OptimConfig
from neoray.training.engine import adamw
from neoray.training.schedule import learning_rate

VOCAB, SEQ_LEN, BATCH = 256, 32, 8
# What the coordinate check measures: the embedding, each layer's attention and MLP outputs
# (before the residual sum), each layer's output, and the logits.
PROBES = ("embedding", "attention", "mlp", "layer", "logits")


def tiny_config(
    width: int, parametrization: str, base_width: int, layers: int = 2, heads: int = 4
) -> NeoXConfig:
    """A tiny model of hidden size `width` (a fixed head count: the head dimension grows)."""
    return NeoXConfig(
        vocab_size=VOCAB,
        vocab_multiple=1,
        num_layers=layers,
        hidden_size=width,
        num_heads=heads,
        max_seq_len=SEQ_LEN,
        parametrization=parametrization,
        mup_base_width=base_width if parametrization == "mup" else None,
    )


def markov_batches(seed: int, branching: int = 4) -> Iterator[torch.Tensor]:
    """Endless (BATCH, SEQ_LEN + 1) token batches of a random Markov chain in which each token
    is followed by one of `branching` tokens (loss floor ln(branching), start ln(VOCAB))."""
    generator = torch.Generator().manual_seed(seed)
    successors = torch.randint(0, VOCAB, (VOCAB, branching), generator=generator)
    while True:
        tokens = torch.empty(BATCH, SEQ_LEN + 1, dtype=torch.long)
        tokens[:, 0] = torch.randint(0, VOCAB, (BATCH,), generator=generator)
        choices = torch.randint(0, branching, (BATCH, SEQ_LEN), generator=generator)
        for t in range(SEQ_LEN):
            tokens[:, t + 1] = successors[tokens[:, t], choices[:, t]]
        yield tokens


def train(
    config: NeoXConfig, optim: OptimConfig, steps: int, seed: int = 0, data_seed: int = 0
) -> tuple[GPTNeoX, list[float]]:
    """A freshly initialised model trained `steps` Adam steps as the engine would (same
    parameter groups, schedule and clipping); returns it and its per-step losses."""
    model = GPTNeoX(config)
    init_weights(model, config, torch.Generator().manual_seed(seed))
    optimizer = adamw(model, optim, config.width_mult)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: learning_rate(step, optim, steps) / optim.lr
    )
    batches = markov_batches(data_seed)
    losses = []
    for _ in range(steps):
        tokens = next(batches)
        optimizer.zero_grad()
        loss = model(tokens[:, :-1], tokens[:, 1:])
        loss.backward()
        if optim.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), optim.grad_clip)
        optimizer.step()
        scheduler.step()
        losses.append(loss.item())
    return model, losses


@torch.no_grad()
def activation_sizes(model: GPTNeoX, tokens: torch.Tensor) -> dict[str, float]:
    """Mean |x| of each probe on `tokens`, averaged over the layers for per-layer probes."""
    sums: dict[str, list[float]] = {name: [] for name in PROBES}

    def record(name: str):
        return lambda module, args, out: sums[name].append(out.abs().mean().item())

    hooks = [model.embed_in.register_forward_hook(record("embedding"))]
    for layer in model.layers:
        hooks += [
            layer.attention.register_forward_hook(record("attention")),
            layer.mlp.register_forward_hook(record("mlp")),
            layer.register_forward_hook(record("layer")),
        ]
    try:
        sums["logits"].append(model(tokens).abs().mean().item())
    finally:
        for hook in hooks:
            hook.remove()
    return {name: sum(values) / len(values) for name, values in sums.items()}


def coordinate_check(
    parametrization: str, widths: list[int], steps: int = 4, lr: float = 1e-2, seeds: int = 2
) -> dict[str, dict[int, float]]:
    """probe -> width -> mean |x| after `steps` Adam steps at a constant `lr`, averaged over
    `seeds` initialisations; the narrowest width is muP's base width."""
    optim = OptimConfig(lr=lr, min_lr=lr, warmup=0.0, weight_decay=0.0, grad_clip=0.0)
    tokens = next(markov_batches(seed=12345))[:, :-1]
    sizes: dict[str, dict[int, float]] = {name: {} for name in PROBES}
    for width in widths:
        config = tiny_config(width, parametrization, base_width=min(widths))
        runs = [
            activation_sizes(train(config, optim, steps, seed)[0], tokens) for seed in range(seeds)
        ]
        for name in PROBES:
            sizes[name][width] = sum(run[name] for run in runs) / seeds
    return sizes


def growth(sizes: dict[int, float]) -> float:
    """The slope of log(mean |x|) against log(width), fitted by least squares: 0 is flat,
    1 is proportional to the width."""
    xs = [math.log(w) for w in sizes]
    ys = [math.log(v) for v in sizes.values()]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sum(
        (x - mx) ** 2 for x in xs
    )


def lr_grid_losses(
    parametrization: str, width: int, base_width: int, lrs: list[float], steps: int = 30
) -> dict[float, float]:
    """lr -> mean training loss over the last quarter of a `steps`-step run (warmup, cosine)."""
    config = tiny_config(width, parametrization, base_width)
    losses = {}
    for lr in lrs:
        optim = OptimConfig(lr=lr, min_lr=lr / 10, warmup=0.1, weight_decay=0.0)
        tail = train(config, optim, steps)[1][-max(1, steps // 4) :]
        losses[lr] = sum(tail) / len(tail) if all(map(math.isfinite, tail)) else math.inf
    return losses
