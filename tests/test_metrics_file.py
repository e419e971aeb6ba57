"""`metrics.jsonl` across crashes: a resumed run keeps the rows before its start step, whatever a
crash left at the end of the file."""

import json

from neoray.training.metrics import MetricsFile


def rows(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_a_torn_last_line_does_not_block_the_restart(tmp_path, caplog):
    first = MetricsFile(tmp_path)
    for step in range(5):
        first.write({"step": step, "loss": 5.0 - step})
    first.close()
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "lo')  # the process died in the middle of a write

    resumed = MetricsFile(tmp_path, start_step=4)  # resumed from the step-4 checkpoint
    resumed.write({"step": 4, "loss": 0.5})
    resumed.close()
    assert [(r["step"], r["loss"]) for r in rows(tmp_path / "metrics.jsonl")] == [
        (0, 5.0), (1, 4.0), (2, 3.0), (3, 2.0), (4, 0.5)
    ]  # fmt: skip
    assert "dropped 1 line(s) cut short by a crash" in caplog.text
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.jsonl"]  # no staging file left


def test_a_new_run_starts_an_empty_file(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 0, "loss": 1.0}\n{"ste')
    fresh = MetricsFile(tmp_path)
    fresh.write({"step": 0, "loss": float("nan")})
    fresh.close()
    assert rows(tmp_path / "metrics.jsonl") == [{"step": 0, "loss": None}]
