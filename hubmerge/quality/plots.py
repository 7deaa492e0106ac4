"""Charts for the output folder (PNG, matplotlib's Agg renderer), shared by the diagnostics and evaluation.

matplotlib is the optional extra `hubmerge[plots]`: a merge does not need it, and without it the
callers skip their charts with `MISSING` as the note. Figures are drawn on a `Figure` with its own Agg
canvas, never through `pyplot`, so no global backend or figure state is touched. PNG metadata leaves out
the matplotlib version, so the same numbers give the same bytes and a re-run pushes no new commit.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = ["MISSING", "Panel", "available", "bar_chart", "line_chart", "scatter_chart"]

MISSING = 'plots skipped: matplotlib is not installed (pip install "hubmerge[plots]")'


def available() -> bool:
    """Whether matplotlib can be imported."""
    return importlib.util.find_spec("matplotlib") is not None


@dataclass(frozen=True)
class Panel:
    """One subplot: a y-axis label and named series (None where a value is undefined)."""

    ylabel: str
    series: Mapping[str, Sequence[float | None]]


def line_chart(path: Path, title: str, xlabel: str, x: Sequence[int], panels: Sequence[Panel]) -> None:
    """Write one PNG with `panels` stacked vertically over a shared x axis, one line per series."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    height = 3 * len(panels)  # inches
    figure = Figure(figsize=(8, height))
    FigureCanvasAgg(figure)
    axes = figure.subplots(len(panels), 1, sharex=True, squeeze=False)[:, 0]
    for ax, panel in zip(axes, panels, strict=True):
        for name, values in panel.series.items():
            ax.plot(x, [float("nan") if v is None else v for v in values], marker="o", label=name)
        ax.set_ylabel(panel.ylabel)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize="small")
    axes[0].set_title(title)
    axes[-1].set_xlabel(xlabel)
    axes[-1].set_xticks(list(x))
    # Fixed margins rather than a layout engine, which draws the figure twice (half the time of a merge
    # of the tiny test models).
    figure.subplots_adjust(left=0.1, right=0.97, top=1 - 0.4 / height, bottom=0.6 / height, hspace=0.12)
    figure.savefig(path, format="png", dpi=100, metadata={"Software": None})


def bar_chart(path: Path, title: str, groups: Sequence[str], series: Mapping[str, Sequence[float]]) -> None:
    """Write one PNG of grouped bars: one group per entry of `groups`, one bar per series in each."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(max(6.0, 1.2 * len(groups) * (len(series) + 1) / 2), 4), layout="constrained")
    FigureCanvasAgg(figure)
    ax = figure.subplots()
    width = 0.8 / max(len(series), 1)
    for i, (name, values) in enumerate(series.items()):
        positions = [g + (i - (len(series) - 1) / 2) * width for g in range(len(groups))]
        bars = ax.bar(positions, values, width, label=name)
        ax.bar_label(bars, fmt="%.3f", fontsize="x-small")
    ax.set_xticks(range(len(groups)), groups)
    ax.set_title(title)
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(fontsize="small")
    figure.savefig(path, format="png", dpi=100, metadata={"Software": None})


def scatter_chart(
    path: Path, title: str, ylabel: str, panels: Mapping[str, Sequence[tuple[object, float]]], mark: int
) -> None:
    """Write one PNG with a panel per entry of `panels` (its name on the x axis): its (x, y) points, the one
    at index `mark` circled. An x axis of other than numbers is categorical, its values in first-seen order."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    columns = min(3, len(panels))
    rows = -(-len(panels) // columns)
    figure = Figure(figsize=(4 * columns, 3 * rows + 0.5), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(rows, columns, squeeze=False).ravel()
    for ax, (name, points) in zip(axes, panels.items(), strict=False):
        xs = [x for x, _ in points]
        if all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in xs):
            positions = [float(x) for x in xs]  # type: ignore[arg-type]
        else:
            labels = list(dict.fromkeys(map(str, xs)))
            positions = [float(labels.index(str(x))) for x in xs]
            ax.set_xticks(range(len(labels)), labels)
        ys = [y for _, y in points]
        ax.scatter(positions, ys, s=18)
        ax.scatter([positions[mark]], [ys[mark]], s=80, facecolors="none", edgecolors="red", label="best")
        ax.set_xlabel(name, fontsize="small")
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
    for ax in axes[len(panels) :]:
        ax.set_visible(False)
    axes[0].legend(fontsize="small")
    figure.suptitle(title)
    figure.savefig(path, format="png", dpi=100, metadata={"Software": None})
