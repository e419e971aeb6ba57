"""The `neoray` command: look up model presets, plan training runs, run jobs on Ray
(submit / status / logs / stop) and start or stop the local stack (up / down)."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from neoray.config import ConfigError
from neoray.energy.grid import DEVICE_WATTS, EnergyConfig, projected_kwh
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


# What `neoray plan <preset>` assumes for an option not given: the GPT-NeoX-20B run's figures.
PRESET_PLAN = {
    "devices": 96,
    "device": "a100",
    "tflops": 117.0,
    "steps": 150_000,
    "batch": 1536,
    "seq_len": None,  # the preset's max_seq_len
    "checkpoint_activations": True,
    "watts": None,  # the device's board power
    "pue": 1.0,
    "grid_g_per_kwh": None,  # the 20B paper's grid mix
    "sweep": None,  # no sweep's share shown
}


def show_plan(args: argparse.Namespace) -> None:
    """`neoray plan <preset> [options]`: a preset at the scale the options give; `neoray plan
    <overrides>`: the pretrain dry run's plan of conf/pretrain.yaml with Hydra overrides (a
    recipe and a layout: recipe=pythia_1_4b parallel.dp=64 parallel.micro_batch_size=16)."""
    given = {name: vars(args)[name] for name in PRESET_PLAN if vars(args)[name] is not None}
    overrides = [arg for arg in args.target if "=" in arg]
    if not overrides:
        if len(args.target) > 1 or args.target[0] not in available_presets():
            raise ConfigError(
                f"invalid choice: {' '.join(args.target)!r}: give one preset "
                f"({', '.join(available_presets())}) or overrides such as recipe=pythia_1_4b"
            )
        show_preset_plan(args.target[0], argparse.Namespace(**{**PRESET_PLAN, **given}))
    elif len(overrides) < len(args.target):
        stray = " ".join(arg for arg in args.target if "=" not in arg)
        raise ConfigError(f"{stray}: with overrides, give every setting as field=value")
    elif given:
        options = ", ".join(f"--{name.replace('_', '-')}" for name in given)
        raise ConfigError(
            f"{options}: these apply to a preset; with overrides the config decides them "
            "(parallel.tp/pp/dp the devices, train.steps, plan.tflops, plan.peak_tflops)"
        )
    else:
        show_run_plan(overrides)


def show_run_plan(overrides: list[str]) -> None:
    from hydra.errors import HydraException

    from neoray import CONF_DIR
    from neoray.training.config import compose_pretrain, pretrain_config
    from neoray.training.plan import format_plan

    try:
        cfg = compose_pretrain(str(CONF_DIR), overrides)
    except HydraException as err:
        raise ConfigError(f"{' '.join(overrides)}: {err}") from err
    print(format_plan(pretrain_config(cfg), cfg.plan.tflops, cfg.plan.peak_tflops))


def show_preset_plan(preset: str, args: argparse.Namespace) -> None:
    config = load_preset(preset)
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
    print(f"{preset}: {config.num_parameters() / 1e9:.2f} B parameters")
    print(
        f"{args.steps:,} steps x {args.batch:,} sequences x {seq_len} tokens = {plan.tokens / 1e9:,.1f} B tokens"
    )
    print(
        f"{args.devices} x {args.device} at {args.tflops} hardware TFLOPS each: {plan.tokens_per_second:,.0f} tokens/s"
    )
    print(f"training time: {plan.hours:,.0f} hours ({plan.hours / 24:,.1f} days)")
    print(f"MFU {plan.mfu:.1%}, HFU {plan.hfu:.1%} (peak {PEAK_TFLOPS[args.device]} TFLOPS)")
    energy = EnergyConfig(pue=args.pue, grid_g_per_kwh=args.grid_g_per_kwh)
    watts = args.watts or DEVICE_WATTS[args.device]
    kwh = projected_kwh(args.devices, watts, plan.hours, args.pue)
    print(
        f"energy: {kwh / 1000:,.2f} MWh ({args.devices} x {watts:.0f} W, PUE {args.pue}) -> "
        f"{kwh * energy.kg_per_kwh / 1000:,.1f} t CO2 at {energy.kg_per_kwh:.3f} kg/kWh"
    )
    if args.sweep:
        print(sweep_share(args.sweep, config, plan.model_flops))


def sweep_share(name: str, config, run_flops: float) -> str:
    """The compute of sweep `name` as a share of the run's (model FLOPs, all trials trained
    to their end: ASHA's early stops only lower it)."""
    from neoray import CONF_DIR
    from neoray.config import ConfigError
    from neoray.sweep.transfer import plan_sweep

    target, cost = plan_sweep(name, CONF_DIR)
    if (target.hidden_size, target.num_layers) != (config.hidden_size, config.num_layers):
        raise ConfigError(
            f"--sweep {name} tunes a model of hidden {target.hidden_size} x {target.num_layers} "
            f"layers, not this one ({config.hidden_size} x {config.num_layers})"
        )
    proxy = cost.model
    return (
        f"sweep {name}: {cost.trials} trials of {proxy.num_parameters() / 1e9:.2f} B parameters "
        f"(hidden {proxy.hidden_size}, {proxy.num_layers} layers, {proxy.parametrization}), "
        f"{cost.tokens_per_trial / 1e9:,.1f} B tokens each: {cost.flops:.2e} FLOPs, "
        f"{cost.flops / run_flops:.1%} of this run's {run_flops:.2e}"
    )


def submit_job(args: argparse.Namespace) -> int:
    from neoray.cluster import submit

    submission_id = submit.submit(args.job, args.overrides, args.address, args.python)
    print(f"submitted {submission_id}", flush=True)
    if args.no_wait:
        return 0
    final = submit.follow(submission_id, args.address)
    print(f"job {submission_id} {final}")
    return 0 if final == "SUCCEEDED" else 1


def job_status(args: argparse.Namespace) -> None:
    from neoray.cluster import submit

    print(submit.status(args.id, args.address))


def job_logs(args: argparse.Namespace) -> int:
    from neoray.cluster import submit

    if not args.follow:
        print(submit.logs(args.id, args.address), end="")
        return 0
    return 0 if submit.follow(args.id, args.address) == "SUCCEEDED" else 1


def stop_job(args: argparse.Namespace) -> None:
    from neoray.cluster import submit

    stopped = submit.stop(args.id, args.address)
    print(f"stopping {args.id}" if stopped else f"{args.id} had already ended")


def show_evals(args: argparse.Namespace) -> None:
    from neoray.evaluation.ledger import Ledger
    from neoray.evaluation.report import ledger_table
    from neoray.storage import StorageConfig, open_storage

    if args.bucket:
        config = StorageConfig(
            kind="s3", bucket=args.bucket, prefix=args.prefix, endpoint_url=args.endpoint_url
        )
    else:
        config = StorageConfig(root=args.root)
    storage = open_storage(config)
    entries = Ledger(storage, args.run_name).entries()
    if not entries:
        print(f"no evaluations of {args.run_name} in {storage.uri(args.run_name + '/evals')}")
        return
    print(ledger_table(entries))


def stack_up(args: argparse.Namespace) -> None:
    from neoray.cluster import stack
    from neoray.stack_data import publish_demo_data

    running = stack.up(args.dir, args.num_cpus, metrics=args.metrics)
    print(stack.describe(running))
    print(publish_demo_data(running))


def stack_down(args: argparse.Namespace) -> None:
    from neoray.cluster import stack

    print("stopped" if stack.down(args.dir) else f"nothing runs from {args.dir}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="neoray", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("presets", help="list the model presets").set_defaults(func=show_presets)
    plan = commands.add_parser(
        "plan",
        help="estimate the time and utilization of a training run",
        description="`neoray plan <preset> [options]`: a preset at the 20B run's scale (the "
        "options below); `neoray plan <overrides>`: the pretrain dry run of conf/pretrain.yaml "
        "with Hydra overrides, e.g. recipe=pythia_1_4b parallel.dp=64 parallel.micro_batch_size=16",
    )
    plan.add_argument("target", nargs="+", metavar="PRESET | FIELD=VALUE")
    plan.add_argument("--devices", type=int, help="default: 96")
    plan.add_argument("--device", choices=sorted(PEAK_TFLOPS), help="default: a100")
    plan.add_argument("--tflops", type=float, help="hardware TFLOPS sustained per device (117)")
    plan.add_argument("--steps", type=int, help="default: 150,000")
    plan.add_argument("--batch", type=int, help="global batch, in sequences (1,536)")
    plan.add_argument("--seq-len", type=int, help="default: the preset's max_seq_len")
    plan.add_argument(
        "--no-checkpoint-activations",
        dest="checkpoint_activations",
        action="store_false",
        default=None,
        help="count no recomputation (default: every layer recomputed, as in the 20B run)",
    )
    plan.add_argument("--watts", type=float, help="power per device (default: its board power)")
    plan.add_argument("--pue", type=float, help="facility energy / device energy (1.0)")
    plan.add_argument(
        "--grid-g-per-kwh", type=float, help="grid CO2 intensity (default: the 20B paper's mix)"
    )
    plan.add_argument(
        "--sweep", help="a sweep tuning this run (conf/sweep/<name>.yaml): show its compute share"
    )
    plan.set_defaults(func=show_plan)

    address = argparse.ArgumentParser(add_help=False)
    address.add_argument(
        "--address",
        help="the cluster's dashboard, http://<head>:8265 (default: RAY_ADDRESS, else the "
        "local stack of `neoray up`)",
    )
    submit = commands.add_parser(
        "submit",
        parents=[address],
        help="run jobs/<job>.py on a Ray cluster with Hydra overrides, following its logs",
    )
    submit.add_argument("job", help="a file of jobs/ without .py, e.g. pretrain")
    submit.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. train.steps=20")
    submit.add_argument("--no-wait", action="store_true", help="print the id and return")
    submit.add_argument("--python", default="python", help="the interpreter on the cluster")
    submit.set_defaults(func=submit_job)
    for name, func, text in (
        ("status", job_status, "print a job's status"),
        ("logs", job_logs, "print a job's logs"),
        ("stop", stop_job, "stop a job"),
    ):
        command = commands.add_parser(name, parents=[address], help=text)
        command.add_argument("id", help="the submission id `neoray submit` printed")
        command.set_defaults(func=func)
        if name == "logs":
            command.add_argument("--follow", "-f", action="store_true", help="until it ends")
    evals = commands.add_parser(
        "evals", help="print a run's evaluation ledger: step x suite, score or state"
    )
    evals.add_argument("run_name")
    evals.add_argument("--root", default="runs", help="local storage root (default: runs)")
    evals.add_argument("--bucket", help="S3 bucket of the run (instead of --root)")
    evals.add_argument("--prefix", default="", help="S3 key prefix")
    evals.add_argument("--endpoint-url", help="S3 endpoint (default: AWS_ENDPOINT_URL)")
    evals.set_defaults(func=show_evals)
    for name, func, text in (
        ("up", stack_up, "start Ray, MLflow and S3 on 127.0.0.1"),
        ("down", stack_down, "stop what `neoray up` started"),
    ):
        command = commands.add_parser(name, help=text)
        command.add_argument("--dir", type=Path, default=Path(".neoray"), help="state directory")
        command.set_defaults(func=func)
        if name == "up":
            command.add_argument("--num-cpus", type=int, default=None, help="Ray's CPUs")
            command.add_argument(
                "--metrics",
                action="store_true",
                help="also start Prometheus (Debian's package) scraping Ray: see dashboards/",
            )
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and args.command == "submit" and not any(a.startswith("-") for a in extra):
        args.overrides += extra  # overrides given after an option
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    from neoray.cluster.ray_start import TokenFileError
    from neoray.cluster.services import ServiceError
    from neoray.cluster.submit import SubmitError
    from neoray.config import ConfigError

    try:
        sys.exit(args.func(args) or 0)
    except (SubmitError, ServiceError, TokenFileError, ConfigError) as err:
        sys.exit(f"neoray {args.command}: {err}")


if __name__ == "__main__":
    main()
