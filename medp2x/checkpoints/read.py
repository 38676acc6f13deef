"""The public entry points: any supported checkpoint file -> torchvision backbone + report.

load the raw object safely (``load``) -> pick the format (``formats``) -> map its keys ->
check and assemble against torchvision's shapes (``assembly``) -> adapt the stem (``stems``).
"""

from __future__ import annotations

from pathlib import Path

import torch

from medp2x.checkpoints.assembly import assemble
from medp2x.checkpoints.formats import detect_format, get_format
from medp2x.checkpoints.load import load_file
from medp2x.checkpoints.report import LoadReport
from medp2x.checkpoints.stems import GRAY_MODES, adapt_stem
from medp2x.networks import build_encoder


def read_checkpoint(
    path: str | Path,
    format: str = "auto",
    allow_partial: bool = False,
    in_channels: int | None = 3,
    gray: str = "sum",
    arch: str | None = None,
) -> tuple[dict[str, torch.Tensor], LoadReport]:
    """torchvision-layout backbone state dict (no ``fc``) and a ``LoadReport`` from any
    supported file. Strict unless ``allow_partial``: a missing backbone tensor or a shape that
    differs from torchvision's ``arch`` (inferred when None) raises ``ValueError``.

    ``in_channels=1`` turns an RGB stem into a gray one: ``gray="sum"`` sums the three input
    filters (folding a per-channel mean/std into the filters and ``bn1``), ``gray="repeat"``
    keeps the 3-channel stem for gray images repeated to 3 channels (``report.in_channels``
    is then 3).
    """
    if format != "auto":
        get_format(format)  # an unknown name fails before the file is read
    if gray not in GRAY_MODES:
        raise ValueError(f"gray must be one of {', '.join(GRAY_MODES)}, not {gray!r}")
    if in_channels not in (1, 3, None):
        raise ValueError(f"in_channels must be 1, 3 or None (as stored), not {in_channels}")
    path = Path(path)
    obj = load_file(path)
    fmt = detect_format(obj, path) if format == "auto" else format
    mapped = get_format(fmt).read(obj, path)
    state, report = assemble(path, fmt, mapped, arch, allow_partial)
    report.detected = format == "auto"
    state = adapt_stem(path, state, report, in_channels, gray)
    return state, report


def load_encoder(
    path: str | Path,
    arch: str | None = None,
    in_channels: int | None = 3,
    format: str = "auto",
    allow_partial: bool = False,
    gray: str = "sum",
) -> tuple[torch.nn.Module, LoadReport]:
    """A torchvision ResNet (``fc`` = Identity, ``.feature_dim``) with the file's weights, and
    the report (its ``normalization`` is what the encoder's inputs need)."""
    state, report = read_checkpoint(path, format, allow_partial, in_channels, gray, arch=arch)
    if allow_partial:  # what the file lacks keeps torchvision's random initialisation
        encoder = build_encoder(report.arch, report.in_channels)
        encoder.load_state_dict(state, strict=False)
        return encoder, report
    with torch.device("meta"):  # every tensor comes from the file: skip the random init
        encoder = build_encoder(report.arch, report.in_channels)
    encoder.load_state_dict(state, strict=True, assign=True)
    return encoder, report
