"""Pretraining: config, DeepSpeed engine, LR schedule, metrics, the per-worker loop and the plan.

`loop.pretrain(config)` is the per-worker function any launcher runs; `job.run_pretrain` is
what `jobs/pretrain.py` calls.
"""
