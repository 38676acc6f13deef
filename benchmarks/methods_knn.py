"""Does each SSL method learn something? Brief tiny-recipe pretraining on Tiny-ImageNet
(validation split, 10k natural images, labels unused), then a kNN probe on the images of
classes held out of pretraining, against a random-init encoder measured in the same run.

    python benchmarks/methods_knn.py [--data ../shared/data/tiny_imagenet_val] [--iterations 200]

Writes ``benchmarks/results/methods_knn.md`` and ``.csv``. A method that collapses scores at
chance level (1 / classes) and is flagged.
"""

from __future__ import annotations

import argparse
import csv
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Subset

from medp2x.data.folder import ImageFolderDataset
from medp2x.engine import PretrainConfig, pretrain
from medp2x.evaluate import compare_encoders, dataset_labels, resolve_encoder, stratified_split
from medp2x.methods import METHODS

REPO = Path(__file__).resolve().parents[1]


def held_out_splits(data: ImageFolderDataset, n_classes: int, seed: int):
    """Pretraining images (classes n_classes..) and a kNN task on the other classes' images,
    never seen in pretraining (70/30 stratified)."""
    labels = dataset_labels(data)
    pretraining = np.flatnonzero(labels >= n_classes)
    keep = np.flatnonzero(labels < n_classes)
    train, test = stratified_split(labels[keep], fraction=0.3, seed=seed)
    return (
        Subset(data, pretraining.tolist()),
        Subset(data, keep[train].tolist()),
        Subset(data, keep[test].tolist()),
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--data", default=str(REPO.parent / "shared" / "data" / "tiny_imagenet_val")
    )
    parser.add_argument("--methods", nargs="+", default=list(METHODS))
    parser.add_argument("--iterations", type=int, default=200)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--classes", type=int, default=20)
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
    args = parser.parse_args()

    data = ImageFolderDataset(args.data, image_size=args.image_size, on_error="skip")
    unlabelled, train, test = held_out_splits(data, args.classes, args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    epochs = max(1, -(-args.iterations * args.batch_size // len(unlabelled)))

    encoders = {"random init": resolve_encoder("random", "resnet18", seed=args.seed)}
    seconds = {"random init": 0.0}
    for method in args.methods:
        started = time.time()
        summary = pretrain(
            PretrainConfig(
                dataset=unlabelled,
                output_dir=out / "runs" / method,
                method=method,
                profile="tiny",
                arch="resnet18",
                image_size=args.image_size,
                batch_size=args.batch_size,
                epochs=epochs,
                max_iterations=args.iterations,
                normalization="imagenet",
                seed=args.seed,
                amp=args.amp,
                lr=args.lr,
                view_options={} if args.blur_p < 0 else {"blur_p": args.blur_p},
            )
        )
        seconds[method] = time.time() - started
        encoders[method] = resolve_encoder(summary.encoder_path)
        print(
            f"{method}: loss {summary.first_loss:.3f} -> {summary.last_loss:.3f} in {seconds[method]:.0f} s"
        )

    rows = compare_encoders(
        encoders, train, test, protocol="knn", image_size=args.image_size, seed=args.seed
    )
    chance = 1.0 / args.classes
    baseline = next(r["accuracy"] for r in rows if r["encoder"] == "random init")
    lines = [
        f"kNN (k=20, cosine) on {args.classes} Tiny-ImageNet classes, {len(train)} train / {len(test)} test images, "
        f"{args.image_size} px; pretraining: tiny recipe, resnet18, {args.iterations} iterations of batch {args.batch_size}",
        "",
        "| encoder | kNN accuracy | vs random init | pretraining time (s) | verdict |",
        "|---|---|---|---|---|",
    ]
    table = []
    for row in rows:
        name, acc = row["encoder"], row["accuracy"]
        verdict = (
            "collapsed"
            if acc <= chance * 1.5
            else ("beats random" if acc > baseline else "no gain")
        )
        if name == "random init":
            verdict = "reference"
        lines.append(
            f"| {name} | {100 * acc:.1f}% | {acc / baseline:.2f}x | {seconds[name]:.0f} | {verdict} |"
        )
        table.append(
            {
                "encoder": name,
                "knn_accuracy": acc,
                "ratio_vs_random": acc / baseline,
                "seconds": seconds[name],
            }
        )
    report = "\n".join(lines)
    print(report)
    (out / "methods_knn.md").write_text(report + "\n")
    with open(out / "methods_knn.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(table[0]))
        writer.writeheader()
        writer.writerows(table)


if __name__ == "__main__":
    torch.set_num_threads(2)
    main()
