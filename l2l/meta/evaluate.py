"""Runs update rules on held-out instances: summaries, baseline learning-rate tuning, benchmarks."""

from __future__ import annotations

import copy
import dataclasses
import math
import time
from typing import Any, Callable, NamedTuple

import torch
from torch import Tensor

from l2l.checkpoint import versions
from l2l.config import check_baselines, check_lr_grid, lr_key
from l2l.kernels.dispatch import kernels_taken
from l2l.meta.unroll import run
from l2l.optimizers.base import UpdateRule
from l2l.optimizers.baselines import get_baseline
from l2l.seeding import make_generator
from l2l.tasks.base import Task, TaskFamily, check_positive_int


class RunResult(NamedTuple):
    """One optimizer on one set of instances."""

    losses: Tensor  # [T + 1, K] on the CPU, the initial loss first
    metrics: dict[str, Tensor]  # held-out figures per instance, each [K]
    seconds: float


def resolve_device(device: str) -> torch.device:
    """``"auto"`` is CUDA when available, else the CPU; ``"cuda"`` without a GPU is an error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {device!r} was asked for but CUDA is not available here; use --device cpu")
    return resolved


EVALUATION_BATCHES = "evaluate-batches"
TUNING_BATCHES = "tune-batches"  # never an evaluation stream, whatever the seeds (see tune_learning_rate)


def evaluate(rule: UpdateRule, task: Task, steps: int, *, seed: int = 0, batches: str = EVALUATION_BATCHES) -> RunResult:
    """Runs ``rule`` for ``steps`` steps from the task's initial parameters.

    Minibatches (stochastic tasks) are drawn from a generator seeded by ``seed`` and the stream's
    purpose ``batches`` alone, so every rule evaluated with the same seed sees the same data
    (common random numbers); learning-rate tuning passes its own purpose. An instance that
    diverged (a loss along the way or a final parameter NaN or infinite) has every metric NaN.
    """
    generator = make_generator(seed, batches, task.device)
    if task.device.type == "cuda":
        torch.cuda.synchronize(task.device)  # the clock starts when earlier queued work (copies, training) is done
    begin = time.perf_counter()
    losses, carry = run(rule, task, steps, generator=generator)
    with torch.no_grad():
        # A net with NaN weights has no accuracy (argmax reads NaN logits as class 0, a finite figure of
        # chance level): a diverged instance's held-out figures are NaN, as its losses are. On the device,
        # so no host read is added.
        diverged = ~(torch.isfinite(losses).all(0) & torch.isfinite(carry.params.detach().flatten(1)).all(1))
        metrics = {name: _blank_diverged(value.detach(), diverged).cpu() for name, value in task.metrics(carry.params).items()}
    losses = losses.cpu()
    return RunResult(losses, metrics, time.perf_counter() - begin)


def _blank_diverged(values: Tensor, diverged: Tensor) -> Tensor:
    """``values [K]`` with NaN where ``diverged [K]`` (integer figures become float64 to hold it)."""
    if not values.is_floating_point():
        values = values.double()
    return values.masked_fill(diverged.to(values.device), math.nan)


def on_device(rule: UpdateRule, device: torch.device) -> UpdateRule:
    """``rule`` itself if its weights are all on ``device`` already (or it has none), else a copy of it there.

    The caller's rule is never moved: ``Module.to`` converts in place, so benchmarking on a GPU
    would otherwise leave the caller's CPU rule on the GPU.
    """
    if not isinstance(rule, torch.nn.Module):
        return rule
    if all(same_device(tensor.device, device) for tensor in (*rule.parameters(), *rule.buffers())):
        return rule
    return copy.deepcopy(rule).to(device)


def same_device(first: torch.device, second: torch.device) -> bool:
    """Whether two devices are one: ``cuda`` without an index is the current CUDA device, and the CPU is one device.

    ``torch.device`` compares the spelling: ``cuda`` differs from ``cuda:0``, the device of every
    tensor on the first GPU, and ``cpu:0`` from ``cpu``.
    """
    if first.type != second.type:
        return False
    if first.type == "cpu" or first.index == second.index:
        return True
    if first.type == "cuda" and (first.index is None or second.index is None):
        return (first.index if first.index is not None else second.index) == torch.cuda.current_device()
    return False


def _finite_or_none(value: float) -> float | None:
    return value if math.isfinite(value) else None


def summarize(result: RunResult) -> dict[str, Any]:
    """JSON-ready figures of a run: final-loss mean/median/sem, summed loss, mean curve.

    Non-finite figures (diverged instances) are reported as ``None`` and counted; so is the
    standard error of a single instance (undefined). The median of an even number of instances
    is the mean of the two middle values.
    """
    losses = result.losses.double()
    final = losses[-1]
    num = final.numel()
    finite = torch.isfinite(losses).all(0)
    # quantile (not torch.median, which returns the lower middle value) and NaN for undefined spreads.
    median = final.quantile(0.5).item() if bool(torch.isfinite(final).all()) else math.nan
    sem = (losses.std(1, unbiased=True) / math.sqrt(num)) if num > 1 else torch.full((len(losses),), math.nan)
    summary = {
        "final_loss": {
            "mean": _finite_or_none(final.mean().item()),
            "median": _finite_or_none(median),
            "sem": _finite_or_none(sem[-1].item()),
        },
        "summed_loss_mean": _finite_or_none(losses.sum(0).mean().item()),
        "diverged": int((~finite).sum().item()),
        "curve_mean": [_finite_or_none(v) for v in losses.mean(1).tolist()],
        "curve_sem": [_finite_or_none(v) for v in sem.tolist()],
        "seconds": result.seconds,
    }
    for name, values in result.metrics.items():
        summary[name] = {"mean": _finite_or_none(values.double().mean().item())}
    return summary


def tune_learning_rate(
    make_rule: Callable[[float], UpdateRule], task: Task, steps: int, grid: tuple[float, ...], *, seed: int = 0
) -> tuple[float, dict[float, float]]:
    """Picks the learning rate with the lowest mean final loss on ``task`` (tuning instances).

    Args:
        make_rule: builds the rule for a learning rate.
        task: tuning instances, separate from the evaluation instances.
        steps: optimizee steps per run.
        grid: candidate learning rates.
        seed: seeds the minibatches (stochastic tasks). They come from a stream of their own
            purpose, so no seed's tuning data is any seed's evaluation data (tuning with the
            evaluation stream of ``seed + 1``, as before, picked rates on the data of the
            benchmark with the next seed).

    Returns:
        ``(best_lr, scores)`` with ``scores[lr]`` the mean final loss (``inf`` if diverged). Ties
        go to the smallest rate; if every rate diverged, ``best_lr`` is the smallest (the one
        least likely to), and the caller should say so.

    Raises:
        ValueError: ``grid`` is empty, lists a rate twice or holds one that is not positive and finite.
    """
    check_lr_grid(grid)
    scores: dict[float, float] = {}
    for lr in grid:
        final = evaluate(make_rule(lr), task, steps, seed=seed, batches=TUNING_BATCHES).losses[-1]
        score = final.double().mean().item()
        scores[lr] = score if math.isfinite(score) else math.inf
    best = min(sorted(grid), key=lambda lr: scores[lr])
    return best, scores


def benchmark(
    family: TaskFamily,
    learned: dict[str, UpdateRule],
    *,
    baselines: tuple[str, ...],
    steps: int,
    problems: int,
    tune_problems: int,
    lr_grid: tuple[float, ...],
    seed: int,
    device: torch.device,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Compares learned rules with tuned baselines on the same held-out instances.

    Baseline learning rates are tuned on ``tune_problems`` instances and minibatches drawn from
    streams separate from the ``problems`` evaluation instances and their minibatches (of this
    seed and of every other); every optimizer is then run on the same evaluation instances with
    the same minibatches.

    Returns:
        ``{"task", "task_options", "steps", "problems", "tune_problems", "lr_grid", "seed", "device",
        "versions", "results": {name: summary}}`` (``lr_grid`` the rates as given, None without
        baselines; ``versions`` of l2l and torch, as checkpoints record them) where a summary is
        :func:`summarize`'s output plus ``"lr"`` (None for learned rules), for learned rules
        ``"kernel"`` (the LSTM path taken, see :func:`kernel_taken`) and, for
        baselines, ``"hyperparameters"`` (the rule's fixed settings but its rate, e.g. ``{"beta": 0.9}``),
        ``"lr_scores"`` (mean final tuning loss per rate, keyed to 6 significant digits, None where
        it diverged), ``"lr_at_grid_edge"`` (the best rate is an end of a grid of several)
        and ``"tuning_diverged"`` (every rate diverged; the smallest is used).

    Raises:
        ValueError: a count or the grid is out of range, a baseline is unknown or listed twice, or a
            learned rule has a baseline's name.
    """
    check_positive_int("steps", steps)
    check_positive_int("problems", problems)
    check_baselines(baselines)
    if baselines:
        check_positive_int("tune_problems", tune_problems)
        check_lr_grid(lr_grid)
    for name in learned:
        if name in baselines:  # one row per name: the baseline's would replace the learned rule's
            raise ValueError(f"learned rule {name!r} has the name of a baseline; name it otherwise")
    say = progress or (lambda message: None)
    eval_task = family.sample(problems, make_generator(seed, "bench"), device)
    tune_task = family.sample(tune_problems, make_generator(seed, "tune"), device) if baselines else None
    results: dict[str, Any] = {}
    for name, rule in learned.items():
        say(f"evaluating {name}")
        rule = on_device(rule, device)
        results[name] = {"lr": None, "kernel": kernel_taken(rule, device), **summarize(evaluate(rule, eval_task, steps, seed=seed))}
    for name in baselines:
        say(f"tuning {name} over {len(lr_grid)} learning rates")
        best_lr, scores = tune_learning_rate(lambda lr: get_baseline(name, lr), tune_task, steps, lr_grid, seed=seed)
        tuned = get_baseline(name, best_lr)
        summary = summarize(evaluate(tuned, eval_task, steps, seed=seed))
        edge = len(set(lr_grid)) > 1 and best_lr in (min(lr_grid), max(lr_grid))  # one rate is a choice, not a search
        results[name] = {
            "lr": best_lr,
            **summary,
            "lr_scores": {lr_key(lr): _finite_or_none(score) for lr, score in scores.items()},
            "hyperparameters": {key: value for key, value in dataclasses.asdict(tuned).items() if key != "lr"},
            "lr_at_grid_edge": edge,
            "tuning_diverged": all(math.isinf(score) for score in scores.values()),
        }
    return {
        "task": family.name,
        "task_options": family.config(),
        "steps": steps,
        "problems": problems,
        "tune_problems": tune_problems,
        "lr_grid": [float(lr) for lr in lr_grid] if baselines else None,
        "seed": seed,
        "device": str(device),
        "versions": versions(),
        "results": results,
    }


def kernel_taken(rule: UpdateRule, device: torch.device) -> str | None:
    """``"reference"``, ``"fused"`` or ``"reference+fused"``: the path(s) ``rule``'s LSTMs take on ``device``; None for other rules."""
    taken = kernels_taken(rule, device) if isinstance(rule, torch.nn.Module) else set()
    return "+".join(sorted(taken, reverse=True)) or None


def _count(number: int, noun: str) -> str:
    """``1 step``, ``3 steps``."""
    return f"{number} {noun}{'' if number == 1 else 's'}"


def _ratio_text(ratio: float) -> str:
    """``0.490x``; far from 1 in significant digits, since three decimals showed 2e-4 as ``0.000x``."""
    return f"{ratio:.3f}x" if ratio == 0 or 1e-3 <= ratio < 1e3 else f"{ratio:.3g}x"


def format_table(report: dict[str, Any], reference: str = "adam") -> str:
    """A plain-text table of :func:`benchmark`'s report, one row per optimizer, best first.

    Args:
        report: :func:`benchmark`'s output.
        reference: the optimizer whose mean final loss the ``vs`` column divides by (no column
            where it was not run).
    """
    results = report["results"]
    ref = results.get(reference, {}).get("final_loss", {}).get("mean")

    def fmt(value: float | None, spec: str = ".4g") -> str:
        return "diverged" if value is None else format(value, spec)

    extra = sorted({key for r in results.values() for key in r if isinstance(r[key], dict) and "mean" in r[key] and key != "final_loss"})
    ratios = reference in results  # no column of '-' where the reference was not run
    header = ["optimizer", "lr", "final mean", "± sem", "median", "summed mean"] + [f"vs {reference}"] * ratios + extra
    rows = []
    order = sorted(results, key=lambda n: math.inf if results[n]["final_loss"]["mean"] is None else results[n]["final_loss"]["mean"])
    for name in order:
        r = results[name]
        final = r["final_loss"]
        ratio = None if (ref is None or final["mean"] is None or ref == 0) else final["mean"] / ref
        lr = "learned" if r["lr"] is None else f"{r['lr']:.3g}" + ("*" if r.get("lr_at_grid_edge") else "")
        mean = fmt(final["mean"])
        if final["mean"] is None and r.get("diverged"):  # one diverged instance makes the mean undefined
            mean = f"diverged ({r['diverged']} of {report['problems']})"
        rows.append(
            [name, lr, mean, "-" if final["sem"] is None and final["mean"] is not None else fmt(final["sem"], ".2g"),
             fmt(final["median"]), fmt(r["summed_loss_mean"])]
            + ["-" if ratio is None else _ratio_text(ratio)] * ratios
            + [fmt(r[key]["mean"]) if key in r else "-" for key in extra]
        )
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows)]
    tuned = any(r["lr"] is not None for r in results.values())
    lines = [
        f"{report['task']}: {_count(report['problems'], 'held-out instance')}, {_count(report['steps'], 'step')}, seed {report['seed']}"
        + (f" (baseline lr tuned on {_count(report['tune_problems'], 'separate instance')})" if tuned else ""),
        "  ".join(cell.ljust(width) for cell, width in zip(header, widths)),
        "  ".join("-" * width for width in widths),
    ]
    lines += ["  ".join(str(cell).ljust(width) for cell, width in zip(row, widths)) for row in rows]
    diverged_tuning = [name for name in order if results[name].get("tuning_diverged")]
    if diverged_tuning:
        lines.append(f"* {', '.join(diverged_tuning)}: every learning rate on the grid diverged on the tuning instances; "
                     "the smallest was used: extend --lr-grid downwards")
    if any(r.get("lr_at_grid_edge") and not r.get("tuning_diverged") for r in results.values()):
        lines.append("* best learning rate at the edge of the grid: widen --lr-grid")
    return "\n".join(lines)
