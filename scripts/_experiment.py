"""Shared driver of the paper-reproduction scripts: optional training, then `l2l bench` with figure and JSON."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from l2l.cli import main as l2l

RESULTS = Path(__file__).resolve().parent.parent / "benchmarks" / "results"


def parser(description: str, checkpoint: str) -> argparse.ArgumentParser:
    """Flags every reproduction script shares."""
    args = argparse.ArgumentParser(description=description)
    args.add_argument("--checkpoint", default=checkpoint, help=f"use checkpoint or shipped name (default: {checkpoint})")
    args.add_argument("--train", action="store_true", help="meta-train first with the documented recipe, then evaluate that")
    args.add_argument("--overwrite", action="store_true", help="with --train: replace an earlier training run's checkpoints")
    args.add_argument("--out", type=Path, default=RESULTS, help="where the figures and JSON go")
    args.add_argument("--problems", type=int, help="held-out instances (default: the experiment's)")
    args.add_argument("--seed", type=int, default=1, help="seed of the held-out instances")
    args.add_argument("--device", default="auto")
    args.add_argument("--data-dir", help="dataset directory (default: $L2L_DATA)")
    return args


def data_flags(options: argparse.Namespace) -> list[str]:
    return ["--data-dir", options.data_dir] if options.data_dir else []


def train(options: argparse.Namespace, recipe: list[str], out: Path) -> str:
    """Runs `l2l train RECIPE --out OUT`; returns the use checkpoint it wrote."""
    overwrite = ["--overwrite"] if options.overwrite else []
    status = l2l(["train", *recipe, "--out", str(out), "--no-bench", "--device", options.device, *overwrite, *data_flags(options)])
    if status:
        sys.exit(status)
    return str(out / "optimizer.pt")


def bench(options: argparse.Namespace, name: str, task: str, steps: int, problems: int, extra: list[str] = ()) -> None:
    """Runs `l2l bench` for one setting and writes OUT/NAME.json and OUT/NAME.png."""
    options.out.mkdir(parents=True, exist_ok=True)
    status = l2l([
        "bench", "--task", task, "--optimizer", options.checkpoint, "--steps", str(steps),
        "--problems", str(options.problems or problems), "--seed", str(options.seed), "--device", options.device,
        "--json", str(options.out / f"{name}.json"), "--plot", str(options.out / f"{name}.png"),
        *extra, *data_flags(options),
    ])
    if status:
        sys.exit(status)
