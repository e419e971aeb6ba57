"""Text continuation with a KV cache: greedy or sampled, batched with left padding.

Prompts of different lengths are left-padded so that every row's next token sits in the
last column; each row gets its own rotary positions (padding does not shift them) and an
attention mask that hides its padding. Keys and values live in a preallocated `KVCache`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from neoray.model.gpt_neox import GPTNeoX, KVCache


@dataclass
class SamplingConfig:
    """How to pick tokens. temperature 0 is greedy decoding."""

    max_new_tokens: int = 32
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    eos_token_id: int | None = None
    stop: list[list[int]] = field(default_factory=list)  # token sequences that end a row
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.max_new_tokens < 0:
            raise ValueError("sampling.max_new_tokens must be >= 0")
        if self.temperature < 0:
            raise ValueError("sampling.temperature must be >= 0 (0 = greedy)")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError("sampling.top_k must be >= 1, or None to keep every token")
        if self.top_p is not None and not 0.0 < self.top_p <= 1.0:
            raise ValueError("sampling.top_p must be within (0, 1], or None to keep every token")


def pick_next(
    logits: torch.Tensor, sampling: SamplingConfig, generator: torch.Generator | None
) -> torch.Tensor:
    """Next token per row from last-position logits (B, V)."""
    if sampling.temperature == 0.0:
        return logits.argmax(dim=-1)
    logits = logits.float() / sampling.temperature
    if sampling.top_k is not None and sampling.top_k < logits.shape[-1]:
        kth = torch.topk(logits, sampling.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if sampling.top_p is not None and sampling.top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs  # the most likely token is always kept
        drop = torch.zeros_like(probs, dtype=torch.bool).scatter(
            -1, order, mass_before >= sampling.top_p
        )
        logits = logits.masked_fill(drop, float("-inf"))
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator).squeeze(1)


def _ends_with_stop(tokens: list[int], sampling: SamplingConfig) -> int:
    """Length of the stop marker `tokens` ends with (eos or a stop sequence), else 0."""
    if sampling.eos_token_id is not None and tokens and tokens[-1] == sampling.eos_token_id:
        return 1
    for seq in sampling.stop:
        if seq and tokens[-len(seq) :] == list(seq):
            return len(seq)
    return 0


@torch.no_grad()
def generate(
    model: GPTNeoX,
    prompts: Sequence[Sequence[int]],
    sampling: SamplingConfig | None = None,
    pad_token_id: int = 0,
) -> list[list[int]]:
    """Continue each prompt; return each row's new tokens, without the eos/stop marker."""
    sampling = sampling or SamplingConfig()
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("generate: every prompt needs at least one token")
    device = next(model.parameters()).device
    B, width = len(prompts), max(len(p) for p in prompts)
    total = width + sampling.max_new_tokens
    if total > model.config.max_seq_len:
        raise ValueError(
            f"generate: prompt ({width}) + max_new_tokens ({sampling.max_new_tokens}) exceeds "
            f"max_seq_len={model.config.max_seq_len}"
        )
    idx = torch.full((B, width), pad_token_id, dtype=torch.long, device=device)
    real = torch.zeros((B, total), dtype=torch.bool, device=device)  # which cache slots hold tokens
    for row, prompt in enumerate(prompts):
        idx[row, width - len(prompt) :] = torch.as_tensor(prompt, device=device)
        real[row, width - len(prompt) :] = True

    padded = not bool(real[:, :width].all())
    positions = (real[:, :width].cumsum(dim=1) - 1).clamp(min=0) if padded else None
    mask = None
    if padded:  # causal and not padding; each token also sees itself, so no row is empty
        causal = torch.ones(width, width, dtype=torch.bool, device=device).tril()
        mask = (causal & real[:, None, None, :width]) | torch.eye(
            width, dtype=torch.bool, device=device
        )

    dtype = next(model.parameters()).dtype
    cache = KVCache(model.config, B, total, dtype, device)
    generator = None
    if sampling.seed is not None:
        generator = torch.Generator(device=device).manual_seed(sampling.seed)
    was_training = model.training
    model.eval()
    outputs: list[list[int]] = [[] for _ in range(B)]
    done = [False] * B
    logits = model(idx, positions=positions, mask=mask, cache=cache, last_only=True)[:, -1]
    for step in range(sampling.max_new_tokens):
        logits[:, model.config.vocab_size :] = float("-inf")  # never emit vocab padding
        next_tokens = pick_next(logits, sampling, generator)
        for row, token in enumerate(next_tokens.tolist()):
            if not done[row]:
                outputs[row].append(token)
                cut = _ends_with_stop(outputs[row], sampling)
                if cut:
                    del outputs[row][-cut:]
                    done[row] = True
        if all(done) or step == sampling.max_new_tokens - 1:
            break
        slot = width + step
        step_positions = positions[:, -1:] + step + 1 if padded else None
        step_mask = real[:, None, None, : slot + 1] if padded else None
        logits = model(
            next_tokens[:, None],
            positions=step_positions,
            mask=step_mask,
            cache=cache,
            last_only=True,
        )[:, -1]
    model.train(was_training)
    return outputs
