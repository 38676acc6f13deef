"""``medp2x surgery``: scale exploding weights and replace dead filters of a checkpoint.

Reads any checkpoint format medp2x understands, applies the weight surgery of Ciga et al.
(§3; see docs/surgery.md), prints the before/after report, and writes the repaired backbone
as a torchvision-layout ``state_dict`` (``torch.save``, written atomically) with a ``OUT.json``
sidecar naming the input normalisation the weights expect, which ``read_checkpoint`` reads back.

Examples::

    medp2x surgery simclr_r50.pth simclr_r50_p2x.pth
    medp2x surgery swav.pth swav_p2x.pth --scale per_layer --filters random --seed 1 --plot norms.png
"""

from __future__ import annotations

import argparse

import torch

from medp2x.commands.inspect import add_reading_options, read_backbone
from medp2x.surgery import DEFAULT_SCALE, FILTER_MODES, SCALE_MODES


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "surgery",
        help="weight surgery before second-stage pretraining (norm scaling, dead filters)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("input", metavar="IN", help="checkpoint to repair (any format medp2x reads)")
    p.add_argument("output", metavar="OUT", help="where to write the torchvision-layout state_dict")
    p.add_argument(
        "--scale",
        choices=SCALE_MODES,
        default=DEFAULT_SCALE,
        help=f"Frobenius-norm scaling (default {DEFAULT_SCALE})",
    )
    p.add_argument(
        "--filters",
        choices=FILTER_MODES,
        default="copy",
        help="dead-filter replacement (default copy)",
    )
    p.add_argument(
        "--seed", type=int, default=0, help="seed for the choice of copied / random filters"
    )
    p.add_argument(
        "--eps-exact",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="fold BatchNorm's eps into gamma so the eval-mode output is exactly preserved "
        "(--no-eps-exact: the paper's gamma/sqrt(s) verbatim)",
    )
    p.add_argument("--csv", metavar="FILE", help="before/after statistics per layer")
    p.add_argument("--plot", metavar="PNG", help="histogram of filter norms before and after")
    add_reading_options(p)
    p.set_defaults(func=run)


def build_model(path: str, state_dict: dict[str, torch.Tensor], loaded) -> torch.nn.Module:
    """The torchvision ResNet the loader recognised, with the file's weights."""
    from medp2x.networks import build_encoder

    encoder = build_encoder(loaded.arch, in_channels=loaded.in_channels)
    try:
        encoder.load_state_dict(state_dict, strict=True)
    except RuntimeError as err:
        raise ValueError(f"{path}: weights do not fit a torchvision {loaded.arch}: {err}") from err
    return encoder


def run(args: argparse.Namespace) -> int:
    from medp2x.checkpoints import export_state_dict, sidecar_path
    from medp2x.surgery import apply_surgery

    state_dict, loaded = read_backbone(args.input, args.format)
    encoder = build_model(args.input, state_dict, loaded)
    report = apply_surgery(
        encoder,
        scale=args.scale,
        filters=args.filters,
        threshold=args.threshold,
        dead_threshold=args.dead_threshold,
        seed=args.seed,
        eps_exact=args.eps_exact,
    )
    print(f"{report}\n")
    out = export_state_dict(args.output, encoder.state_dict(), loaded)
    print(f"wrote {out} (torchvision layout) and {sidecar_path(out)} (input normalisation, origin)")
    if args.csv:
        print(f"statistics: {report.write_csv(args.csv)}")
    if args.plot:
        print(f"plot: {report.plot(args.plot)}")
    return 0
