"""muP coordinate check: activation size against width, muP next to the standard parametrization.

Tiny 2-layer models of widths 64 to 1,024 (4 heads, the head dimension grows) each train a few
Adam steps at one fixed learning rate (`neoray.training.mup_check.coordinate_check`); the
figure plots mean |x| of the embedding, the attention and MLP outputs, the layer outputs and
the logits against the width, one panel per parametrization. Flat lines are what muP promises:
a learning rate that is right for one width is right for all. It prints, per probe, the slope
of log(mean |x|) against log(width) under each parametrization (the peer), and their ratio of
growth from the narrowest to the widest model.

    DS_ACCELERATOR=cpu .venv/bin/python bench/mup_coord_check.py --out docs/mup_coord_check.png
"""

from __future__ import annotations

import argparse
from pathlib import Path

from neoray.training.mup_check import PROBES, coordinate_check, growth


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--widths", type=int, nargs="+", default=[64, 128, 256, 512, 1024])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("docs/mup_coord_check.png"))
    args = parser.parse_args()

    sizes = {
        p: coordinate_check(p, args.widths, args.steps, args.lr, args.seeds)
        for p in ("standard", "mup")
    }
    print(f"mean |x| after {args.steps} Adam steps at lr {args.lr}, widths {args.widths}")
    print(f"{'probe':10} {'standard':>30} {'mup':>30}  slope std / mup")
    for probe in PROBES:
        cells = []
        for p in ("standard", "mup"):
            values = sizes[p][probe]
            ratio = values[max(args.widths)] / values[min(args.widths)]
            cells.append(f"x{ratio:6.2f} widest/narrowest")
        slopes = [growth(sizes[p][probe]) for p in ("standard", "mup")]
        print(f"{probe:10} {cells[0]:>30} {cells[1]:>30}  {slopes[0]:+.2f} / {slopes[1]:+.2f}")
    plot(sizes, args)
    print(f"figure: {args.out}")


def plot(sizes: dict, args: argparse.Namespace) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(10, 3.8), sharey=True)
    for axis, parametrization in zip(axes, ("standard", "mup"), strict=True):
        for probe in PROBES:
            values = sizes[parametrization][probe]
            axis.plot(list(values), list(values.values()), marker="o", label=probe)
        axis.set_xscale("log", base=2)
        axis.set_yscale("log")
        axis.set_xlabel("width (hidden size)")
        axis.set_title(f"{parametrization}: mean |x| after {args.steps} Adam steps", size=10)
        axis.grid(alpha=0.3)
    axes[0].set_ylabel("mean |x|")
    axes[1].legend(fontsize=8)
    figure.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(args.out, dpi=100)
    plt.close(figure)


if __name__ == "__main__":
    main()
