"""What a checkpoint format declares (``CheckpointFormat``) and the helpers its mapper uses.

A mapper turns a loaded file object into ``Mapped``: ``{torchvision name: (source name,
array)}``, the file entries it left out, the normalisation the weights expect and notes for the
report. Shape checks and assembly happen once, in ``checkpoints.assembly``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np


@dataclass
class Mapped:
    tensors: dict[str, tuple[str, Any]]
    ignored: list[str]
    normalization: dict | None
    notes: list[str] = field(default_factory=list)
    arch: str | None = None
    hint: str | None = None  # added to the error when the backbone is incomplete


@dataclass(frozen=True)
class CheckpointFormat:
    """One publisher's layout: how to recognise it, how to map it, what its inputs need.

    ``detect(obj)`` is asked in the registry's order (``formats.REGISTRY``) and says whether a
    loaded dict is in this layout; ``read(obj, path)`` maps it. ``normalization`` is what the
    publisher's training used (``None``: [0, 1] images without mean/std)."""

    name: str
    detect: Callable[[Mapping], bool]
    read: Callable[[Mapping, Path], Mapped]
    normalization: dict | None


def require_mapping(value: Any, what: str, path: Path) -> Mapping:
    if not isinstance(value, Mapping):
        raise ValueError(
            f"{path}: expected {what} to be a dict of tensors, found {type(value).__name__}"
        )
    return value


def unwrap(obj: Mapping) -> tuple[Mapping, list[str]]:
    """The state dict (under ``state_dict`` or the object itself) and the other top-level
    entries (epoch, arch, optimizer, ...), which are ignored."""
    if isinstance(obj.get("state_dict"), Mapping):
        return obj["state_dict"], [str(k) for k in obj if k != "state_dict"]
    return obj, []


def state_keys(obj: Mapping) -> list[str]:
    """The key names of the state dict ``unwrap`` finds."""
    return [str(k) for k in unwrap(obj)[0]]


def strip_uniform(state: Mapping, prefix: str) -> dict[str, tuple[str, Any]]:
    """{name without ``prefix``: (source name, value)}, stripping only when every key has it
    (``module.`` from DistributedDataParallel)."""
    keys = [str(k) for k in state]
    strip = bool(keys) and all(k.startswith(prefix) for k in keys)
    return {
        (k.removeprefix(prefix) if strip else k): (k, v)
        for k, v in zip(keys, state.values(), strict=True)
    }


def as_array(value: Any, source: str, path: Path) -> np.ndarray:
    if isinstance(value, np.ndarray):
        return value
    if isinstance(value, int | float | np.generic):
        return np.asarray(value)
    raise ValueError(f"{path}: {source} is a {type(value).__name__}, not an array")
