"""The `neoray` command: look up model presets and plan training runs before launching them."""

from __future__ import annotations

import argparse
import dataclasses

from neoray.model.flops import PEAK_TFLOPS, plan_training
from neoray.model.presets import available_presets, load_preset


def show_presets(_: argparse.Namespace) -> None:
    print(
        f"{'preset':14} {'params (M)':>12} {'layers':>6} {'hidden':>6} {'heads':>5} {'vocab':>6} {'seq':>5}"
    )
    for name in available_presets():
        c = load_preset(name)
        print(
            f"{name:14} {c.num_parameters() / 1e6:12,.1f} {c.num_layers:6} {c.hidden_size:6} "
            f"{c.num_heads:5} {c.padded_vocab_size:6} {c.max_seq_len:5}"
        )


def show_plan(args: argparse.Namespace) -> None:
    config = load_preset(args.preset)
    if args.checkpoint_activations:
        config = dataclasses.replace(config, checkpoint_activations=1)
    seq_len = args.seq_len or config.max_seq_len
    plan = plan_training(
        config,
        tokens_per_step=args.batch * seq_len,
        steps=args.steps,
        num_devices=args.devices,
        hardware_tflops_per_device=args.tflops,
        peak_tflops_per_device=PEAK_TFLOPS[args.device],
        seq_len=seq_len,
    )
    print(f"{args.preset}: {config.num_parameters() / 1e9:.2f} B parameters")
    print(
        f"{args.steps:,} steps x {args.batch:,} sequences x {seq_len} tokens = {plan.tokens / 1e9:,.1f} B tokens"
    )
    print(
        f"{args.devices} x {args.device} at {args.tflops} hardware TFLOPS each: {plan.tokens_per_second:,.0f} tokens/s"
    )
    print(f"training time: {plan.hours:,.0f} hours ({plan.hours / 24:,.1f} days)")
    print(f"MFU {plan.mfu:.1%}, HFU {plan.hfu:.1%} (peak {PEAK_TFLOPS[args.device]} TFLOPS)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="neoray", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("presets", help="list the model presets").set_defaults(func=show_presets)
    plan = commands.add_parser("plan", help="estimate the time and utilization of a training run")
    plan.add_argument("preset", choices=available_presets())
    plan.add_argument("--devices", type=int, default=96)
    plan.add_argument("--device", choices=sorted(PEAK_TFLOPS), default="a100")
    plan.add_argument(
        "--tflops", type=float, default=117.0, help="hardware TFLOPS sustained per device"
    )
    plan.add_argument("--steps", type=int, default=150_000)
    plan.add_argument("--batch", type=int, default=1536, help="global batch, in sequences")
    plan.add_argument("--seq-len", type=int, default=None, help="default: the preset's max_seq_len")
    plan.add_argument(
        "--no-checkpoint-activations",
        dest="checkpoint_activations",
        action="store_false",
        help="count no recomputation (default: every layer recomputed, as in the 20B run)",
    )
    plan.set_defaults(func=show_plan)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
