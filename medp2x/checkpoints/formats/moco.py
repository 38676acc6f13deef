"""MoCo (facebookresearch/moco): ``{'state_dict': {module.encoder_q.*, module.encoder_k.*,
module.queue, module.queue_ptr}, 'epoch', 'arch', 'optimizer'}``; kept: encoder_q minus fc."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from medp2x.checkpoints.formats.common import CheckpointFormat, Mapped, state_keys, unwrap
from medp2x.checkpoints.normalization import IMAGENET

PREFIXES = ("module.encoder_q.", "encoder_q.")


def detect(obj: Mapping) -> bool:
    return any(k.startswith(PREFIXES) for k in state_keys(obj))


def read(obj: Mapping, path: Path) -> Mapped:
    state, extra = unwrap(obj)
    prefix = next((p for p in PREFIXES if any(str(k).startswith(p) for k in state)), None)
    if prefix is None:
        raise ValueError(f"{path}: no module.encoder_q.* keys: not a MoCo checkpoint")
    tensors, ignored = {}, list(extra)
    for key, value in state.items():
        key = str(key)
        name = key.removeprefix(prefix)
        if key.startswith(prefix) and not name.startswith("fc."):
            tensors[name] = (key, value)
        else:
            ignored.append(key)
    return Mapped(tensors, ignored, IMAGENET)


FORMAT = CheckpointFormat("moco", detect, read, IMAGENET)
