"""What every experiment script shares: argument types and the guard on the repo's published folders."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Iterable, Mapping

from l2l.cli import path_arg, positive_float, positive_int

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"
FIGURES = REPO / "benchmarks" / "figures"
RUNS = REPO / "runs"
# Tracked: the figures and JSON that benchmarks/RESULTS.md and docs/objectives.md publish.
PUBLISHED = (RESULTS, FIGURES)

__all__ = ["FIGURES", "Formatter", "RESULTS", "RUNS", "guard_published", "nonnegative_int", "path_arg", "positive_float", "positive_int"]


class Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """--help shows every default (except None and False, and where the help states its own) and the description as written."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default is None or action.default is False or "(default:" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def nonnegative_int(text: str) -> int:
    """argparse type: an integer >= 0."""
    value = int(text) if text.strip().lstrip("+").isdigit() else -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}")
    return value


def _is_published(folder: Path) -> bool:
    return folder.expanduser().resolve() in {p.resolve() for p in PUBLISHED}


def guard_published(args: argparse.ArgumentParser, options: argparse.Namespace, folders: Iterable[Path], what: str,
                    recipe: Mapping[str, Any] | None, ignore: Iterable[str] = ()) -> None:
    """Stops with a usage error if a run that is not the published one would write into a published folder.

    Args:
        folders: where the run writes; only the repo's ``benchmarks/results`` and
            ``benchmarks/figures`` are guarded.
        what: what the run writes there, for the message ("results of paper_mnist.py").
        recipe: the published run's options that differ from the parser's defaults, or None if
            no such results are published.
        ignore: destinations that do not change the results (device, data directory, outputs).
    """
    guarded = list(dict.fromkeys(str(folder) for folder in folders if _is_published(folder)))
    if not guarded:
        return
    where = f"{' and '.join(guarded)} {'hold' if len(guarded) > 1 else 'holds'}"
    fix = "pass --out DIR to write this run elsewhere"
    if recipe is None:
        args.error(f"{where} the published results, and there are no {what}; {fix}")
    skip = set(ignore)
    defaults = vars(args.parse_args([]))  # As parsed: string defaults through their type.
    differ = []
    for dest, value in vars(options).items():
        expected = recipe.get(dest, defaults.get(dest))
        if dest not in skip and value != expected:
            differ.append(f"--{dest.replace('_', '-')} {value!r} (published: {expected!r})")
    if differ:
        args.error(f"{where} the published {what}, made with other settings: {', '.join(differ)}; {fix}")
