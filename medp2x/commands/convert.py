"""``medp2x convert``: any supported checkpoint -> a torchvision-layout ResNet state dict.

Reads SwAV, MoCo v2, SimCLR (tonylins/simclr-converter or Separius/SimCLRv2-Pytorch), BYOL's
Haiku pickle, torchvision and medp2x files (format detected from the keys unless --format),
checks every backbone tensor against torchvision's shapes, prints what was loaded, missing and
ignored and the input normalisation the weights expect, and writes ``OUT`` with ``torch.save``
(atomically) plus ``OUT.json`` holding that normalisation. Nothing in the input file is run.

Examples::

    medp2x convert swav_800ep_pretrain.pth.tar swav_r50.pth
    medp2x convert pretrain_res50x1.pkl byol_r50.pth
    medp2x convert r50_1x_sk0.pth simclr2_r50_gray.pth --in-channels 1 --gray sum
    medp2x convert moco_v2_800ep_pretrain.pth.tar moco_r50.pth --format moco --allow-partial
"""

from __future__ import annotations

import argparse

from medp2x.checkpoints import FORMATS

FORMAT_CHOICES = ("auto", *FORMATS)


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "convert",
        help="convert SwAV/MoCo/SimCLR/BYOL/torchvision/medp2x weights to a torchvision state dict",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("input", metavar="IN", help="checkpoint file in any supported format")
    p.add_argument("output", metavar="OUT", help="where to write the torchvision-layout state dict")
    p.add_argument(
        "--format", default="auto", choices=FORMAT_CHOICES, help="input layout (default: detected)"
    )
    p.add_argument(
        "--arch", default=None, help="torchvision architecture (default: inferred from the weights)"
    )
    p.add_argument(
        "--allow-partial",
        action="store_true",
        help="write what matches even when backbone tensors are missing or differ in shape",
    )
    p.add_argument(
        "--in-channels",
        type=int,
        default=3,
        choices=(1, 3),
        help="1: build a gray stem from the RGB one (see --gray)",
    )
    p.add_argument(
        "--gray",
        default="sum",
        choices=("sum", "repeat"),
        help="sum: 1-channel stem (RGB filters summed, mean/std folded in); "
        "repeat: keep the 3-channel stem and repeat gray images to 3 channels",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from medp2x.checkpoints import export_state_dict, read_checkpoint, sidecar_path

    state_dict, report = read_checkpoint(
        args.input,
        format=args.format,
        allow_partial=args.allow_partial,
        in_channels=args.in_channels,
        gray=args.gray,
        arch=args.arch,
    )
    print(report)
    out = export_state_dict(args.output, state_dict, report)
    print(
        f"wrote {out}: {len(state_dict)} tensors, torchvision {report.arch} layout without fc, "
        f"{report.in_channels} input channel(s); normalisation recorded in {sidecar_path(out)}"
    )
    return 0
