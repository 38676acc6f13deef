"""The registry of checkpoint formats: one module per publisher, one line per format here.

Each module in this package declares ``FORMAT = CheckpointFormat(name, detect, read,
normalization)``. ``REGISTRY`` is also the detection order: the first format whose ``detect``
accepts a file wins, so more specific layouts come before the generic ``torchvision`` one
(a MoCo or SwAV file also has torchvision-like keys; a SimCLR-converter file is a wrapped
torchvision dict). Adding a format: docs/checkpoints.md, "Adding a checkpoint format".
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from medp2x.checkpoints.formats import (
    byol,
    medp2x,
    moco,
    simclr_separius,
    simclr_tonylins,
    swav,
    torchvision,
)
from medp2x.checkpoints.formats.common import CheckpointFormat, state_keys

REGISTRY: dict[str, CheckpointFormat] = {
    f.name: f
    for f in (
        medp2x.FORMAT,
        byol.FORMAT,
        moco.FORMAT,
        swav.FORMAT,
        simclr_separius.FORMAT,
        simclr_tonylins.FORMAT,
        torchvision.FORMAT,
    )
}
FORMATS = tuple(REGISTRY)


def get_format(name: str) -> CheckpointFormat:
    if name not in REGISTRY:
        raise ValueError(
            f"unknown checkpoint format {name!r}; choose auto or one of {', '.join(FORMATS)}"
        )
    return REGISTRY[name]


def detect_format(obj: Any, path: str | Path = "<checkpoint>") -> str:
    """The format of a loaded checkpoint object, from its structure and key names."""
    if not isinstance(obj, Mapping):
        raise ValueError(f"{path}: expected a dict of weights, found {type(obj).__name__}")
    for fmt in REGISTRY.values():
        if fmt.detect(obj):
            return fmt.name
    preview = ", ".join(state_keys(obj)[:5])
    raise ValueError(
        f"{path}: cannot tell the checkpoint format from its keys ({preview}, ...); "
        f"pass format= one of {', '.join(FORMATS)}"
    )
