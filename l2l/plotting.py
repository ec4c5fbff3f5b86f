"""Figures of benchmark reports (needs the optional ``plot`` extra: matplotlib)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any


def plot_curves(report: dict[str, Any], path: str | os.PathLike, *, title: str | None = None) -> Path:
    """Mean loss per step on a log scale, with a band of one standard error, one line per optimizer.

    Args:
        report: the output of :func:`l2l.meta.evaluate.benchmark`.
        path: the image file to write (PNG, PDF, SVG: by its suffix).
        title: the figure title; defaults to the task and instance count.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import MaxNLocator
    except ImportError:
        raise RuntimeError("plotting needs matplotlib: pip install 'l2l[plot]'") from None
    import numpy as np

    figure, axes = plt.subplots(figsize=(6.4, 4.4))
    for name, result in sorted(report["results"].items(), key=lambda item: item[0] != "lstm"):
        mean = np.array([np.nan if v is None else v for v in result["curve_mean"]], dtype=float)
        sem = np.array([np.nan if v is None else v for v in result["curve_sem"]], dtype=float)
        steps = np.arange(len(mean))
        label = name if result["lr"] is None else f"{name} (lr {result['lr']:.3g})"
        width = 2.2 if result["lr"] is None else 1.3
        (line,) = axes.plot(steps, mean, label=label, linewidth=width)
        # On the log axis a band reaching 0 (sem >= mean: heavy tails, few instances) would stretch
        # it over decades and squash every curve; its lower edge stops at a tenth of the mean.
        axes.fill_between(steps, np.maximum(mean - sem, mean / 10), mean + sem, color=line.get_color(), alpha=0.2)
    axes.set_yscale("log")
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps are whole: no tick at step 2.5
    axes.set_xlabel("optimizee step")
    axes.set_ylabel("mean loss")
    axes.set_title(title or f"{report['task']}: {report['problems']} held-out instances")
    axes.grid(True, which="both", alpha=0.3)
    axes.legend()
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=130)
    plt.close(figure)
    return path
