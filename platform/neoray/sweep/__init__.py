"""Hyperparameter sweeps: Ray Tune trials, each a normal pretraining run on Ray Train.

`config` reads the `sweep` section, `space` turns its search space into Tune's distributions
and trial overrides, `trial` is the per-trial driver function, `outcome` reads Tune's results
(status, best trial, plot), and `run` puts them together for `jobs/sweep.py`.
"""
