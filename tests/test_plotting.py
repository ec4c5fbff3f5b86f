"""Loss-curve figures of `l2l bench --plot`: written in the suffix's format, steps on whole ticks, a clear error without matplotlib."""

import sys

import pytest

from l2l.plotting import plot_curves

pytest.importorskip("matplotlib")


def report(steps=20):
    curve = [10.0 / (1 + t) for t in range(steps + 1)]
    return {
        "task": "quadratic", "problems": 4,
        "results": {
            "adam": {"lr": 0.1, "curve_mean": curve, "curve_sem": [0.5 * v for v in curve]},
            # A diverged run's non-finite means reach the JSON as None; the figure must still draw.
            "lstm": {"lr": None, "curve_mean": curve[:-2] + [None, None], "curve_sem": [0.0] * (steps + 1)},
        },
    }


@pytest.mark.parametrize("suffix, magic", [(".png", b"\x89PNG"), (".pdf", b"%PDF"), (".svg", b"<?xml")])
def test_writes_the_figure_in_the_format_of_its_suffix(tmp_path, suffix, magic):
    path = plot_curves(report(), tmp_path / "new" / f"curves{suffix}")
    assert path.read_bytes().startswith(magic)


def test_curves_are_labelled_and_steps_are_whole_ticks(tmp_path, monkeypatch):
    import matplotlib.figure

    saved = {}
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", lambda figure, *a, **k: saved.setdefault("figure", figure))
    plot_curves(report(steps=20), tmp_path / "curves.png")
    axes = saved["figure"].axes[0]
    assert [text.get_text() for text in axes.get_legend().get_texts()] == ["lstm", "adam (lr 0.1)"]
    assert axes.get_yscale() == "log"
    ticks = [tick for tick in axes.get_xticks() if 0 <= tick <= 20]
    assert ticks and all(float(tick).is_integer() for tick in ticks)


def test_without_matplotlib_the_error_names_the_extra(tmp_path, monkeypatch):
    for name in [name for name in sys.modules if name == "matplotlib" or name.startswith("matplotlib.")]:
        monkeypatch.setitem(sys.modules, name, None)  # every module of it, as if it were not installed
    with pytest.raises(RuntimeError, match=r"pip install 'l2l\[plot\]'"):
        plot_curves(report(), tmp_path / "curves.png")


def test_a_path_without_a_known_suffix_is_refused_and_nothing_is_written(tmp_path):
    # matplotlib itself would write "curves" as curves.png, and plot_curves returned "curves".
    with pytest.raises(ValueError, match="has no suffix to name its format; end it in one of .*\\.png"):
        plot_curves(report(), tmp_path / "curves")
    with pytest.raises(ValueError, match="format 'xyz' is not supported"):
        plot_curves(report(), tmp_path / "curves.xyz")
    assert list(tmp_path.iterdir()) == []


def test_a_failed_write_keeps_the_previous_figure_and_leaves_no_partial_file(tmp_path, monkeypatch):
    import matplotlib.figure

    path = tmp_path / "curves.png"
    path.write_bytes(b"previous figure")

    def fail_midway(figure, handle, **kwargs):
        handle.write(b"\x89PNG half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", fail_midway)
    with pytest.raises(OSError, match="No space left"):
        plot_curves(report(), path)
    assert path.read_bytes() == b"previous figure" and list(tmp_path.iterdir()) == [path]


def _drawn_axes(monkeypatch, tmp_path, curves):
    import matplotlib.figure

    saved = {}
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", lambda figure, *a, **k: saved.setdefault("figure", figure))
    results = {name: {"lr": 0.1, "curve_mean": curve, "curve_sem": [0.5] * len(curve)} for name, curve in curves.items()}
    plot_curves({"task": "quadratic", "problems": 2, "results": results}, tmp_path / "curves.png")
    return saved["figure"].axes[0]


def test_losses_reaching_zero_keep_the_log_scale_ranged_by_the_positive_losses(tmp_path, monkeypatch):
    axes = _drawn_axes(monkeypatch, tmp_path, {"adam": [1.0, 0.1, 0.01, 0.0, 0.0], "sgd": [1.0, 0.5, 0.25, 0.1, 0.05]})
    bottom, top = axes.get_ylim()
    assert axes.get_yscale() == "log" and 1e-4 < bottom < 0.01 and top > 1.0


@pytest.mark.parametrize("curves", [
    {"adam": [1.0, 0.0, -1.0, -2.0], "sgd": [1.0, 0.5, 0.25, 0.1]},  # was a log axis that hid every negative loss
    {"adam": [-1.0, -2.0, -3.0, -4.0]},  # was an empty log axis
])
def test_negative_losses_are_drawn_on_a_linear_scale_with_their_whole_band(tmp_path, monkeypatch, curves):
    axes = _drawn_axes(monkeypatch, tmp_path, curves)
    bottom, top = axes.get_ylim()
    lowest, highest = min(min(curve) for curve in curves.values()), max(max(curve) for curve in curves.values())
    assert axes.get_yscale() == "linear" and bottom <= lowest - 0.5 and top >= highest + 0.5  # the whole band of one sem


def test_a_report_whose_every_mean_diverged_still_draws(tmp_path):
    # Was ValueError 'Data cannot be log-scaled' after the benchmark, and l2l bench lost its table.
    path = plot_curves({"task": "quadratic", "problems": 2, "results": {"adam": {"lr": 0.1, "curve_mean": [None] * 3,
                                                                              "curve_sem": [None] * 3}}}, tmp_path / "c.png")
    assert path.read_bytes().startswith(b"\x89PNG")


def test_drawing_leaves_the_callers_matplotlib_backend_and_figures_alone(tmp_path):
    import matplotlib
    import matplotlib.pyplot as plt

    backend = matplotlib.get_backend()
    matplotlib.use("pdf")  # as a notebook's inline backend: plot_curves switched every later figure to Agg
    try:
        figure = plt.figure()
        plot_curves(report(), tmp_path / "curves.png")
        assert matplotlib.get_backend() == "pdf" and plt.get_fignums() == [figure.number]
        plt.close(figure)
    finally:
        matplotlib.use(backend)
