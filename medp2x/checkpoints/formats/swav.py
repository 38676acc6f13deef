"""SwAV (facebookresearch/swav): flat (or under ``state_dict``) with ``module.``;
``projection_head.*`` and ``prototypes.*`` ignored. SwAV's own training and evaluation code
normalises with std 0.228 for red (main_swav.py)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from medp2x.checkpoints.formats.common import (
    CheckpointFormat,
    Mapped,
    state_keys,
    strip_uniform,
    unwrap,
)

SWAV_NORMALIZATION = {"mean": [0.485, 0.456, 0.406], "std": [0.228, 0.224, 0.225]}
HEADS = ("projection_head.", "prototypes.")


def detect(obj: Mapping) -> bool:
    return any(k.removeprefix("module.").startswith(HEADS) for k in state_keys(obj))


def read(obj: Mapping, path: Path) -> Mapped:
    state, extra = unwrap(obj)
    tensors = strip_uniform(state, "module.")
    heads = {k: v for k, v in tensors.items() if k.startswith(HEADS)}
    kept = {k: v for k, v in tensors.items() if k not in heads}
    return Mapped(kept, extra + [src for src, _ in heads.values()], SWAV_NORMALIZATION)


FORMAT = CheckpointFormat("swav", detect, read, SWAV_NORMALIZATION)
