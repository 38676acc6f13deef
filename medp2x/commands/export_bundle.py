"""``medp2x export-bundle``: a P2X encoder as a MONAI classification bundle for MONAI Label.

Writes the model-zoo layout (configs/, models/model.pt, scripts/, docs/) with the encoder plus
a zero linear head, and the preprocessing the encoder was pretrained with (its normalisation,
gray or colour input, crop size; one 2D plane per DICOM or NIfTI file). The bundle runs
with ``python -m monai.bundle run`` (inference, fine-tuning) and in MONAI Label
(``monailabel_app/``; docs/monailabel.md).

Examples::

    medp2x export-bundle --encoder runs/p2x_xray/p2x/encoder.pt --classes normal,pneumonia \\
        --out bundles_out/chest_classification
    medp2x export-bundle --encoder stage1_resnet18_simclr64.pth --classes a,b,c \\
        --image-size 64 --out out/abc_classification
"""

from __future__ import annotations

import argparse


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "export-bundle",
        help="write a MONAI classification bundle (encoder + head) for MONAI Label",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--encoder", required=True, metavar="CKPT", help="any checkpoint medp2x reads")
    p.add_argument("--classes", required=True, help="class names, comma-separated (order = output)")
    p.add_argument(
        "--out", required=True, metavar="DIR", help="bundle folder, e.g. out/<name>_classification"
    )
    p.add_argument(
        "--image-size", type=int, help="input size in pixels (default: the pretraining run's crop)"
    )
    p.add_argument(
        "--channels",
        choices=("auto", "gray", "rgb"),
        default="auto",
        help="gray: colour inputs become luma; rgb: colour kept (default: the pretraining run's)",
    )
    p.add_argument(
        "--normalization",
        choices=("auto", "imagenet", "none"),
        default="auto",
        help="input mean/std (default: recorded with the weights)",
    )
    p.add_argument("--format", default="auto", help="checkpoint format (default: detected)")
    p.add_argument("--batch-size", type=int, default=8, help="fine-tuning batch size (default 8)")
    p.add_argument("--epochs", type=int, default=20, help="fine-tuning epochs (default 20)")
    p.add_argument("--force", action="store_true", help="replace an existing bundle at --out")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from medp2x.label.export import describe, export_bundle

    out = export_bundle(
        args.encoder,
        args.classes,
        args.out,
        image_size=args.image_size,
        channels=args.channels,
        normalization=args.normalization,
        checkpoint_format=args.format,
        batch_size=args.batch_size,
        epochs=args.epochs,
        force=args.force,
    )
    print(describe(out))
    return 0
