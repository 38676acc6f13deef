"""Assembly: a mapped checkpoint checked against torchvision's shapes, strict or partial.

Every format's mapper ends here, so the rules are the same for all: the architecture is
inferred from block counts (or given), each backbone tensor must match torchvision's shape,
``num_batches_tracked`` may be absent (set to 0), weights become float32.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medp2x.checkpoints.formats.common import Mapped, as_array
from medp2x.checkpoints.report import LoadReport, summarize_keys
from medp2x.networks import ARCHS, build_encoder


def infer_arch(state_dict: Mapping[str, Any]) -> str:
    """The torchvision ResNet a torchvision-layout state dict belongs to, from its block counts,
    block type and widths."""
    blocks = []
    for layer in range(1, 5):
        indices = {int(m[1]) for k in state_dict if (m := re.match(rf"layer{layer}\.(\d+)\.", k))}
        blocks.append(max(indices) + 1 if indices else 0)
    bottleneck = "layer1.0.conv3.weight" in state_dict
    table = {
        (False, (2, 2, 2, 2)): "resnet18",
        (False, (3, 4, 6, 3)): "resnet34",
        (True, (3, 4, 6, 3)): "resnet50",
        (True, (3, 4, 23, 3)): "resnet101",
        (True, (3, 8, 36, 3)): "resnet152",
    }
    arch = table.get((bottleneck, tuple(blocks)))
    if arch is None:
        kind = "bottleneck" if bottleneck else "basic"
        raise ValueError(
            f"not a torchvision ResNet: {kind} blocks per stage {tuple(blocks)} "
            f"(supported: {', '.join(ARCHS)}); pass arch= to force one"
        )
    if arch == "resnet50" and _out_channels(state_dict, "layer1.0.conv3.weight") == 256:
        if _out_channels(state_dict, "layer1.0.conv1.weight") == 128:
            return "wide_resnet50_2"
    return arch


def _out_channels(state_dict: Mapping[str, Any], key: str) -> int | None:
    value = state_dict.get(key)
    return int(value.shape[0]) if value is not None and len(value.shape) else None


def _as_tensor(value: Any, source: str, path: Path) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value.detach()
    return torch.from_numpy(np.array(as_array(value, source, path), order="C", copy=True))


@lru_cache(maxsize=16)
def _reference_shapes(arch: str, in_channels: int) -> dict[str, tuple[int, ...]]:
    """torchvision's state-dict shapes for ``arch`` (built on the meta device: no memory)."""
    with torch.device("meta"):
        encoder = build_encoder(arch, in_channels)
    return {k: tuple(v.shape) for k, v in encoder.state_dict().items()}


def assemble(
    path: Path, fmt: str, mapped: Mapped, arch: str | None, allow_partial: bool
) -> tuple[dict[str, torch.Tensor], LoadReport]:
    arrays = {name: value for name, (_, value) in mapped.tensors.items() if hasattr(value, "shape")}
    stem = arrays.get("conv1.weight")
    stem_channels = int(stem.shape[1]) if stem is not None and len(stem.shape) == 4 else 3
    if arch is None:
        try:
            arch = mapped.arch if mapped.arch in ARCHS else infer_arch(arrays)
        except ValueError as err:
            raise ValueError(f"{path}: {fmt} checkpoint: {err}") from None
    elif arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; choose one of {', '.join(ARCHS)}")
    expected = _reference_shapes(arch, stem_channels)
    tensors = {
        name: _as_tensor(value, src, path)
        for name, (src, value) in mapped.tensors.items()
        if name in expected
    }
    loaded, missing, mismatched = [], [], []
    for name, shape in expected.items():
        if name not in tensors:
            if not name.endswith("num_batches_tracked"):
                missing.append(name)
        elif tuple(tensors[name].shape) != shape:
            mismatched.append(f"{name} (file {tuple(tensors[name].shape)}, {arch} {shape})")
        else:
            loaded.append(name)
    ignored = mapped.ignored + [
        src for name, (src, _) in mapped.tensors.items() if name not in expected
    ]
    notes = list(mapped.notes)
    if (missing or mismatched) and not allow_partial:
        problems = []
        if missing:
            problems.append(
                f"{len(missing)} backbone tensor(s) missing: {summarize_keys(missing, group=False)}"
            )
        if mismatched:
            problems.append(
                f"{len(mismatched)} shape mismatch(es): {summarize_keys(mismatched, group=False)}"
            )
        hint = f" ({mapped.hint})" if mapped.hint else ""
        raise ValueError(
            f"{path}: not a complete torchvision {arch} backbone in {fmt} layout: "
            + "; ".join(problems)
            + f"{hint}. Pass allow_partial=True (medp2x convert --allow-partial) to load the rest, "
            "arch= for another architecture, or format= if the detected format is wrong"
        )
    state: dict[str, torch.Tensor] = {}
    filled, cast = 0, set()
    for name in expected:
        if name in loaded:
            tensor = tensors[name]
            if tensor.is_floating_point() and tensor.dtype != torch.float32:
                cast.add(str(tensor.dtype).removeprefix("torch."))  # torchvision models are fp32
                tensor = tensor.float()
            state[name] = tensor.contiguous()
        elif name.endswith("num_batches_tracked") and name.rsplit(".", 1)[0] + ".weight" in loaded:
            state[name] = torch.zeros((), dtype=torch.long)
            filled += 1
    if cast:
        notes.append(f"weights stored as {', '.join(sorted(cast))}: converted to float32")
    if filled:
        notes.append(
            f"num_batches_tracked absent for {filled} BN layer(s): set to 0 (unused in eval mode)"
        )
    report = LoadReport(
        path=str(path),
        format=fmt,
        arch=arch,
        loaded=loaded,
        missing=missing,
        ignored=ignored,
        normalization=mapped.normalization,
        in_channels=stem_channels,
        mismatched=mismatched,
        notes=notes,
    )
    return state, report
