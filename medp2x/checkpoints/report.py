"""What a checkpoint load did, in a form a user can read: ``LoadReport`` and its key summaries."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field


@dataclass
class LoadReport:
    """What a load did: the format, which backbone keys came from the file, which are missing,
    which file entries were left out, and the input normalisation the weights expect
    (``None``: images in [0, 1] with no mean/std, as SimCLR)."""

    path: str
    format: str
    arch: str
    loaded: list[str]
    missing: list[str]
    ignored: list[str]
    normalization: dict | None
    in_channels: int = 3
    mismatched: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    detected: bool = True

    def __str__(self) -> str:
        how = "detected from the keys" if self.detected else "as requested"
        lines = [
            f"{self.path}",
            f"  format   {self.format} ({how}); torchvision {self.arch}, {self.in_channels} input channel(s)",
            f"  loaded   {len(self.loaded)} tensors; missing {len(self.missing)}; "
            f"shape mismatches {len(self.mismatched)}",
        ]
        if self.missing:
            lines.append(f"  missing  {summarize_keys(self.missing)}")
        if self.mismatched:
            lines.append(f"  mismatch {summarize_keys(self.mismatched, group=False)}")
        lines.append(
            f"  ignored  {len(self.ignored)}"
            + (f": {summarize_keys(self.ignored)}" if self.ignored else "")
        )
        lines.append(f"  input    {describe_normalization(self.normalization)}")
        lines += [f"  note     {note}" for note in self.notes]
        return "\n".join(lines)


def describe_normalization(normalization: dict | None) -> str:
    if normalization is None:
        return "images in [0, 1], no mean/std normalisation"
    mean = ", ".join(f"{v:.4g}" for v in normalization["mean"])
    std = ", ".join(f"{v:.4g}" for v in normalization["std"])
    return f"images in [0, 1], then (x - mean) / std with mean ({mean}), std ({std})"


def summarize_keys(keys: list[str], limit: int = 8, group: bool = True) -> str:
    """A short listing: keys grouped by their leading entry (``module.encoder_k.* (320)``),
    at most ``limit`` items and a count of the rest."""
    items = _group_keys(keys) if group else list(keys)
    shown = ", ".join(items[:limit])
    return shown + (f", ... (+{len(items) - limit} more)" if len(items) > limit else "")


def _group_keys(keys: list[str]) -> list[str]:
    groups: dict[str, list[str]] = {}
    for key in keys:
        parts = re.split(r"[./]", key)
        head = (
            ".".join(parts[:2])
            if parts[0] in ("module", "model", "resnet", "experiment_state")
            else parts[0]
        )
        groups.setdefault(head, []).append(key)
    out = []
    for members in groups.values():
        if len(members) == 1:
            out.append(members[0])
            continue
        prefix = os.path.commonprefix(members)
        cut = max(prefix.rfind("."), prefix.rfind("/"))
        out.append(f"{prefix[: cut + 1]}* ({len(members)})" if cut > 0 else f"{len(members)} keys")
    return out
