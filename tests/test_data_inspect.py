"""Exact resumption: a step's samples depend only on (config, seed, step), and inspect_batch
shows exactly what the training loader yields."""

import os
import subprocess
import sys

import numpy as np
import pytest

from neoray.data.inspect import batch_samples, format_batch
from neoray.data.loader import BatchSchedule, iter_micro_batches, sample_indices, train_mixture
from neoray.tokenizer.load import load_tokenizer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCHEDULE = BatchSchedule(
    micro_batch_size=2, grad_accum_steps=2, data_parallel_size=2, train_steps=40
)


def test_ranks_and_micro_steps_partition_each_global_batch():
    for step in (0, 1, 39):
        indices = np.concatenate([
            sample_indices(SCHEDULE, step, m, r)
            for m in range(SCHEDULE.grad_accum_steps) for r in range(SCHEDULE.data_parallel_size)
        ])  # fmt: skip
        g = SCHEDULE.global_batch_size
        assert sorted(indices.tolist()) == list(range(step * g, (step + 1) * g))
    with pytest.raises(ValueError, match="step 40"):
        sample_indices(SCHEDULE, 40, 0, 0)


def test_resumed_loader_and_inspect_batch_agree_with_a_full_run(demo_data):
    dataset = train_mixture(demo_data, SCHEDULE)
    tokenizer = load_tokenizer(demo_data.tokenizer)
    step = 17
    shown = batch_samples(dataset, tokenizer, SCHEDULE, step)
    assert len(shown) == SCHEDULE.global_batch_size
    for rank in range(SCHEDULE.data_parallel_size):
        from_start = [b for s, _, b in iter_micro_batches(dataset, SCHEDULE, rank) if s == step]
        resumed = [b for s, _, b in iter_micro_batches(dataset, SCHEDULE, rank, start_step=step)]
        resumed = resumed[: SCHEDULE.grad_accum_steps]
        assert len(from_start) == len(resumed) == SCHEDULE.grad_accum_steps
        for micro_step, (a, b) in enumerate(zip(from_start, resumed, strict=True)):
            assert a.shape == (2, demo_data.seq_len + 1) and a.dtype.is_floating_point is False
            assert a.equal(b)
            mine = [s for s in shown if s.rank == rank and s.micro_step == micro_step]
            assert [s.text for s in mine] == [tokenizer.decode(row.tolist()) for row in a]
            assert all(
                np.array_equal(s.tokens, row.numpy()) for s, row in zip(mine, a, strict=True)
            )
    # A freshly built dataset (same config and seed) serves the same step.
    again = batch_samples(train_mixture(demo_data, SCHEDULE), tokenizer, SCHEDULE, step)
    assert [s.text for s in again] == [s.text for s in shown]
    other = batch_samples(dataset, tokenizer, SCHEDULE, step + 1)
    assert [s.text for s in other] != [s.text for s in shown]


def test_extending_a_run_keeps_the_batches_of_its_planned_steps(demo_data):
    """Steps 0..N-1 of a run planned for N steps get the batches they would get in a run of
    2N (or 3N + 1): a resumed run given more steps continues the same order."""
    short = train_mixture(demo_data, SCHEDULE)
    for train_steps in (2 * SCHEDULE.train_steps, 3 * SCHEDULE.train_steps + 1):
        longer = BatchSchedule(
            micro_batch_size=2, grad_accum_steps=2, data_parallel_size=2, train_steps=train_steps
        )
        extended = train_mixture(demo_data, longer)
        for rank in range(SCHEDULE.data_parallel_size):
            planned = list(iter_micro_batches(short, SCHEDULE, rank))
            continued = list(iter_micro_batches(extended, longer, rank))[: len(planned)]
            for (step, micro, a), (step2, micro2, b) in zip(planned, continued, strict=True):
                assert (step, micro) == (step2, micro2) and a.equal(b), (train_steps, step)


def test_inspect_batch_job_prints_the_batch(demo_data, tmp_path):
    args = [
        "step=17", f"data.root={demo_data.root}", "batch.micro_batch_size=2",
        "batch.grad_accum_steps=2", "batch.data_parallel_size=2", "batch.train_steps=40",
        f"hydra.run.dir={tmp_path}/hydra",
    ]  # fmt: skip
    result = subprocess.run(
        [sys.executable, "jobs/inspect_batch.py", *args],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    dataset = train_mixture(demo_data, SCHEDULE)
    expected = format_batch(
        17, batch_samples(dataset, load_tokenizer(demo_data.tokenizer), SCHEDULE, 17)
    )
    assert result.stdout.rstrip("\n") == expected
    assert "rank 1 micro-step 1" in result.stdout
