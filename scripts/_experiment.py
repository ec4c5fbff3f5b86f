"""Shared driver of the paper-reproduction scripts: optional training, then `l2l bench` with figure and JSON."""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from _common import RESULTS, RUNS, Formatter, guard_published, path_arg, positive_int
from l2l.cli import DATA_DIR_HELP
from l2l.cli import main as l2l

# Flags that leave what a run measures unchanged (--train runs the published training recipe).
_NOT_SETTINGS = ("train", "overwrite", "runs_dir", "out", "device", "data_dir")


def parser(description: str, checkpoint: str, problems: int, *, train: bool = True) -> argparse.ArgumentParser:
    """Flags every reproduction script shares; ``train=False`` for a script with no training recipe of its own."""
    args = argparse.ArgumentParser(description=description, formatter_class=Formatter)
    args.add_argument("--checkpoint", default=checkpoint, help="checkpoint path or shipped name to evaluate")
    if train:
        args.add_argument("--train", action="store_true",
                          help="meta-train first with the documented recipe, into --runs-dir, then evaluate that instead of --checkpoint")
        args.add_argument("--overwrite", action="store_true", help="with --train: replace an earlier training run's checkpoints")
        args.add_argument("--runs-dir", type=path_arg, default=RUNS, help="with --train: where the training run's folder goes")
    args.add_argument("--out", type=path_arg, default=RESULTS,
                      help="where the figures and JSON go; the default folder holds the published ones, and only the published settings may write there")
    args.add_argument("--problems", type=positive_int, default=problems, help="held-out instances")
    args.add_argument("--seed", type=int, default=1, help="seed of the held-out instances")
    args.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    args.add_argument("--data-dir", type=path_arg, help=DATA_DIR_HELP)
    return args


def parse(args: argparse.ArgumentParser, ignore: Sequence[str] = ()) -> argparse.Namespace:
    """Parses the command line; a usage error if the run would replace published results with other settings.

    ``ignore``: the script's own flags that do not change its outputs' settings.
    """
    options = args.parse_args()
    ignore = (*_NOT_SETTINGS, *ignore, *(("checkpoint",) if getattr(options, "train", False) else ()))
    guard_published(args, options, [options.out], f"results of {args.prog}", {}, ignore)
    return options


def data_flags(options: argparse.Namespace) -> list[str]:
    return ["--data-dir", str(options.data_dir)] if options.data_dir else []


def train(options: argparse.Namespace, recipe: list[str], name: str) -> str:
    """Runs `l2l train RECIPE --out RUNS_DIR/NAME`; returns the use checkpoint it wrote."""
    out = options.runs_dir / name
    overwrite = ["--overwrite"] if options.overwrite else []
    status = l2l(["train", *recipe, "--out", str(out), "--no-bench", "--device", options.device, *overwrite, *data_flags(options)])
    if status:
        sys.exit(status)
    return str(out / "optimizer.pt")


def bench(options: argparse.Namespace, name: str, task: str, steps: int, extra: Sequence[str] = ()) -> None:
    """Runs `l2l bench` for one setting and writes OUT/NAME.json and OUT/NAME.png."""
    options.out.mkdir(parents=True, exist_ok=True)
    status = l2l([
        "bench", "--task", task, "--optimizer", options.checkpoint, "--steps", str(steps),
        "--problems", str(options.problems), "--seed", str(options.seed), "--device", options.device,
        "--json", str(options.out / f"{name}.json"), "--plot", str(options.out / f"{name}.png"),
        *extra, *data_flags(options),
    ])
    if status:
        sys.exit(status)
