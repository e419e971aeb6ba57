"""Megatron-style tensor parallelism over `torch.distributed` (gloo on CPU, NCCL on GPUs).

A matmul `y = x @ W.T` is split across the ranks of a tensor-parallel group in two ways:

- column-parallel: each rank holds a slice of W's output rows and computes a slice of y. Its
  input must be the same on every rank, so the backward pass sums the input gradients of all
  ranks (`copy_to_tensor_parallel`: identity forward, all-reduce backward).
- row-parallel: each rank holds a slice of W's input columns, takes the matching slice of x (a
  column-parallel output) and produces a partial y; the full y is the sum over the ranks
  (`reduce_from_tensor_parallel`: all-reduce forward, identity backward).

Weights that are split carry `tensor_model_parallel = True`: DeepSpeed then counts each slice
once in the gradient norm, and the replicated ones (layernorms, row-parallel biases) once per
tensor-parallel group. Weights are created uninitialised: the model initialises them all at
once (`neoray.model.gpt_neox.init_weights`), as the single-process model does.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from neoray.model.loss import IGNORE_INDEX


def _world(group: dist.ProcessGroup | None) -> int:
    return 1 if group is None else dist.get_world_size(group)


def _rank(group: dist.ProcessGroup | None) -> int:
    return 0 if group is None else dist.get_rank(group)


def _all_reduce(tensor: torch.Tensor, group, op=dist.ReduceOp.SUM) -> torch.Tensor:
    if _world(group) > 1:
        dist.all_reduce(tensor, op=op, group=group)
    return tensor


class _CopyToTensorParallel(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        # The incoming gradient may be shared with another branch: reduce a copy.
        return _all_reduce(grad.clone(), ctx.group), None


class _ReduceFromTensorParallel(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:
        return _all_reduce(x.clone(), group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None


def copy_to_tensor_parallel(x: torch.Tensor, group) -> torch.Tensor:
    """Identity forward; all-reduce of the gradient backward (input of column-parallel layers)."""
    return x if _world(group) == 1 else _CopyToTensorParallel.apply(x, group)


def reduce_from_tensor_parallel(x: torch.Tensor, group) -> torch.Tensor:
    """All-reduce forward; identity backward (sums row-parallel partial outputs)."""
    return x if _world(group) == 1 else _ReduceFromTensorParallel.apply(x, group)


def _split(size: int, group, what: str) -> int:
    world = _world(group)
    if size % world:
        raise ValueError(f"{what} ({size}) is not divisible by the tensor-parallel size {world}")
    return size // world


def _mark_split(*params: nn.Parameter) -> None:
    for p in params:
        p.tensor_model_parallel = True


class ColumnParallelLinear(nn.Module):
    """`nn.Linear(in_features, out_features)` holding this rank's slice of the output features."""

    def __init__(self, in_features: int, out_features: int, group, bias: bool = True) -> None:
        super().__init__()
        self.group = group
        local = _split(out_features, group, "out_features")
        self.weight = nn.Parameter(torch.empty(local, in_features))
        self.bias = nn.Parameter(torch.zeros(local)) if bias else None
        _mark_split(*(p for p in (self.weight, self.bias) if p is not None))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(copy_to_tensor_parallel(x, self.group), self.weight, self.bias)


class RowParallelLinear(nn.Module):
    """`nn.Linear(in_features, out_features)` holding this rank's slice of the input features.

    `partial(x)` is this rank's share of `x @ W.T` without the bias: callers that add several
    row-parallel outputs (the parallel residual) sum them first and reduce once.
    """

    def __init__(self, in_features: int, out_features: int, group) -> None:
        super().__init__()
        self.group = group
        local = _split(in_features, group, "in_features")
        self.weight = nn.Parameter(torch.empty(out_features, local))
        self.bias = nn.Parameter(torch.zeros(out_features))  # replicated, added after the sum
        _mark_split(self.weight)

    def partial(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return reduce_from_tensor_parallel(self.partial(x), self.group) + self.bias


class VocabParallelEmbedding(nn.Module):
    """`nn.Embedding` whose rows (the vocab) are split: each rank looks up the tokens it owns
    and contributes zeros for the others; the sum over ranks is the full lookup."""

    def __init__(self, num_embeddings: int, embedding_dim: int, group) -> None:
        super().__init__()
        self.group = group
        local = _split(num_embeddings, group, "num_embeddings")
        self.vocab_start = _rank(group) * local
        self.weight = nn.Parameter(torch.empty(local, embedding_dim))
        _mark_split(self.weight)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        if _world(self.group) == 1:
            return F.embedding(tokens, self.weight)
        local = tokens - self.vocab_start
        outside = (local < 0) | (local >= self.weight.shape[0])
        out = F.embedding(local.masked_fill(outside, 0), self.weight)
        return reduce_from_tensor_parallel(out.masked_fill(outside.unsqueeze(-1), 0.0), self.group)


def _row_losses(logits: torch.Tensor, targets: torch.Tensor, group):
    """Per-row cross-entropy from this rank's vocab slice, and what its gradient needs.

    Softmax needs only three numbers per row from the other ranks: the max (for stability),
    the sum of exponentials and the target's logit (from the rank that owns the target).
    Returns (losses (N,), exp (N, V / tp) in place of the fp32 logits, sum_exp, the targets
    local to this slice, and whether this rank owns each target).
    """
    local_vocab = logits.shape[-1]
    logits = logits.reshape(-1, local_vocab).float()
    targets = targets.reshape(-1)
    row_max = _all_reduce(logits.amax(dim=1), group, dist.ReduceOp.MAX)
    shifted = logits - row_max.unsqueeze(1)

    local_targets = targets - _rank(group) * local_vocab
    owned = (local_targets >= 0) & (local_targets < local_vocab)
    local_targets = local_targets.clamp(0, local_vocab - 1)
    target_logit = shifted.gather(1, local_targets.unsqueeze(1)).squeeze(1) * owned
    _all_reduce(target_logit, group)

    exp = shifted.exp_()
    sum_exp = _all_reduce(exp.sum(dim=1), group)
    return sum_exp.log() - target_logit, exp, sum_exp, local_targets, owned


class _VocabParallelCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy from logits split over the vocab, without gathering them."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor, group) -> torch.Tensor:
        ctx.shape, ctx.dtype = logits.shape, logits.dtype
        losses, exp, sum_exp, local_targets, owned = _row_losses(logits, targets, group)
        valid = targets.reshape(-1) != IGNORE_INDEX
        row_scale = valid / valid.sum().clamp(min=1)  # 1/count, and 0 on ignored rows
        loss = (losses * row_scale).sum()

        softmax = exp.div_(sum_exp.unsqueeze(1))
        ctx.save_for_backward(softmax, local_targets, owned, row_scale)
        return loss

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        softmax, local_targets, owned, row_scale = ctx.saved_tensors
        grad = softmax  # d(loss)/d(logits) = scale * (softmax - onehot(target)), in place
        grad.scatter_add_(1, local_targets.unsqueeze(1), -owned.to(grad.dtype).unsqueeze(1))
        grad.mul_((row_scale * grad_output).unsqueeze(1))
        return grad.to(ctx.dtype).view(ctx.shape), None, None


def vocab_parallel_cross_entropy(
    logits: torch.Tensor, targets: torch.Tensor, group
) -> torch.Tensor:
    """Mean next-token loss from this rank's vocab slice of the logits (..., V / tp).

    `targets` (...) holds full-vocab token ids; -100 is ignored. The gradient comes back in
    the logits' dtype, computed in fp32.
    """
    return _VocabParallelCrossEntropy.apply(logits, targets, group)


@torch.no_grad()
def vocab_parallel_sample_losses(
    logits: torch.Tensor, targets: torch.Tensor, group
) -> torch.Tensor:
    """Each sample's mean next-token loss (B,) from logits (B, T, V / tp): for evaluation,
    which breaks the loss down by where each sample comes from. -100 targets are ignored."""
    losses = _row_losses(logits, targets, group)[0].view(targets.shape)
    valid = targets != IGNORE_INDEX
    return (losses * valid).sum(dim=1) / valid.sum(dim=1).clamp(min=1)
