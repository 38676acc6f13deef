"""``medp2x inspect``: filter-norm statistics of checkpoints (the paper's Fig. 1).

Per conv layer: number of filters, fraction with Frobenius norm > 1 (exploding) and < 0.1
(dead), min/median/max norm. Several checkpoints go on one histogram.

Examples::

    medp2x inspect simclr_r50.pth swav_r50.pth supervised_r50.pth --plot norms.png --csv norms.csv
"""

from __future__ import annotations

import argparse
from dataclasses import asdict
from pathlib import Path


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "inspect",
        help="per-layer filter-norm statistics of checkpoints (exploding / dead filters)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "checkpoints", nargs="+", metavar="CKPT", help="any checkpoint format medp2x reads"
    )
    p.add_argument(
        "--plot", metavar="PNG", help="histogram of filter norms, one line per checkpoint"
    )
    p.add_argument("--csv", metavar="FILE", help="the statistics, one row per checkpoint and layer")
    add_reading_options(p)
    p.set_defaults(func=run)


def add_reading_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--format", default="auto", help="checkpoint format (default: detected)")
    p.add_argument(
        "--threshold", type=float, default=1.0, help="norm above which a filter counts as large"
    )
    p.add_argument(
        "--dead-threshold", type=float, default=0.1, help="norm below which a filter is dead"
    )


def read_backbone(path: str, fmt: str, allow_partial: bool = False):
    """torchvision-layout backbone state dict and the loader's ``LoadReport``, from any format."""
    from medp2x.checkpoints import read_checkpoint  # imported late: keeps ``medp2x --help`` fast

    return read_checkpoint(path, format=fmt, allow_partial=allow_partial)


def series_names(paths: list[str]) -> list[str]:
    """File names as labels, or the full paths where two files share a name."""
    names = [Path(p).name for p in paths]
    return names if len(set(names)) == len(names) else list(paths)


def run(args: argparse.Namespace) -> int:
    from medp2x.surgery import (
        conv_weights_from_state_dict,
        layer_norms,
        norm_stats,
        pooled_norms,
    )
    from medp2x.surgery_report import plot_filter_norms, stats_table, write_csv

    rows, series = [], {}
    for path, name in zip(args.checkpoints, series_names(args.checkpoints), strict=True):
        state_dict, report = read_backbone(
            path, args.format, allow_partial=True
        )  # inspect what is there
        weights = conv_weights_from_state_dict(state_dict)
        if not weights:
            raise ValueError(f"{path}: no convolution weights in this checkpoint")
        norms = layer_norms(weights)
        stats = norm_stats(norms, args.threshold, args.dead_threshold)
        total = stats[-1]
        print(f"## {name} ({report.format}, {report.arch})\n")
        print(
            f"{len(weights)} conv layers, {total.filters} filters: {total.frac_above:.1%} with norm > "
            f"{args.threshold:g}, {total.frac_dead:.2%} < {args.dead_threshold:g}, median {total.median:.3g}\n"
        )
        print(stats_table(stats) + "\n")
        rows += [{"checkpoint": path, **asdict(s)} for s in stats]
        series[name] = pooled_norms(norms)
    if args.csv:
        print(f"statistics: {write_csv(rows, args.csv)}")
    if args.plot:
        print(f"plot: {plot_filter_norms(series, args.plot, args.threshold, args.dead_threshold)}")
    return 0
