"""Small line plots with the numbers written beside the points (the paper's Figs. 2-3 style).

Always the Agg backend: runs on head-less servers and inside tests. A CSV with the same
numbers is written next to each figure, so the values can be quoted without reading pixels.
"""

from __future__ import annotations

import csv
from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)
import numpy as np  # noqa: E402

Series = Mapping[str, Sequence[tuple[float, float]]]


def plot_series(
    series: Series,
    out_png: str | Path,
    xlabel: str = "pretraining epoch",
    ylabel: str = "downstream accuracy (%)",
    title: str | None = None,
    value_format: str = "{:.1f}",
) -> tuple[Path, Path]:
    """One line per series, each point annotated with its y value; returns (png, csv).

    ``series`` maps a name (e.g. "P2X scaled") to (x, y) points; the CSV has one row per point
    with columns series, x, y.
    """
    if not series or not any(series.values()):
        raise ValueError("nothing to plot: no series with points")
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    for name, points in series.items():
        points = sorted(points)
        xs, ys = [p[0] for p in points], [p[1] for p in points]
        (line,) = ax.plot(xs, ys, marker="o", label=name)
        for x, y in points:
            ax.annotate(
                value_format.format(y),
                (x, y),
                textcoords="offset points",
                xytext=(4, 5),
                fontsize=8,
                color=line.get_color(),
            )
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    ax.margins(x=0.08, y=0.12)  # room for the labels beside the outermost points
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_png)
    plt.close(fig)
    return out_png, write_series_csv(series, out_png.with_suffix(".csv"))


def write_series_csv(series: Series, path: str | Path) -> Path:
    path = Path(path)
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["series", "x", "y"])
        for name, points in series.items():
            for x, y in sorted(points):
                writer.writerow([name, x, y])
    return path


def plot_loss_curve(losses: Sequence[float], out_png: str | Path, title: str = "") -> Path:
    """The pretraining loss per iteration and its running mean: the convergence curve users
    look at first (TensorBoard has the same numbers)."""
    out_png = Path(out_png)
    values = np.asarray(losses, dtype=float)
    window = max(1, len(values) // 20)
    smooth = np.convolve(values, np.ones(window) / window, mode="valid")
    fig, ax = plt.subplots(figsize=(6.4, 3.6), dpi=120)
    ax.plot(np.arange(1, len(values) + 1), values, lw=0.6, alpha=0.4, label="loss")
    ax.plot(np.arange(window, len(values) + 1), smooth, lw=1.6, label=f"mean of {window}")
    ax.set_xlabel("iteration")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_png)
    plt.close(fig)
    return out_png
