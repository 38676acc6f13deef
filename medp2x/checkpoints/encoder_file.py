"""Files medp2x writes for weights: its encoder file and converted state dicts with a sidecar.

An encoder file keeps the normalisation (and arch, channels, method) with the weights, which a
bare state dict cannot; ``medp2x convert`` writes a bare torchvision state dict for other tools
and records the same facts in ``<file>.json`` beside it, which the loader picks up.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import torch

from medp2x import __version__
from medp2x.atomic import atomic_torch_save, atomic_write_text
from medp2x.checkpoints.normalization import plain_normalization
from medp2x.checkpoints.report import LoadReport

ENCODER_FILE_VERSION = 1
SIDECAR_WRITER = "medp2x convert"


def save_encoder(
    path: str | Path,
    state_dict: Mapping[str, torch.Tensor],
    arch: str,
    in_channels: int,
    normalization: dict | None,
    method: str | None = None,
    version: str | None = None,
) -> Path:
    """Write a medp2x encoder file atomically: ``{"medp2x": {version, arch, in_channels,
    normalization, method, file_version}, "state_dict": backbone without fc}``."""
    meta = {
        "version": version or __version__,
        "file_version": ENCODER_FILE_VERSION,
        "arch": arch,
        "in_channels": int(in_channels),
        "normalization": plain_normalization(normalization),
        "method": method,
    }
    tensors = {
        k: v.detach().cpu().contiguous() for k, v in state_dict.items() if not k.startswith("fc.")
    }
    return atomic_torch_save({"medp2x": meta, "state_dict": tensors}, path)


def export_state_dict(
    path: str | Path, state_dict: Mapping[str, torch.Tensor], report: LoadReport
) -> Path:
    """Write a bare torchvision-layout state dict (readable by any tool) and, beside it,
    ``<path>.json`` with the normalisation and origin, which ``read_checkpoint`` picks up so
    converted SimCLR weights are not mistaken for ImageNet-normalised ones."""
    path = atomic_torch_save({k: v.contiguous() for k, v in state_dict.items()}, path)
    sidecar = {
        "written_by": SIDECAR_WRITER,
        "medp2x_version": __version__,
        "source": Path(report.path).name,
        "source_format": report.format,
        "arch": report.arch,
        "in_channels": report.in_channels,
        "normalization": report.normalization,
    }
    atomic_write_text(sidecar_path(path), json.dumps(sidecar, indent=2) + "\n")
    return path


def sidecar_path(path: str | Path) -> Path:
    return Path(f"{path}.json")


def read_sidecar(path: str | Path) -> dict | None:
    """The ``medp2x convert`` metadata beside ``path``, or None when there is none (a JSON
    file written by something else is not ours and is left alone)."""
    sidecar = sidecar_path(path)
    if not sidecar.is_file():
        return None
    try:
        info = json.loads(sidecar.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"{sidecar}: unreadable medp2x convert metadata ({err})") from err
    if not isinstance(info, dict) or info.get("written_by") != SIDECAR_WRITER:
        return None
    return info
