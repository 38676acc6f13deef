"""SimCLR v2 converted by Separius/SimCLRv2-Pytorch: ``{'resnet': net.* names, 'head': ...}``,
renamed to torchvision names rule by rule. SimCLR was trained on [0, 1] images without
mean/std; selective-kernel (sk1) models have no torchvision equivalent."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from pathlib import Path

from medp2x.checkpoints.formats.common import CheckpointFormat, Mapped, state_keys, unwrap

_RULES: list[tuple[re.Pattern, Callable[[re.Match], str]]] = [
    (re.compile(r"net\.0\.0\.weight"), lambda m: "conv1.weight"),
    (re.compile(r"net\.0\.1\.0\.(\w+)"), lambda m: f"bn1.{m[1]}"),
    (
        re.compile(r"net\.([1-4])\.blocks\.(\d+)\.net\.([024])\.weight"),
        lambda m: f"layer{m[1]}.{m[2]}.conv{int(m[3]) // 2 + 1}.weight",
    ),
    (
        re.compile(r"net\.([1-4])\.blocks\.(\d+)\.net\.([135])\.0\.(\w+)"),
        lambda m: f"layer{m[1]}.{m[2]}.bn{(int(m[3]) + 1) // 2}.{m[4]}",
    ),
    (
        re.compile(r"net\.([1-4])\.blocks\.(\d+)\.projection\.shortcut\.weight"),
        lambda m: f"layer{m[1]}.{m[2]}.downsample.0.weight",
    ),
    (
        re.compile(r"net\.([1-4])\.blocks\.(\d+)\.projection\.bn\.0\.(\w+)"),
        lambda m: f"layer{m[1]}.{m[2]}.downsample.1.{m[3]}",
    ),
]
SK1_NOTE = "selective-kernel (sk1) SimCLRv2 models have no torchvision equivalent; use an sk0 file"


def detect(obj: Mapping) -> bool:
    resnet = obj.get("resnet")
    if isinstance(resnet, Mapping) and any(str(k).startswith("net.") for k in resnet):
        return True
    return any(k.startswith("net.0.0.") for k in state_keys(obj))


def read(obj: Mapping, path: Path) -> Mapped:
    if isinstance(obj.get("resnet"), Mapping):
        state, source_prefix, extra = obj["resnet"], "resnet.", []
        for key, value in obj.items():  # the projection head and anything else
            if key != "resnet":
                extra += [f"{key}.{k}" for k in value] if isinstance(value, Mapping) else [str(key)]
    else:
        (state, extra), source_prefix = unwrap(obj), ""
    tensors, ignored = {}, list(extra)
    for key, value in state.items():
        key = str(key)
        for pattern, rename in _RULES:
            if m := pattern.fullmatch(key):
                tensors[rename(m)] = (source_prefix + key, value)
                break
        else:
            ignored.append(source_prefix + key)
    sk1 = any(
        "mixing_conv" in k or "shortcut.2." in k or k.startswith("net.0.2.")
        for k in map(str, state)
    )
    notes = [SK1_NOTE] if sk1 else []
    return Mapped(tensors, ignored, None, notes, hint=SK1_NOTE if sk1 else None)


FORMAT = CheckpointFormat("simclr-separius", detect, read, None)
