"""Model FLOPs utilization of the real pretrain job on one device, eager and compiled.

Runs `jobs/pretrain.py` (one process, synthetic tokens, the full engine: pipeline module,
ZeRO-1, AdamW, clipping) once per variant, reads each run's `metrics.jsonl` and reports the
median over the steps after warm-up. The goal is the MFU of the compiled run; the ratio
compiled/eager shows what fusing the elementwise work around the matmuls buys.

    python bench/mfu.py                      # pythia_1_4b, bf16, 2048 tokens: a GPU run
    DS_ACCELERATOR=cpu python bench/mfu.py --preset tiny --precision fp32 --seq 128 \\
        --micro 2 --accum 1 --steps 4        # the same path on a CPU, for a smoke test
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GOAL = 0.50


def run_variant(args: argparse.Namespace, compile_layers: bool, run_dir: Path) -> list[dict]:
    """Train `args.steps` steps with the pretrain job; its metrics rows."""
    command = [
        sys.executable,
        str(ROOT / "jobs" / "pretrain.py"),
        "launcher=torchrun",
        f"model={args.preset}",
        "parallel=single",
        f"parallel.micro_batch_size={args.micro}",
        f"parallel.grad_accum_steps={args.accum}",
        f"data.seq_len={args.seq}",
        f"train.precision={args.precision}",
        f"train.steps={args.steps}",
        f"train.compile={str(compile_layers).lower()}",
        f"model.checkpoint_activations={args.checkpoint_activations}",
        f"run_dir={run_dir}",
        "checkpoint.enabled=false",
        "tracking.enabled=false",
        *args.overrides,
    ]
    subprocess.run(command, check=True, cwd=ROOT)
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def summarize(rows: list[dict], warmup: int) -> dict[str, float]:
    timed = rows[warmup:] or rows[-1:]
    return {
        key: statistics.median(row[key] for row in timed)
        for key in ("mfu", "hfu", "tokens_per_s", "model_tflops_per_device", "peak_memory_gib")
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="pythia_1_4b")
    parser.add_argument("--precision", default="bf16")
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--micro", type=int, default=4, help="micro-batch size")
    parser.add_argument("--accum", type=int, default=8, help="gradient accumulation steps")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=3, help="steps left out of the median")
    parser.add_argument("--checkpoint-activations", type=int, default=0)
    parser.add_argument("--variants", default="eager,compiled")
    parser.add_argument("overrides", nargs="*", help="more Hydra overrides for both runs")
    args = parser.parse_args()

    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for variant in args.variants.split(","):
            rows = run_variant(args, variant == "compiled", Path(tmp) / variant)
            results[variant] = summarize(rows, args.warmup)

    print(
        f"\n{args.preset}, {args.precision}, micro-batch {args.micro} x {args.seq} tokens, "
        f"{args.accum} accumulation steps, median of steps {args.warmup}..{args.steps - 1}"
    )
    print(f"{'':10} {'MFU':>7} {'HFU':>7} {'tokens/s':>10} {'TFLOPS':>8} {'peak GiB':>9}")
    for variant, r in results.items():
        print(
            f"{variant:10} {r['mfu']:7.1%} {r['hfu']:7.1%} {r['tokens_per_s']:10.0f} "
            f"{r['model_tflops_per_device']:8.1f} {r['peak_memory_gib']:9.1f}"
        )
    if {"eager", "compiled"} <= results.keys():
        ratio = results["compiled"]["tokens_per_s"] / results["eager"]["tokens_per_s"]
        print(f"ratio compiled/eager: {ratio:.2f}x")
    best = max(r["mfu"] for r in results.values())
    print(f"MFU: {best:.1%} (goal >= {GOAL:.0%})")


if __name__ == "__main__":
    main()
