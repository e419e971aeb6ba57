"""Timing two implementations of the same work against each other, fairly, in one process.

Both sides run in the same process on the same threads, alternating round by round (and
swapping which goes first each round), so drift in clock speed, caches or other load on the
machine affects both alike. Warmup calls are not timed (allocator, thread pools, lazy init),
and the median over rounds ignores the occasional outlier.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable


def time_call(fn: Callable[[], object]) -> float:
    """Seconds one call of `fn` takes."""
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def compare(
    name_a: str,
    fn_a: Callable[[], object],
    name_b: str,
    fn_b: Callable[[], object],
    *,
    rounds: int,
    warmup: int,
    units_per_call: float,
    unit: str = "tokens/s",
    goal: float | None = None,
) -> float:
    """Time `fn_a` against `fn_b`, print a table and return the throughput ratio a/b.

    Each call does `units_per_call` units of work (tokens, samples); a round times one call of
    each side. The last line printed is `ratio <a>/<b>: X.XXx`, with the goal when given.
    """
    for _ in range(warmup):
        fn_a()
        fn_b()
    times: dict[str, list[float]] = {name_a: [], name_b: []}
    sides = [(name_a, fn_a), (name_b, fn_b)]
    for round_index in range(rounds):
        for name, fn in sides if round_index % 2 == 0 else reversed(sides):
            times[name].append(time_call(fn))

    print(f"{'':8} {'median s':>10} {'min s':>10} {'max s':>10} {unit:>14}")
    for name, seconds in times.items():
        median = statistics.median(seconds)
        rate = units_per_call / median
        print(f"{name:8} {median:10.4f} {min(seconds):10.4f} {max(seconds):10.4f} {rate:14.1f}")
    ratio = statistics.median(times[name_b]) / statistics.median(times[name_a])
    target = f" (goal >= {goal:.2f}x)" if goal is not None else ""
    print(f"ratio {name_a}/{name_b}: {ratio:.2f}x{target}")
    return ratio


def one_process_group(port: int) -> None:
    """Make this process rank 0 of a gloo process group of one, as DeepSpeed's engine wants."""
    from neoray.training.engine import init_distributed

    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(port))
    init_distributed("gloo")


def decoding_pair(preset: str):
    """Our `GPTNeoX` and transformers' `GPTNeoXForCausalLM` of `preset` on the same random
    weights, for inference. The vocab is the padded one: no padding ids to mask, so both sides
    do the same work."""
    import torch

    from neoray.model import GPTNeoX
    from neoray.model.hf import to_transformers
    from neoray.model.presets import load_preset

    torch.manual_seed(0)
    config = load_preset(preset)
    config.vocab_size = config.padded_vocab_size
    ours = GPTNeoX(config).eval()
    return ours, to_transformers(ours).eval()
