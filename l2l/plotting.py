"""Figures of benchmark reports (needs the optional ``plot`` extra: matplotlib)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from l2l.checkpoint import atomic_write


def figure_format(path: str | os.PathLike) -> str:
    """The image format that ``path``'s suffix names, e.g. ``"png"``.

    Raises:
        ValueError: the path has no suffix, or matplotlib cannot write the format it names.
        RuntimeError: matplotlib is not installed.
    """
    try:
        from matplotlib.backend_bases import FigureCanvasBase
    except ImportError:
        raise RuntimeError("plotting needs matplotlib: pip install 'l2l[plot]'") from None
    supported = ", ".join(f".{name}" for name in sorted(FigureCanvasBase.get_supported_filetypes()))
    suffix = Path(path).suffix.lower()
    if not suffix:
        raise ValueError(f"{path} has no suffix to name its format; end it in one of {supported}")
    if suffix[1:] not in FigureCanvasBase.get_supported_filetypes():
        raise ValueError(f"{path}: format {suffix[1:]!r} is not supported; end it in one of {supported}")
    return suffix[1:]


def plot_curves(report: dict[str, Any], path: str | os.PathLike, *, title: str | None = None) -> Path:
    """Mean loss per step, with a band of one standard error, one line per optimizer.

    The scale is logarithmic unless some mean loss is negative (or none is positive): then linear.

    Args:
        report: the output of :func:`l2l.meta.evaluate.benchmark`.
        path: the image file to write (PNG, PDF, SVG: by its suffix), atomically.
        title: the figure title; defaults to the task and instance count.

    Raises:
        ValueError: ``path`` names no format matplotlib writes (see :func:`figure_format`).
    """
    try:
        # A Figure of its own, without pyplot: the caller's backend (a notebook's) and figures are left alone.
        from matplotlib.figure import Figure
        from matplotlib.ticker import MaxNLocator
    except ImportError:
        raise RuntimeError("plotting needs matplotlib: pip install 'l2l[plot]'") from None
    import numpy as np

    image_format = figure_format(path)

    curves = []
    for name, result in sorted(report["results"].items(), key=lambda item: item[0] != "lstm"):
        mean = np.array([np.nan if v is None else v for v in result["curve_mean"]], dtype=float)
        sem = np.array([np.nan if v is None else v for v in result["curve_sem"]], dtype=float)
        curves.append((name, result, mean, sem))
    drawn = np.concatenate([mean[np.isfinite(mean)] for _, _, mean, _ in curves] or [np.zeros(0)])
    # A loss that reaches 0 drops off the bottom of a log axis ranged by the positive losses, but a
    # negative one would vanish (or, with nothing positive, leave an empty axis or fail to draw).
    log_scale = bool((drawn > 0).any()) and not bool((drawn < 0).any())

    figure = Figure(figsize=(6.4, 4.4))
    axes = figure.subplots()
    for name, result, mean, sem in curves:
        steps = np.arange(len(mean))
        label = name if result["lr"] is None else f"{name} (lr {result['lr']:.3g})"
        width = 2.2 if result["lr"] is None else 1.3
        (line,) = axes.plot(steps, mean, label=label, linewidth=width)
        # On the log axis a band reaching 0 (sem >= mean: heavy tails, few instances) would stretch
        # it over decades and squash every curve; its lower edge stops at a tenth of the mean.
        lower = np.maximum(mean - sem, mean / 10) if log_scale else mean - sem
        axes.fill_between(steps, lower, mean + sem, color=line.get_color(), alpha=0.2)
    axes.set_yscale("log" if log_scale else "linear")
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps are whole: no tick at step 2.5
    axes.set_xlabel("optimizee step")
    axes.set_ylabel("mean loss")
    axes.set_title(title or f"{report['task']}: {report['problems']} held-out instances")
    axes.grid(True, which="both", alpha=0.3)
    axes.legend()
    figure.tight_layout()
    # A temporary beside the file, renamed over it: an interrupted run leaves no half-written figure.
    return atomic_write(path, lambda handle: figure.savefig(handle, format=image_format, dpi=130))
