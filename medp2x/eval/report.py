"""The written report of a comparison: ``results.md`` (a header that says how every cell was
made, the summary, the paper's Table 2/3 layout, paired differences, one line per draw),
``results.csv`` (one row per encoder x protocol x draw with every setting and interval) and
``results.png`` (accuracy with its interval per encoder, and the paired differences).

Everything is built from the rows ``compare_encoders`` returns, so a CSV read back gives the
same tables.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)
import pandas as pd  # noqa: E402

from medp2x.eval.images import describe_views  # noqa: E402
from medp2x.metrics import METRICS  # noqa: E402

_METRIC_TITLES = {
    "accuracy": "accuracy",
    "balanced_accuracy": "balanced acc.",
    "macro_f1": "macro-F1",
    "auroc": "AUROC",
}
DIFF_METRICS = ("accuracy", "balanced_accuracy")
_DIFF = re.compile(r"^(accuracy|balanced_accuracy)_diff_vs_(.+)$")


# ----------------------------------------------------------------------------- numbers


def _missing(value) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _pm(mean: float, std: float, scale: float = 100.0) -> str:
    if math.isnan(mean):
        return "n/a"
    if math.isnan(std):
        return f"{scale * mean:.1f}"
    return f"{scale * mean:.1f} ± {scale * std:.1f}"


def _interval(low: float, high: float, signed: bool = False) -> str:
    fmt = "{:+.1f}" if signed else "{:.1f}"
    return f"[{fmt.format(100 * low)}, {fmt.format(100 * high)}]"


def summarize(rows: Sequence[Mapping]) -> pd.DataFrame:
    """Mean and sample std over draws per encoder x protocol x label fraction (input order),
    with the bootstrap interval of accuracy where the rows carry one."""
    frame = pd.DataFrame(list(rows))
    keys = ["encoder", "protocol", "label_fraction"]
    grouped = frame.groupby(keys, sort=False)
    out = grouped[list(METRICS)].agg(["mean", "std"])
    out.columns = [f"{m}_{s}" for m, s in out.columns]
    out.insert(0, "draws", grouped.size())
    out.insert(1, "n_train", grouped["n_train"].mean().round().astype(int))
    if "n_select" in frame:
        out.insert(2, "n_select", grouped["n_select"].mean().round().astype(int))
    for col in ("accuracy_low", "accuracy_high"):
        if col in frame:
            out[col] = grouped[col].first()
    return out.reset_index()


# ----------------------------------------------------------------------------- tables


def format_table(rows: Sequence[Mapping]) -> str:
    """Markdown table: per encoder x protocol, mean ± std over draws of each metric (in %),
    and accuracy's bootstrap 95 % interval over test images and draws."""
    summary = summarize(rows)
    columns = {
        "encoder": summary["encoder"],
        "protocol": summary["protocol"],
        "labels": [f"{100 * f:g}%" for f in summary["label_fraction"]],
        "draws": summary["draws"],
        "n_train": summary["n_train"],
    }
    if "n_select" in summary:
        columns["n_select"] = summary["n_select"]
    for m in METRICS:
        columns[f"{_METRIC_TITLES[m]} (%)"] = [
            _pm(a, b) for a, b in zip(summary[f"{m}_mean"], summary[f"{m}_std"], strict=True)
        ]
        if m == "accuracy" and "accuracy_low" in summary:
            columns["accuracy 95% CI"] = [
                _interval(lo, hi)
                for lo, hi in zip(summary["accuracy_low"], summary["accuracy_high"], strict=True)
            ]
    return pd.DataFrame(columns).to_markdown(index=False)


def format_accuracy_pivot(rows: Sequence[Mapping]) -> str:
    """The paper's Table 2/3 layout for one benchmark: encoders as rows, protocols as columns,
    mean ± std accuracy (%)."""
    summary = summarize(rows)
    summary["cell"] = [
        _pm(a, b) for a, b in zip(summary["accuracy_mean"], summary["accuracy_std"], strict=True)
    ]
    summary["column"] = [
        f"{p} ({100 * f:g}% labels)"
        for p, f in zip(summary["protocol"], summary["label_fraction"], strict=True)
    ]
    pivot = summary.pivot(index="encoder", columns="column", values="cell")
    pivot = pivot.reindex(index=list(dict.fromkeys(summary["encoder"])))
    pivot = pivot[list(dict.fromkeys(summary["column"]))]
    return pivot.fillna("").to_markdown()


def format_draws(rows: Sequence[Mapping]) -> str:
    """Markdown table with one line per encoder x protocol x draw."""
    frame = pd.DataFrame(list(rows))
    cols = ["encoder", "protocol", "draw", "seed", "n_train", "n_select", *METRICS, "selected"]
    frame = frame[[c for c in cols if c in frame]].copy()
    for m in METRICS:
        frame[m] = [("n/a" if math.isnan(v) else f"{100 * v:.1f}") for v in frame[m]]
    return frame.to_markdown(index=False, disable_numparse=True)  # keep "71.0", not "71"


def paired_differences(rows: Sequence[Mapping]) -> list[dict]:
    """The paired differences carried by ``rows`` (``compare_encoders`` with a reference), one
    entry per encoder x reference x protocol: encoder, reference, protocol, label_fraction,
    draws, n_test, and per metric its estimate, ``_low``, ``_high`` and ``_excludes_0``."""
    draws = Counter((r["encoder"], r["protocol"]) for r in rows)
    out: dict[tuple, dict] = {}
    for row in rows:
        for column, value in row.items():
            match = _DIFF.match(column)
            if not match or f"{column}_low" not in row or _missing(value):
                continue
            metric, ref = match.groups()
            entry = out.setdefault(
                (row["encoder"], ref, row["protocol"]),
                {
                    "encoder": row["encoder"],
                    "reference": ref,
                    "protocol": row["protocol"],
                    "label_fraction": row.get("label_fraction"),
                    "draws": draws[row["encoder"], row["protocol"]],
                    "n_test": row.get("n_test"),
                },
            )
            entry[metric] = value
            for end in ("low", "high", "excludes_0"):
                entry[f"{metric}_{end}"] = row[f"{column}_{end}"]
    return list(out.values())


def format_differences(rows: Sequence[Mapping]) -> str:
    """Markdown table of the paired differences in points, with their 95 % intervals; ``*``
    marks an interval that excludes 0. Empty string when the rows carry none."""
    diffs = paired_differences(rows)
    if not diffs:
        return ""
    table = []
    for d in diffs:
        line = {
            "difference": f"{d['encoder']} − {d['reference']}",
            "protocol": d["protocol"],
            "labels": f"{100 * d['label_fraction']:g}%" if d["label_fraction"] is not None else "",
            "draws × test images": f"{d['draws']} × {d['n_test']}",
        }
        for m in DIFF_METRICS:
            if m in d:
                mark = " *" if d[f"{m}_excludes_0"] else ""
                line[f"Δ {_METRIC_TITLES[m]} (points) [95% CI]"] = (
                    f"{100 * d[m]:+.1f} {_interval(d[f'{m}_low'], d[f'{m}_high'], True)}{mark}"
                )
        table.append(line)
    return pd.DataFrame(table).to_markdown(index=False, disable_numparse=True)


# ----------------------------------------------------------------------------- header


def results_header(rows: Sequence[Mapping], command: str | None = None) -> str:
    """How every cell was made: protocol, selection, image views, labels and seeds, test
    split, intervals, test-set provenance, and the command, as Markdown bullet lines."""
    first = rows[0]
    protocols = list(dict.fromkeys(r["protocol"] for r in rows))
    lines = [f"- **Protocol**: {'; '.join(_protocol_text(p, first) for p in protocols)}."]
    lines.append(f"- **Model selection**: {_selection_text(first)}.")
    size = first.get("image_size")
    size = None if _missing(size) else int(size)
    finetune = "finetune" in protocols and first.get("augment", True)
    lines.append(
        f"- **Images**: {describe_views(size, float(first.get('crop_scale', 0.08)), finetune)}."
    )
    lines.append(f"- **Labels**: {_labels_text(rows)}.")
    source = f" ({first['test_source']})" if first.get("test_source") else ""
    lines.append(
        f"- **Test split**: {first['n_test']} images{source}; used once, never selected on."
    )
    if "bootstrap" in first:
        lines.append(
            f"- **Intervals**: percentile bootstrap, {first['bootstrap']} resamples of the test "
            "images (the same images for every encoder: paired) and of the draws, seed "
            f"{_seeds(rows)[0]}; `*` marks a difference whose 95% interval excludes 0."
        )
    provenance = {r["encoder"]: r.get("test_overlap") for r in rows if r.get("test_overlap")}
    if provenance:
        text = "; ".join(f"{name}: {note}" for name, note in provenance.items())
        lines.append(f"- **Test images seen in pretraining**: {text}.")
    if command:
        lines.append(f"- **Reproduce**: `{command}`")
    return "\n".join(lines)


def _protocol_text(protocol: str, row: Mapping) -> str:
    bn = (
        "BN statistics re-averaged over the training images"
        if row.get("bn_stats") == "recomputed"
        else "BN statistics as saved"
    )
    if protocol == "finetune":
        return (
            f"finetune: the whole encoder + a linear head trained, Adam lr {row.get('lr', 3e-4):g}, "
            f"weight decay {row.get('weight_decay', 1e-4):g}, batch {row.get('batch_size', 64)}, "
            f"{row.get('epochs', 20)} epochs (BN in training mode)"
        )
    if protocol == "linear":
        return (
            f"linear: encoder frozen (eval mode, {bn}), multinomial logistic regression on "
            "standardised features, full-batch L-BFGS"
        )
    return (
        f"knn: encoder frozen (eval mode, {bn}), cosine kNN, k = {row.get('knn_k', 20)}, "
        f"T = {row.get('knn_temperature', 0.07):g}"
    )


def _selection_text(row: Mapping) -> str:
    selection = row.get("selection", "none")
    if selection == "none":
        return (
            "none (the paper's setting): fixed epochs and a fixed probe L2 strength "
            "(1/n unless set), the final model is tested"
        )
    if selection == "draw":
        return (
            f"on {100 * float(row.get('val_fraction', 0.1)):g}% of each draw held out inside the "
            "draw (best epoch / probe L2 strength), trained on the rest: n_train + n_select is "
            "the label budget"
        )
    return f"on the given validation split ({row.get('n_select')} labels, outside the label budget)"


def _labels_text(rows: Sequence[Mapping]) -> str:
    first = rows[0]
    fraction = float(first["label_fraction"])
    draws = len(_seeds(rows))
    budget = int(first["n_train"]) + (
        int(first.get("n_select", 0)) if first.get("selection") == "draw" else 0
    )
    total = first.get("n_train_split")
    of = f" of {total}" if total is not None else ""
    kind = "disjoint" if first.get("disjoint") else "independent"
    return (
        f"{100 * fraction:g}% of each class of the training split ({budget}{of} labels per "
        f"draw), {draws} {kind} draw{'s' if draws > 1 else ''} (seed{'s' if draws > 1 else ''} "
        f"{', '.join(str(s) for s in _seeds(rows))})"
    )


def _seeds(rows: Sequence[Mapping]) -> list[int]:
    return sorted({int(r["seed"]) for r in rows})


# ----------------------------------------------------------------------------- figure


def plot_results(rows: Sequence[Mapping], out_png: str | Path) -> Path:
    """Accuracy per encoder x protocol with its 95 % interval, and, when the rows carry them,
    the paired differences with theirs (a forest plot around 0)."""
    summary = summarize(rows)
    diffs = paired_differences(rows)
    panels = 2 if diffs else 1
    height = 1.0 + 0.35 * max(len(summary), len(diffs))
    fig, axes = plt.subplots(1, panels, figsize=(6.0 * panels, height), dpi=120, squeeze=False)
    labels = [f"{e} ({p})" for e, p in zip(summary["encoder"], summary["protocol"], strict=True)]
    mean = 100 * summary["accuracy_mean"]
    ax = axes[0, 0]
    if "accuracy_low" in summary:
        err = [mean - 100 * summary["accuracy_low"], 100 * summary["accuracy_high"] - mean]
        ax.barh(labels, mean, xerr=err, capsize=3, color="tab:blue", alpha=0.7)
    else:
        ax.barh(labels, mean, color="tab:blue", alpha=0.7)
    ax.invert_yaxis()
    ax.set_xlabel("accuracy (%), mean over draws, 95% CI")
    ax.grid(axis="x", alpha=0.3)
    if diffs:
        ax = axes[0, 1]
        names = [f"{d['encoder']} − {d['reference']} ({d['protocol']})" for d in diffs]
        est = [100 * d["accuracy"] for d in diffs]
        lo = [e - 100 * d["accuracy_low"] for e, d in zip(est, diffs, strict=True)]
        hi = [100 * d["accuracy_high"] - e for e, d in zip(est, diffs, strict=True)]
        colours = ["tab:red" if d["accuracy_excludes_0"] else "tab:gray" for d in diffs]
        for i, (e, l_, h, c) in enumerate(zip(est, lo, hi, colours, strict=True)):
            ax.errorbar(e, i, xerr=[[l_], [h]], fmt="o", color=c, capsize=3)
        ax.set_yticks(range(len(names)), names)
        ax.set_ylim(len(names) - 0.5, -0.5)  # first on top, rows evenly spaced
        ax.axvline(0, color="black", lw=0.8)
        ax.set_xlabel("paired accuracy difference (points), 95% CI")
        ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    out_png = Path(out_png)
    fig.savefig(out_png)
    plt.close(fig)
    return out_png


# ----------------------------------------------------------------------------- files


def write_results(
    rows: Sequence[Mapping],
    out_dir: str | Path,
    title: str = "Downstream evaluation",
    command: str | None = None,
    stem: str = "results",
    figure: bool = True,
) -> tuple[Path, Path]:
    """``<stem>.md`` (header, summary, Table 2/3-style accuracy, paired differences, per-draw
    table), ``<stem>.csv`` (one row per encoder x protocol x draw, all metrics as fractions,
    every setting and interval) and, with ``figure``, ``<stem>.png``. Returns (md, csv)."""
    if not rows:
        raise ValueError("no result rows to write")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    md_path, csv_path = out_dir / f"{stem}.md", out_dir / f"{stem}.csv"
    sections = [
        f"# {title}",
        results_header(rows, command),
        "Metrics in %, mean ± sample std over the label draws.",
        "## Summary",
        format_table(rows),
        "## Accuracy (Table 2/3 layout)",
        format_accuracy_pivot(rows),
    ]
    differences = format_differences(rows)
    if differences:
        sections += ["## Paired differences", differences]
    sections += ["## Per draw", format_draws(rows)]
    md_path.write_text("\n\n".join(sections) + "\n")
    pd.DataFrame(list(rows)).to_csv(csv_path, index=False)
    if figure:
        plot_results(rows, out_dir / f"{stem}.png")
    return md_path, csv_path


__all__ = [
    "format_accuracy_pivot",
    "format_differences",
    "format_draws",
    "format_table",
    "paired_differences",
    "plot_results",
    "results_header",
    "summarize",
    "write_results",
]
