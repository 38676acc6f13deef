"""medp2x's own files: an encoder file (``save_encoder``) or an engine training checkpoint.

An encoder file carries its arch and normalisation in its header. A training checkpoint
(``{'model', 'optimizer', 'trainer', 'lr_scheduler'[, 'meta']}``) gives ``model['encoder.*']``;
its normalisation comes from ``meta`` or the run's ``run_config.json``, else ImageNet's.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

from medp2x.checkpoints.formats.common import (
    CheckpointFormat,
    Mapped,
    require_mapping,
    strip_uniform,
)
from medp2x.checkpoints.normalization import IMAGENET, plain_normalization
from medp2x.run_folder import RUN_CONFIG, run_folder_of


def detect(obj: Mapping) -> bool:
    if "medp2x" in obj and "state_dict" in obj:
        return True
    model = obj.get("model")
    return isinstance(model, Mapping) and any(
        str(k).startswith(("encoder.", "module.encoder.")) for k in model
    )


def read(obj: Mapping, path: Path) -> Mapped:
    if "medp2x" in obj:
        meta = require_mapping(obj["medp2x"], "'medp2x' header", path)
        state = require_mapping(obj.get("state_dict"), "'state_dict'", path)
        tensors = {str(k): (str(k), v) for k, v in state.items()}
        extra = [str(k) for k in obj if k not in ("medp2x", "state_dict")]
        return Mapped(
            tensors, extra, plain_normalization(meta.get("normalization")), arch=meta.get("arch")
        )
    model = require_mapping(obj.get("model"), "'model'", path)
    model_keys = strip_uniform(model, "module.")
    tensors, ignored = {}, [str(k) for k in obj if k != "model"]
    for name, (source, value) in model_keys.items():
        inner = name.removeprefix("encoder.")
        if name.startswith("encoder.") and not inner.startswith("fc."):
            tensors[inner] = (f"model.{source}", value)
        else:
            ignored.append(f"model.{source}")
    meta, notes = _training_meta(obj, path)
    normalization = (
        plain_normalization(meta["normalization"]) if "normalization" in meta else IMAGENET
    )
    if "normalization" not in meta:
        notes.append(
            "no normalisation recorded with this training checkpoint; assuming ImageNet mean/std"
        )
    return Mapped(tensors, ignored, normalization, notes, arch=meta.get("arch"))


def _training_meta(obj: Mapping, path: Path) -> tuple[dict, list[str]]:
    """The run's header: in the checkpoint (``meta``), else the run's ``run_config.json``."""
    if isinstance(obj.get("meta"), Mapping):
        return dict(obj["meta"]), []
    for folder in dict.fromkeys((path.parent, run_folder_of(path))):
        config = folder / RUN_CONFIG
        if config.is_file():
            try:
                meta = json.loads(config.read_text()).get("meta") or {}
            except (OSError, json.JSONDecodeError, AttributeError):
                continue
            return dict(meta), [f"run settings from {config}"]
    return {}, []


FORMAT = CheckpointFormat("medp2x", detect, read, IMAGENET)
