"""What weight surgery did, for a reader: its report (``SurgeryReport``, per-layer changes),
the tables, the CSV and the filter-norm histogram of the paper's Fig. 1.

The algorithm is ``medp2x.surgery``; this module only describes and writes its results
(``surgery_report.csv`` / ``surgery_norms.png`` in the run folder, ``medp2x inspect``'s tables).
"""

from __future__ import annotations

import csv
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from medp2x.atomic import atomic_write

if TYPE_CHECKING:
    from medp2x.surgery import LayerStats


def stats_table(stats: Sequence[LayerStats]) -> str:
    """Markdown table of one set of statistics (``medp2x inspect``)."""
    header = "| layer | filters | > 1 | < 0.1 | min | median | max |\n|---|---:|---:|---:|---:|---:|---:|"
    lines = [
        f"| {s.layer} | {s.filters} | {s.frac_above:.1%} | {s.frac_dead:.2%} | {s.min:.3g} | {s.median:.3g} | {s.max:.3g} |"
        for s in stats
    ]
    return "\n".join([header, *lines])


@dataclass
class LayerChange:
    """What surgery did to one conv/BN pair."""

    layer: str
    scale: float | None = None  # s used (per_filter: the largest); None when not scaled
    scaled_filters: int = 0
    dead: list[int] = field(default_factory=list)  # dead filter indices (norm < dead_threshold)
    sources: list[int] = field(default_factory=list)  # copy: live source per replaced filter
    replaced: int = 0


@dataclass
class SurgeryReport:
    """Before/after filter-norm statistics and the per-layer changes of one surgery."""

    options: dict
    before: list[LayerStats]
    after: list[LayerStats]
    changes: list[LayerChange]
    norms_before: np.ndarray = field(repr=False)
    norms_after: np.ndarray = field(repr=False)

    @property
    def n_dead(self) -> int:
        return sum(len(c.dead) for c in self.changes)

    @property
    def n_replaced(self) -> int:
        return sum(c.replaced for c in self.changes)

    @property
    def n_scaled_layers(self) -> int:
        return sum(c.scale is not None for c in self.changes)

    def summary(self) -> str:
        b, a = self.before[-1], self.after[-1]
        opts = ", ".join(f"{k}={v}" for k, v in self.options.items())
        return (
            f"weight surgery ({opts}): {len(self.changes)} conv/BN layers, {b.filters} filters; "
            f"scaled {self.n_scaled_layers} layers; {self.n_dead} dead filters, {self.n_replaced} replaced; "
            f"norm > 1: {b.frac_above:.1%} -> {a.frac_above:.1%}, < 0.1: {b.frac_dead:.2%} -> {a.frac_dead:.2%}, "
            f"median {b.median:.3g} -> {a.median:.3g}"
        )

    def rows(self) -> list[dict]:
        """Long format (one row per layer and stage), as written to CSV."""
        changes = {c.layer: c for c in self.changes}
        out = []
        for stage, stats in (("before", self.before), ("after", self.after)):
            for s in stats:
                change = changes.get(s.layer)
                out.append(
                    {
                        "stage": stage,
                        **asdict(s),
                        "scale": "" if change is None or change.scale is None else change.scale,
                        "dead": len(change.dead) if change else self.n_dead,
                        "replaced": change.replaced if change else self.n_replaced,
                    }
                )
        return out

    def to_markdown(self) -> str:
        """One row per layer; statistics shown as ``before → after``."""
        changes = {c.layer: c for c in self.changes}
        header = (
            "| layer | filters | s | replaced | > 1 | < 0.1 | min | median | max |\n"
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|"
        )
        lines = []
        for b, a in zip(self.before, self.after, strict=True):
            change = changes.get(b.layer)
            s = "" if change is None or change.scale is None else f"{change.scale:.3g}"
            replaced = change.replaced if change else self.n_replaced
            lines.append(
                f"| {b.layer} | {b.filters} | {s} | {replaced} | {b.frac_above:.1%} → {a.frac_above:.1%} | "
                f"{b.frac_dead:.2%} → {a.frac_dead:.2%} | {b.min:.3g} → {a.min:.3g} | "
                f"{b.median:.3g} → {a.median:.3g} | {b.max:.3g} → {a.max:.3g} |"
            )
        return "\n".join([header, *lines])

    def __str__(self) -> str:
        return f"{self.summary()}\n\n{self.to_markdown()}"

    def write_csv(self, path: str | Path) -> Path:
        return write_csv(self.rows(), path)

    def plot(self, path: str | Path, title: str | None = None) -> Path:
        series = {"before surgery": self.norms_before, "after surgery": self.norms_after}
        return plot_filter_norms(
            series, path, title=title or "Filter norms before and after weight surgery"
        )


def write_csv(rows: Sequence[Mapping], path: str | Path) -> Path:
    if not rows:
        raise ValueError(f"{path}: no rows to write")

    def write(tmp: str) -> None:
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)

    return atomic_write(path, write)


def plot_filter_norms(
    series: Mapping[str, np.ndarray],
    path: str | Path,
    threshold: float = 1.0,
    dead_threshold: float = 0.1,
    title: str = "Frobenius norms of convolution filters",
) -> Path:
    """The paper's Fig. 1: distribution of per-filter norms, log x, one line per checkpoint.

    Uses the object-oriented matplotlib API with the Agg canvas, so it works headless and
    never switches the caller's pyplot backend.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if not series:
        raise ValueError("nothing to plot")
    floor = 1e-4  # exact zeros (all-zero filters) cannot sit on a log axis
    clipped = {name: np.clip(np.asarray(v, dtype=float), floor, None) for name, v in series.items()}
    low = min(v.min() for v in clipped.values())
    high = max(v.max() for v in clipped.values())
    bins = np.logspace(math.log10(low) - 0.05, math.log10(high) + 0.05, 61)
    fig = Figure(figsize=(7, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for name, norms in clipped.items():
        above, dead = (norms > threshold).mean(), (norms < dead_threshold).mean()
        label = f"{name} ({above:.0%} > {threshold:g}, {dead:.2%} < {dead_threshold:g})"
        ax.hist(
            norms,
            bins=bins,
            weights=np.full(len(norms), 100 / len(norms)),
            histtype="step",
            lw=1.5,
            label=label,
        )
    for x in (dead_threshold, threshold):
        ax.axvline(x, color="grey", ls="--", lw=0.8)
    ax.set_xscale("log")
    ax.set_xlabel(
        "Frobenius norm of filter"
        + (f" (values < {floor:g} drawn at {floor:g})" if low <= floor else "")
    )
    ax.set_ylabel("% of filters")
    ax.set_title(title)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    return atomic_write(
        path, lambda tmp: fig.savefig(tmp, format=Path(path).suffix.lstrip(".") or "png")
    )
