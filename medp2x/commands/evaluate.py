"""``medp2x evaluate``: compare encoders downstream (Tables 2-3) and plot convergence (Figs. 2-3).

Examples::

    medp2x evaluate --data eurosat/ --encoder random --encoder p2x/encoder.pt \\
        --name Random --name P2X --protocol finetune --label-fraction --draws 3 --out results/
    medp2x evaluate --data pneumoniamnist.npz --series P1X=runs/p1x --series P2X=runs/p2x \\
        --protocol linear --image-size 64 --out figs/

The test split belongs to the dataset (--test-data, the .npz test split, or a fixed held-out
split), never to --seed; an encoder whose pretraining run saw a test image is refused.
"""

from __future__ import annotations

import argparse
import logging
import shlex
from pathlib import Path

from medp2x.eval.settings import NORMALIZATIONS, PROTOCOLS, SELECTIONS
from medp2x.metrics import METRICS


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "evaluate",
        help="downstream evaluation: fine-tune, linear probe, kNN; tables and convergence plots",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    data = p.add_argument_group("data")
    data.add_argument("--data", required=True, help="class-per-folder image set or MedMNIST .npz")
    data.add_argument(
        "--val-data",
        help="validation set for --selection val (default: the .npz 'val' split)",
    )
    data.add_argument(
        "--test-data",
        help="test set (default: the .npz 'test' split, else a stratified --test-fraction of "
        "each class held out from --data with the registry's fixed split seed)",
    )
    data.add_argument("--test-fraction", type=float, default=0.2)
    data.add_argument("--gray", action="store_true", help="read folder images as one channel")
    data.add_argument("--on-error", "--on_error", choices=("raise", "skip"), default="raise")

    enc = p.add_argument_group("encoders")
    enc.add_argument(
        "--encoder",
        action="append",
        default=[],
        metavar="CKPT|random|colour_histogram|tiny_image",
        help="an encoder file, 'random', or a low-level reference: 'colour_histogram' (64-bin "
        "RGB histogram), 'tiny_image' (4 x 4 pixels); repeatable",
    )
    enc.add_argument("--name", action="append", default=[], help="display name per --encoder")
    enc.add_argument(
        "--reference",
        action="append",
        metavar="NAME",
        help="encoder (display name) every other one's paired difference is taken against "
        "(repeatable; default: the 'random' encoder, else the first)",
    )
    enc.add_argument(
        "--allow-test-overlap",
        action="store_true",
        help="score an encoder whose pretraining run saw test images (the table says so)",
    )
    enc.add_argument(
        "--series",
        action="append",
        default=[],
        metavar="NAME=RUN_DIR",
        help="checkpoints of a pretraining run to plot against progress (repeatable)",
    )
    enc.add_argument(
        "--x",
        choices=("epoch", "iteration"),
        default="epoch",
        help="progress axis of the convergence figure",
    )
    enc.add_argument("--arch", default="resnet18", help="architecture of 'random' encoders")
    enc.add_argument(
        "--normalization",
        choices=NORMALIZATIONS,
        default="auto",
        help="input normalisation of file encoders (auto: what the file says)",
    )

    proto = p.add_argument_group("protocol")
    proto.add_argument(
        "--protocol",
        action="append",
        choices=PROTOCOLS,
        help="finetune, linear or knn (repeatable; default linear)",
    )
    proto.add_argument(
        "--label-fraction",
        type=float,
        nargs="?",
        const=0.1,
        default=1.0,
        help="fraction of training labels per draw (flag alone: 0.1)",
    )
    proto.add_argument("--draws", type=int, help="label draws (default 3 with a fraction < 1)")
    proto.add_argument("--disjoint", action="store_true", help="draws share no sample")
    proto.add_argument(
        "--selection",
        choices=SELECTIONS,
        default="none",
        help="none: fixed epochs / probe strength, the final model (the paper's); draw: select "
        "on --val-fraction of each draw, train on the rest; val: select on --val-data",
    )
    proto.add_argument(
        "--val-fraction",
        type=float,
        default=0.1,
        help="--selection draw: fraction of each draw held out for selection",
    )
    proto.add_argument(
        "--image-size",
        type=int,
        help="S: shorter side resized to S, centre S x S crop (fine-tuning: random-resized "
        "crops of S x S)",
    )
    proto.add_argument(
        "--crop-scale",
        type=float,
        default=0.08,
        help="fine-tuning random-resized crop: smallest area fraction",
    )
    proto.add_argument("--epochs", type=int, default=20, help="fine-tuning epochs")
    proto.add_argument("--batch-size", type=int, default=64)
    proto.add_argument("--lr", type=float, default=3e-4, help="fine-tuning Adam learning rate")
    proto.add_argument("--weight-decay", type=float, default=1e-4, help="fine-tuning weight decay")
    proto.add_argument(
        "--linear-weight-decay",
        type=float,
        help="linear probe L2 strength without selection (default 1/n: sklearn's C = 1)",
    )
    proto.add_argument("--knn-k", type=int, default=20)
    proto.add_argument("--knn-temperature", type=float, default=0.07)
    proto.add_argument(
        "--bn-stats",
        choices=("saved", "recomputed"),
        default="saved",
        help="linear/kNN: use the encoder's BN statistics as saved, or re-average them over "
        "the training images first (PreciseBN / AdaBN; labels unused)",
    )
    proto.add_argument(
        "--select-metric",
        choices=METRICS,
        default="accuracy",
        help="metric choosing the epoch / probe strength (--selection draw or val)",
    )
    proto.add_argument(
        "--bootstrap",
        type=int,
        default=2000,
        help="bootstrap resamples of the intervals (0: none)",
    )

    run = p.add_argument_group("run")
    run.add_argument(
        "--out", required=True, help="output folder (results.md, results.csv, results.png)"
    )
    run.add_argument("--device", default="cpu")
    run.add_argument(
        "--seed",
        type=int,
        default=0,
        help="label draws, fine-tuning and bootstrap (never the test split)",
    )
    run.add_argument("--num-workers", type=int, default=0)
    run.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    from medp2x.eval.convergence import convergence_figure
    from medp2x.eval.report import format_differences, format_table, write_results
    from medp2x.eval.run import load_datasets, run_evaluation

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if not args.encoder and not args.series:
        raise ValueError("give at least one --encoder or --series")
    if len(args.name) > len(args.encoder):
        raise ValueError(f"{len(args.name)} --name for {len(args.encoder)} --encoder")
    draws = args.draws or (3 if args.label_fraction < 1.0 else 1)
    command = "medp2x " + shlex.join(getattr(args, "argv", None) or ["evaluate", "..."])
    kwargs = dict(
        protocol=args.protocol or ["linear"],
        label_fraction=args.label_fraction,
        draws=draws,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        device=args.device,
        seed=args.seed,
        progress=not args.no_progress,
        selection=args.selection,
        disjoint=args.disjoint,
        val_fraction=args.val_fraction,
        image_size=args.image_size,
        crop_scale=args.crop_scale,
        arch=args.arch,
        normalization=args.normalization,
        weight_decay=args.weight_decay,
        linear_weight_decay=args.linear_weight_decay,
        knn_k=args.knn_k,
        knn_temperature=args.knn_temperature,
        select_metric=args.select_metric,
        num_workers=args.num_workers,
        bn_stats=args.bn_stats,
        bootstrap=args.bootstrap,
        allow_test_overlap=args.allow_test_overlap,
    )
    out = Path(args.out)
    if args.encoder:
        rows = run_evaluation(
            args.data,
            _named_encoders(args.encoder, args.name),
            out,
            val_data=args.val_data,
            test_data=args.test_data,
            test_fraction=args.test_fraction,
            gray=args.gray,
            on_error=args.on_error,
            command=command,
            reference=args.reference or "auto",
            **kwargs,
        )
        print(format_table(rows))
        differences = format_differences(rows)
        if differences:
            print(f"\nPaired differences (* : 95% interval excludes 0)\n{differences}")
        print(f"\nwrote {out / 'results.md'}, {out / 'results.csv'} and {out / 'results.png'}")
    if args.series:
        train, val, test, note = load_datasets(
            args.data, args.val_data, args.test_data, args.test_fraction, args.gray, args.on_error
        )
        protocol = kwargs.pop("protocol")
        if len(protocol) != 1:
            raise ValueError("a convergence figure takes exactly one --protocol")
        png, csv_path, rows = convergence_figure(
            _parse_series(args.series),
            train,
            test,
            out / "convergence.png",
            val=val,
            protocol=protocol[0],
            x=args.x,
            reference=None,
            **kwargs,
        )
        for row in rows:
            row["test_source"] = note
        md, _ = write_results(
            rows,
            out,
            title="Downstream accuracy per pretraining checkpoint",
            command=command,
            stem="convergence_results",
            figure=False,
        )
        print(format_table(rows))
        print(f"\nwrote {png}, {csv_path} and {md}")
    return 0


def _named_encoders(specs: list[str], names: list[str]) -> dict[str, str]:
    """Display names: given ones first, then the file stem (or 'random'), made unique."""
    from medp2x.baselines import BASELINES
    from medp2x.eval.encoders import encoder_name

    encoders: dict[str, str] = {}
    for i, spec in enumerate(specs):
        if spec != "random" and spec not in BASELINES and not Path(spec).exists():
            raise FileNotFoundError(
                f"encoder {spec!r} does not exist (give a file, 'random' or one of "
                f"{', '.join(BASELINES)})"
            )
        base = names[i] if i < len(names) else encoder_name(spec)
        name, n = base, 2
        while name in encoders:
            name, n = f"{base} ({n})", n + 1
        encoders[name] = spec
    return encoders


def _parse_series(items: list[str]) -> dict[str, str]:
    series = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"--series expects NAME=RUN_DIR, got {item!r}")
        series[name] = path
    return series
