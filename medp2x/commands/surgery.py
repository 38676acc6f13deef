"""``medp2x surgery``: scale exploding weights and replace dead filters of a checkpoint.

Reads any checkpoint format medp2x understands, applies the weight surgery of Ciga et al.
(§3; see docs/surgery.md), prints the before/after report, and writes the repaired backbone
as a torchvision-layout ``state_dict`` (``torch.save``, written atomically) with a ``OUT.json``
sidecar naming the input normalisation the weights expect, which ``read_checkpoint`` reads back.

Tensors surgery does not transform (a torchvision classifier's ``fc``, a SwAV projection head
and prototypes) are written unchanged beside the backbone, under the file's own names less a
uniform ``module.`` prefix; ``--backbone-only`` drops them. Entries of files that nest another
network (MoCo's momentum encoder, BYOL's target network, SimCLRv2's head) have no place in a
torchvision-layout file and are dropped, with a line saying how many.

Examples::

    medp2x surgery simclr_r50.pth simclr_r50_p2x.pth
    medp2x surgery swav.pth swav_p2x.pth --scale per_layer --filters random --seed 1 --plot norms.png
"""

from __future__ import annotations

import argparse
from pathlib import Path

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
    p.add_argument(
        "--backbone-only",
        action="store_true",
        help="write the backbone alone (default: tensors surgery does not touch, such as fc, "
        "are kept unchanged)",
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


# Formats whose file is one flat state dict: what the backbone does not use keeps its meaning
# in the written torchvision-layout file (read back, it is ignored again, and detected the same).
FLAT_FORMATS = ("torchvision", "simclr-tonylins", "swav")


def untouched_tensors(path: str, loaded, backbone: dict[str, torch.Tensor]) -> dict:
    """The file's tensors that surgery leaves alone (``fc``, heads), by name, unchanged."""
    from medp2x.checkpoints import load_file

    if loaded.format not in FLAT_FORMATS:
        return {}
    obj = load_file(path)
    state = obj["state_dict"] if isinstance(obj.get("state_dict"), dict) else obj
    keys = [str(k) for k in state]
    strip = bool(keys) and all(k.startswith("module.") for k in keys)
    kept = {}
    for key, value in state.items():
        name = str(key).removeprefix("module.") if strip else str(key)
        if name not in backbone and isinstance(value, torch.Tensor):
            kept[name] = value.contiguous()
    return kept


def check_output_file(path: str) -> None:
    """OUT must be a file name whose folder exists or can be made: not a folder, not under a
    file."""
    out = Path(path)
    if out.is_dir():
        raise ValueError(
            f"cannot write {out}: it is a folder; give a file name, e.g. {out}/p2x.pth"
        )
    parent = next((p for p in out.parents if p.exists()), None)
    if parent is not None and not parent.is_dir():
        raise ValueError(f"cannot write {out}: {parent} is a file, not a folder")


def run(args: argparse.Namespace) -> int:
    from medp2x.checkpoints import export_state_dict, sidecar_path
    from medp2x.surgery import apply_surgery

    check_output_file(args.output)  # before the work: a wrong OUT is found at once
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
    written = encoder.state_dict()
    if not args.backbone_only:
        kept = untouched_tensors(args.input, loaded, written)
        written.update(kept)
        dropped = len(loaded.ignored) - len(kept)
        print(
            f"kept {len(kept)} tensor(s) surgery does not touch"
            + (
                f" ({', '.join(sorted(kept)[:4])}{', ...' if len(kept) > 4 else ''})"
                if kept
                else ""
            )
            + (
                f"; dropped {dropped} other entr(ies) of the {loaded.format} file"
                if dropped
                else ""
            )
            + " (--backbone-only drops them all)"
        )
    out = export_state_dict(args.output, written, loaded)
    print(f"wrote {out} (torchvision layout) and {sidecar_path(out)} (input normalisation, origin)")
    if args.csv:
        print(f"statistics: {report.write_csv(args.csv)}")
    if args.plot:
        print(f"plot: {report.plot(args.plot)}")
    return 0
