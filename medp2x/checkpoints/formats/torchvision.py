"""torchvision: a flat state dict (``fc.*`` ignored; a uniform ``module.`` prefix stripped),
also what ``medp2x convert`` writes, whose sidecar JSON then gives the normalisation."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from medp2x.checkpoints.encoder_file import read_sidecar, sidecar_path
from medp2x.checkpoints.formats.common import (
    CheckpointFormat,
    Mapped,
    state_keys,
    strip_uniform,
    unwrap,
)
from medp2x.checkpoints.normalization import IMAGENET, plain_normalization


def has_torchvision_keys(obj: Mapping) -> bool:
    bare = [k.removeprefix("module.") for k in state_keys(obj)]
    return "conv1.weight" in bare and any(k.startswith("layer1.") for k in bare)


def read(obj: Mapping, path: Path) -> Mapped:
    state, extra = unwrap(obj)
    mapped = Mapped(strip_uniform(state, "module."), extra, IMAGENET)
    info = read_sidecar(path)
    if info is not None:
        mapped.normalization = plain_normalization(info.get("normalization"))
        mapped.notes.append(
            f"converted by medp2x from {info.get('source_format')} ({info.get('source')}); "
            f"normalisation from {sidecar_path(path).name}"
        )
    return mapped


FORMAT = CheckpointFormat("torchvision", has_torchvision_keys, read, IMAGENET)
