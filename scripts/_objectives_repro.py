"""Shared plumbing of the gradient-objective reproductions (scripts/repro_*.py): flags, data, outputs."""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
from typing import Any, Mapping, Sequence

import torch
from _common import FIGURES, RESULTS, Formatter, guard_published, path_arg, positive_int

from l2l.checkpoint import atomic_write
from l2l.cli import DATA_DIR_HELP
from l2l.data.base import DATA_ENV, data_dir
from l2l.tasks.mnist import mnist_tensors
from l2l.tasks.module import SupervisedData

# Flags that leave what a run measures unchanged.
_NOT_SETTINGS = ("data_dir", "out", "figures", "results", "threads", "name")


def parser(description: str) -> argparse.ArgumentParser:
    """Flags every reproduction shares: data directory, output folders, seed, threads."""
    args = argparse.ArgumentParser(description=description, formatter_class=Formatter)
    args.add_argument("--data-dir", type=path_arg, help=DATA_DIR_HELP)
    args.add_argument("--out", type=path_arg, help="write the PNG and the JSON here (instead of --figures and --results)")
    args.add_argument("--figures", type=path_arg, default=FIGURES,
                      help="where the PNG goes; the default folder holds the published ones, and only the published settings may write there")
    args.add_argument("--results", type=path_arg, default=RESULTS,
                      help="where the JSON goes; the default folder holds the published ones, and only the published settings may write there")
    args.add_argument("--seed", type=int, default=0, help="first seed (model initialisation, minibatch order)")
    # One thread: on a shared 2-core machine, two OpenMP threads wait on the busy core.
    args.add_argument("--threads", type=positive_int, default=1, help="torch CPU threads")
    return args


def setup(args: argparse.ArgumentParser, recipes: Mapping[str, Mapping[str, Any]]) -> argparse.Namespace:
    """Parses the command line and applies the thread count and data directory.

    ``recipes``: for each published output name, the flags (beyond the parser's defaults) of
    the run that made it. The output name is ``--name`` where the script has that flag, else
    the only recipe's; a run that would write other settings into the published folders is a
    usage error.
    """
    options = args.parse_args()
    if options.out is not None:
        options.figures = options.results = options.out
    name = getattr(options, "name", None) or next(iter(recipes))
    guard_published(args, options, [options.figures, options.results], f"results named {name!r}", recipes.get(name), _NOT_SETTINGS)
    torch.set_num_threads(options.threads)
    if options.data_dir:
        os.environ[DATA_ENV] = str(options.data_dir)
    return options


def check_batches(args: argparse.ArgumentParser, options: argparse.Namespace, examples: str) -> None:
    """A usage error if ``--batch-size`` is more than the ``examples`` flag's count: whole minibatches only, so nothing would train."""
    count = getattr(options, examples.replace("-", "_"))
    if options.batch_size > count:
        args.error(f"--batch-size {options.batch_size} is more than --{examples} {count}: no whole minibatch, nothing would "
                   f"be trained; pass a --batch-size of at most {count}")


def mnist(train_examples: int | None = None) -> SupervisedData:
    """MNIST as float images ``[N, 1, 28, 28]`` in [0, 1], in the library's fixed shuffled order."""
    return mnist_tensors(str(data_dir()), "cpu", train_examples)


def minibatches(count: int, batch_size: int, epochs: int, generator: torch.Generator):
    """Index tensors ``[batch_size]`` over ``epochs`` shuffled passes of ``count`` examples (last partial batch dropped)."""
    for _ in range(epochs):
        order = torch.randperm(count, generator=generator)
        for start in range(0, count - batch_size + 1, batch_size):
            yield order[start : start + batch_size]


def machine() -> dict[str, Any]:
    return {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "date": datetime.date.today().isoformat(),
    }


def write(options: argparse.Namespace, name: str, report: dict[str, Any], figure) -> None:
    """Writes ``RESULTS/NAME.json`` (with the machine) and ``FIGURES/NAME.png``."""
    options.results.mkdir(parents=True, exist_ok=True)
    options.figures.mkdir(parents=True, exist_ok=True)
    report = {**report, "machine": machine()}
    text = json.dumps(report, indent=1).encode()
    atomic_write(options.results / f"{name}.json", lambda handle: handle.write(text))  # never half a report
    figure.savefig(options.figures / f"{name}.png", dpi=80, bbox_inches="tight")
    print(f"wrote {options.results / f'{name}.json'} and {options.figures / f'{name}.png'}")


def table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A plain-text table; floats with 4 significant digits."""
    cells = [[f"{c:.4g}" if isinstance(c, float) else str(c) for c in row] for row in rows]
    widths = [max(len(str(h)), *(len(r[i]) for r in cells)) for i, h in enumerate(header)]
    lines = ["  ".join(str(h).ljust(w) for h, w in zip(header, widths)), "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in cells]
    return "\n".join(lines)
