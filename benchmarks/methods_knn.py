"""Does each SSL method learn something? Brief tiny-recipe pretraining on Tiny-ImageNet
(validation split, 10k natural images of 200 classes, labels unused), then the usual SSL kNN
monitor: the pretraining images with their labels are the memory bank, and held-out images
(``--test-fraction`` of each class, never seen in pretraining) are classified by their k
nearest neighbours. Random-init encoders of several seeds, measured in the same run, are the
reference; a method "beats random" only when it beats the best of them. A colour histogram and
a 4x4-pixel image are measured too (``medp2x.baselines``): on Tiny-ImageNet both beat every
random init, which says how much of a random init's score is colour alone.

    python benchmarks/methods_knn.py [--data ../shared/data/tiny_imagenet_val] [--iterations 200]

Writes ``benchmarks/results/methods_knn.md``, ``.csv`` and ``.png`` (bars over the random-init
band), and each method's run (loss curve, checkpoints) under ``runs/``. A method that collapses scores at
chance level (1 / classes) and is flagged.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from monai.data import CacheDataset
from torch.utils.data import Subset

from medp2x.baselines import build_baseline
from medp2x.batchnorm import BN_STATS, recompute_bn_stats
from medp2x.data.folder import ImageFolderDataset
from medp2x.data.split import stratified_split
from medp2x.engine import PretrainConfig, RunSummary, pretrain
from medp2x.eval.compare import compare_encoders
from medp2x.eval.convergence import convergence_figure, list_checkpoints
from medp2x.eval.encoders import resolve_encoder
from medp2x.eval.features import extract_features, training_images
from medp2x.eval.settings import EvalSettings
from medp2x.eval.splits import dataset_labels
from medp2x.methods import METHODS
from medp2x.monitor import rankme

REPO = Path(__file__).resolve().parents[1]
# How much of a kNN score colour alone explains (medp2x/baselines.py); never a verdict's bar.
LOW_LEVEL = {"colour histogram": "colour_histogram", "tiny image (4x4 px)": "tiny_image"}


def held_out_splits(data: ImageFolderDataset, test_fraction: float, seed: int):
    """(pretraining = kNN memory bank, held-out queries), stratified by class.

    Holding out images rather than whole classes keeps both sides large: 2,000 queries over
    200 classes put the standard error of an accuracy near 10% at 0.7 points, where 300
    queries of 20 held-out classes (this script's first protocol) left it at 1.8.
    """
    labels = dataset_labels(data)
    bank, queries = stratified_split(labels, fraction=test_fraction, seed=seed)
    return Subset(data, bank.tolist()), Subset(data, queries.tolist())


def standard_error(accuracy: float, n: int) -> float:
    return math.sqrt(accuracy * (1.0 - accuracy) / n)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--data", default=str(REPO.parent / "shared" / "data" / "tiny_imagenet_val")
    )
    parser.add_argument("--methods", nargs="+", default=list(METHODS))
    parser.add_argument("--iterations", type=int, default=1500)
    parser.add_argument("--image-size", type=int, default=64, help="evaluation size")
    parser.add_argument(
        "--train-size",
        type=int,
        default=None,
        help="pretraining crop size, cropped from the --image-size images (default: the same)",
    )
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--test-fraction", type=float, default=0.2)
    parser.add_argument(
        "--no-cache",
        dest="cache",
        action="store_false",
        help="decode images on every read instead of once (memory: 4 x 3 x size^2 bytes each)",
    )
    parser.add_argument("--random-seeds", type=int, default=3, help="random-init references")
    parser.add_argument(
        "--no-low-level",
        dest="low_level",
        action="store_false",
        help="leave out the colour-histogram and 4x4-pixel references",
    )
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--amp", action="store_true", help="bf16 autocast")
    parser.add_argument(
        "--lr", type=float, default=None, help="peak learning rate (default: recipe)"
    )
    parser.add_argument(
        "--blur-p",
        type=float,
        default=0.0,
        help="blur probability: the 224 px recipes blur, which at 32-64 px erases the image "
        "(CIFAR-scale recipes drop it); pass -1 to keep each method's own",
    )
    parser.add_argument(
        "--curve-every",
        type=int,
        default=0,
        metavar="N",
        help="also keep a checkpoint every N iterations and plot kNN accuracy against "
        "iterations (methods_knn_curve.{png,csv}); 0: final encoders only",
    )
    parser.add_argument(
        "--bn-stats",
        nargs="+",
        choices=BN_STATS,
        default=list(BN_STATS),
        help="evaluate with each encoder's BN statistics as saved, and/or re-averaged over the "
        "bank images (PreciseBN; labels unused); one table and figure per choice",
    )
    parser.add_argument(
        "--method-option",
        action="append",
        default=[],
        metavar="[METHOD.]NAME=VALUE",
        help="recipe override, for one method (simclr.temperature=0.2) or every method "
        "(base_lr=0.3); repeatable",
    )
    return parser.parse_args()


def method_options(method: str, pairs: list[str]) -> dict:
    options = {}
    for pair in pairs:
        name, _, value = pair.partition("=")
        target, _, field = name.rpartition(".")
        if target in ("", method):
            options[field] = json.loads(value)
    return options


def pretrain_method(method: str, bank, out: Path, args: argparse.Namespace) -> RunSummary:
    """A fresh run (a previous one is deleted: its time is what this benchmark reports)."""
    epochs = max(1, -(-args.iterations * args.batch_size // len(bank)))
    run_dir = out / "runs" / method
    shutil.rmtree(run_dir, ignore_errors=True)
    summary = pretrain(
        PretrainConfig(
            dataset=bank,
            output_dir=run_dir,
            method=method,
            profile="tiny",
            arch="resnet18",
            image_size=args.train_size or args.image_size,
            source_size=args.image_size,
            batch_size=args.batch_size,
            epochs=epochs,
            max_iterations=args.iterations,
            normalization="imagenet",
            seed=args.seed,
            amp=args.amp,
            lr=args.lr,
            checkpoint_every=args.curve_every,
            n_saved=None if args.curve_every else 2,
            method_options=method_options(method, args.method_option),
            view_options={} if args.blur_p < 0 else {"blur_p": args.blur_p},
        )
    )
    print(f"{method}: loss {summary.first_loss:.3f} -> {summary.last_loss:.3f}")
    return summary


def curve_checkpoints(run_dir: Path, every: int) -> list[Path]:
    """The run's checkpoints on the curve's grid (the engine also saves one per epoch)."""
    files = list_checkpoints(run_dir)
    return [p for p in files if int(p.stem.rsplit("_", 1)[-1]) % every == 0]


def feature_ranks(encoders: dict, images, image_size: int) -> dict[str, float]:
    """RankMe of each encoder's backbone features on the held-out images: the label-free
    measure of dimensional collapse that the projector's spread does not see."""
    settings = EvalSettings(image_size=image_size, progress=False)
    return {
        name: rankme(extract_features(encoder, images, settings)[0])
        for name, encoder in encoders.items()
    }


def with_recomputed_bn(encoders: dict, images, image_size: int) -> dict:
    """Every encoder with its BN statistics re-averaged over ``images`` (random inits too)."""
    settings = EvalSettings(image_size=image_size, progress=False)
    return {
        name: recompute_bn_stats(encoder, training_images(images, settings, None))
        for name, encoder in encoders.items()
    }


BN_NOTES = {
    "saved": "BN statistics as saved",
    "recomputed": "BN statistics re-averaged over the bank images (PreciseBN)",
}


def _fmt(value: float | None, digits: int = 2) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def settings_note(args: argparse.Namespace) -> str:
    """The non-default training settings, so a table says how it was made."""
    notes = ["bf16"] if args.amp else []
    if getattr(args, "train_size", None) not in (None, args.image_size):
        notes.append(f"{args.train_size} px crops of the {args.image_size} px images")
    if args.lr is not None:
        notes.append(f"peak lr {args.lr:g}")
    notes += getattr(args, "method_option", [])
    if getattr(args, "blur_p", 0.0) != 0.0:
        notes.append(f"blur_p {args.blur_p:g}")
    return "".join(f", {n}" for n in notes)


def report(
    rows: list[dict],
    seconds: dict,
    n_queries: int,
    args,
    spreads: dict | None = None,
    ranks: dict | None = None,
) -> tuple[str, list[dict]]:
    """Markdown table and CSV rows; the verdict compares with the best random-init seed.
    ``spreads``: each method's projector spread at the end of pretraining (collapse monitor);
    ``ranks``: every encoder's backbone-feature RankMe on the queries."""
    spreads, ranks = spreads or {}, ranks or {}
    accuracy = {r["encoder"]: r["accuracy"] for r in rows}
    randoms = [a for name, a in accuracy.items() if name.startswith("random init")]
    best_random, mean_random = max(randoms), float(np.mean(randoms))
    chance = 1.0 / args.classes
    lines = [
        f"kNN (k=20, cosine, T=0.07) over {args.classes} Tiny-ImageNet classes: "
        f"{args.bank} bank images (the pretraining set) / {n_queries} held-out queries, "
        f"{args.image_size} px; pretraining: tiny recipe, resnet18, {args.iterations} "
        f"iterations of batch {args.batch_size}{settings_note(args)}; "
        f"{BN_NOTES[getattr(args, 'bn_note', 'saved')]}",
        "",
        "| encoder | kNN accuracy | ± s.e. | vs mean random init | pretraining time (s) "
        "| projector spread | feature rank (RankMe) | verdict |",
        "|---|---|---|---|---|---|---|---|",
    ]
    table = []
    for name, acc in accuracy.items():
        if name.startswith("random init"):
            verdict = "reference"
        elif name in LOW_LEVEL:
            verdict = "low-level reference"
        elif acc <= chance * 1.5:
            verdict = "collapsed"
        else:
            verdict = "beats random" if acc > best_random else "no gain"
        se = standard_error(acc, n_queries)
        lines.append(
            f"| {name} | {100 * acc:.1f}% | {100 * se:.1f} | {acc / mean_random:.2f}x "
            f"| {seconds.get(name, 0):.0f} | {_fmt(spreads.get(name))} "
            f"| {_fmt(ranks.get(name), 1)} | {verdict} |"
        )
        table.append(
            {
                "encoder": name,
                "knn_accuracy": acc,
                "standard_error": se,
                "ratio_vs_mean_random": acc / mean_random,
                "seconds": seconds.get(name, 0.0),
                "embedding_spread": spreads.get(name),
                "feature_rank": ranks.get(name),
                "verdict": verdict,
            }
        )
    return "\n".join(lines), table


def plot(table: list[dict], path: Path, title: str) -> None:
    """Bars with one standard error, over the band the random inits span."""
    from medp2x.plots import plt

    randoms = [100 * r["knn_accuracy"] for r in table if r["verdict"] == "reference"]
    fig, ax = plt.subplots(figsize=(6.4, 3.8), dpi=120)
    ax.axhspan(min(randoms), max(randoms), color="grey", alpha=0.25, label="random-init range")
    names = [r["encoder"].replace("random init ", "random\n") for r in table]
    values = [100 * r["knn_accuracy"] for r in table]
    palette = {"reference": "grey", "low-level reference": "tan"}
    colours = [palette.get(r["verdict"], "C0") for r in table]
    ax.bar(names, values, yerr=[100 * r["standard_error"] for r in table], color=colours)
    for x, v in enumerate(values):
        ax.annotate(f"{v:.1f}", (x, v / 2), ha="center", color="white", fontweight="bold")
    ax.set_ylabel("kNN accuracy (%)")
    ax.set_title(title, fontsize=9)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main() -> None:
    args = parse_args()
    data = ImageFolderDataset(args.data, image_size=args.image_size, on_error="skip")
    bank, queries = held_out_splits(data, args.test_fraction, args.seed)
    args.classes, args.bank = data.num_classes, len(bank)
    if args.cache:  # decode every JPEG once: a fifth of a 32 px training step otherwise
        cached = CacheDataset(data, transform=None, progress=True)
        bank, queries = Subset(cached, bank.indices), Subset(cached, queries.indices)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    encoders = {
        f"random init (seed {s})": resolve_encoder("random", "resnet18", seed=args.seed + s)
        for s in range(args.random_seeds)
    }
    if args.low_level:
        encoders.update({name: build_baseline(spec) for name, spec in LOW_LEVEL.items()})
    seconds, spreads = {}, {}
    for method in args.methods:
        started = time.time()
        summary = pretrain_method(method, bank, out, args)
        seconds[method] = time.time() - started
        encoders[method] = resolve_encoder(summary.encoder_path)
        spreads[method] = summary.spread

    for bn_stats in args.bn_stats:
        evaluated = encoders
        if bn_stats == "recomputed":
            evaluated = with_recomputed_bn(encoders, bank, args.image_size)
        rows = compare_encoders(
            evaluated, bank, queries, protocol="knn", image_size=args.image_size, seed=args.seed
        )
        ranks = feature_ranks(evaluated, queries, args.image_size)
        args.bn_note = bn_stats
        text, table = report(rows, seconds, len(queries), args, spreads, ranks)
        print(text)
        stem = "methods_knn" if bn_stats == "saved" else "methods_knn_bn_recomputed"
        (out / f"{stem}.md").write_text(text + "\n")
        with open(out / f"{stem}.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(table[0]))
            writer.writeheader()
            writer.writerows(table)
        title = f"{args.iterations} it, batch {args.batch_size}, {args.image_size} px"
        plot(table, out / f"{stem}.png", f"kNN, held-out Tiny-ImageNet, {title}, {bn_stats} BN")
    if args.curve_every:
        runs = {m: curve_checkpoints(out / "runs" / m, args.curve_every) for m in args.methods}
        kwargs = dict(protocol="knn", x="iteration", image_size=args.image_size, seed=args.seed)
        convergence_figure(runs, bank, queries, out / "methods_knn_curve.png", **kwargs)


if __name__ == "__main__":
    torch.set_num_threads(2)
    main()
