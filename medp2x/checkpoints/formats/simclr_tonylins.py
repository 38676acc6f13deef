"""SimCLR v1 converted by tonylins/simclr-converter: ``{'state_dict': torchvision names}`` and
nothing else. SimCLR was trained on [0, 1] images without mean/std."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from medp2x.checkpoints.formats.common import (
    CheckpointFormat,
    Mapped,
    require_mapping,
    strip_uniform,
)
from medp2x.checkpoints.formats.torchvision import has_torchvision_keys


def detect(obj: Mapping) -> bool:
    # simclr-converter saves {'state_dict': model.state_dict()} and nothing else.
    return (
        isinstance(obj.get("state_dict"), Mapping) and len(obj) == 1 and has_torchvision_keys(obj)
    )


def read(obj: Mapping, path: Path) -> Mapped:
    state = require_mapping(obj.get("state_dict"), "'state_dict'", path)
    tensors = strip_uniform(state, "module.")
    extra = [str(k) for k in obj if k != "state_dict"]
    notes = []
    if "fc.bias" in tensors:
        notes.append(
            "simclr-converter never loads fc.bias (random in the file); fc is dropped anyway"
        )
    return Mapped(tensors, extra, None, notes)


FORMAT = CheckpointFormat("simclr-tonylins", detect, read, None)
