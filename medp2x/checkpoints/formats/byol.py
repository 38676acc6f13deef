"""BYOL (deepmind-research/byol): the Haiku/dill pickle ``pretrain_res50x1.pkl``.

``{'experiment_state': (online_params, target_params, online_state, target_state, opt_state),
'step', 'rng'}`` (or ``{'params', 'state'}``) of Haiku trees: HWIO kernels, (1, 1, 1, C)
batch-norm tensors, ``mean_ema``/``var_ema`` statistics. Only the online network is kept.
The file is a raw pickle, read by ``checkpoints.unpickler``; ImageNet mean/std as in
byol/utils/dataset.py ``normalize_images``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from medp2x.checkpoints.formats.common import CheckpointFormat, Mapped, as_array, require_mapping
from medp2x.checkpoints.normalization import IMAGENET


def detect(obj: Mapping) -> bool:
    params = obj.get("params")
    return "experiment_state" in obj or (
        "state" in obj and isinstance(params, Mapping) and any("/~/" in str(k) for k in params)
    )


_BYOL_RULES: list[tuple[re.Pattern, Callable[[re.Match], str]]] = [
    (re.compile(r"(?:.*/~/)?initial_conv(?:_\d+)?"), lambda m: "conv1"),
    (re.compile(r"(?:.*/~/)?initial_batchnorm(?:_\d+)?"), lambda m: "bn1"),
    (
        re.compile(r"(?:.*/~/)?block_group_(\d+)/~/block_(\d+)/~/conv_(\d+)"),
        lambda m: f"layer{int(m[1]) + 1}.{m[2]}.conv{int(m[3]) + 1}",
    ),
    (
        re.compile(r"(?:.*/~/)?block_group_(\d+)/~/block_(\d+)/~/batchnorm_(\d+)"),
        lambda m: f"layer{int(m[1]) + 1}.{m[2]}.bn{int(m[3]) + 1}",
    ),
    (
        re.compile(r"(?:.*/~/)?block_group_(\d+)/~/block_(\d+)/~/shortcut_conv"),
        lambda m: f"layer{int(m[1]) + 1}.{m[2]}.downsample.0",
    ),
    (
        re.compile(r"(?:.*/~/)?block_group_(\d+)/~/block_(\d+)/~/shortcut_batchnorm"),
        lambda m: f"layer{int(m[1]) + 1}.{m[2]}.downsample.1",
    ),
]
_HAIKU_PARAM = {"w": "weight", "scale": "weight", "offset": "bias"}


def _byol_module(name: str) -> str | None:
    for pattern, rename in _BYOL_RULES:
        if m := pattern.fullmatch(name):
            return rename(m)
    return None


def _byol_trees(obj: Mapping, path: Path) -> tuple[Mapping, Mapping, list[str]]:
    """(online params, online state, ignored entries) from the released layout
    ``{'experiment_state': (online_params, ...), 'step', 'rng'}`` or ``{'params', 'state'}``."""
    if "experiment_state" in obj:
        exp = obj["experiment_state"]
        fields = list(exp.keys()) if isinstance(exp, Mapping) else list(getattr(exp, "_fields", []))
        get = exp.get if isinstance(exp, Mapping) else lambda name: getattr(exp, name, None)
        params, state = get("online_params"), get("online_state")
        ignored = [
            f"experiment_state.{f}" for f in fields if f not in ("online_params", "online_state")
        ]
        ignored += [str(k) for k in obj if k != "experiment_state"]
    else:
        params, state = obj.get("params"), obj.get("state")
        ignored = [str(k) for k in obj if k not in ("params", "state")]
    params = require_mapping(params, "BYOL online_params", path)
    state = require_mapping(state, "BYOL online_state", path)
    return params, state, ignored


def read(obj: Mapping, path: Path) -> Mapped:
    params, state, ignored = _byol_trees(obj, path)
    tensors: dict[str, tuple[str, Any]] = {}
    for module, entries in params.items():
        target = _byol_module(str(module))
        for pname, value in require_mapping(entries, f"BYOL params of {module}", path).items():
            source = f"{module}/{pname}"
            if target is None or pname not in _HAIKU_PARAM:
                ignored.append(source)
                continue
            array = as_array(value, source, path)
            if pname == "w":  # Haiku conv kernels are HWIO; torch wants OIHW
                array = np.transpose(array, (3, 2, 0, 1))
            else:  # batch-norm scale/offset are stored as (1, 1, 1, C)
                array = array.reshape(-1)
            tensors[f"{target}.{_HAIKU_PARAM[pname]}"] = (source, array)
    for name, entries in state.items():
        module, _, stat = str(name).rpartition("/~/")
        target = _byol_module(module)
        if target is None or stat not in ("mean_ema", "var_ema"):
            ignored.append(str(name))
            continue
        entries = require_mapping(entries, f"BYOL state {name}", path)
        if "average" not in entries:
            raise ValueError(f"{path}: BYOL state {name} has no 'average'")
        stat_name = "running_mean" if stat == "mean_ema" else "running_var"
        tensors[f"{target}.{stat_name}"] = (
            f"{name}/average",
            as_array(entries["average"], name, path).reshape(-1),
        )
        if stat == "mean_ema" and "counter" in entries:
            counter = np.asarray(as_array(entries["counter"], name, path), dtype=np.int64).reshape(
                ()
            )
            tensors[f"{target}.num_batches_tracked"] = (f"{name}/counter", counter)
    notes = [
        "BN statistics from Haiku's mean_ema/var_ema 'average' (counter -> num_batches_tracked)",
        "Haiku pads stride-2 layers 'SAME' (asymmetrically), torchvision symmetrically: outputs "
        "differ slightly from the JAX model, as with every PyTorch port of these weights",
    ]
    return Mapped(tensors, ignored, IMAGENET, notes)


FORMAT = CheckpointFormat("byol", detect, read, IMAGENET)
