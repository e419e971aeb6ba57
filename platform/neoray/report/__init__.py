"""The run report: one self-contained HTML page per training run (`jobs/report.py`).

`data` gathers what a run left (its metrics.jsonl, its MLflow run: config, checkpoints,
evaluations), `figures` draws it with matplotlib, `page` lays it out as HTML.
"""
