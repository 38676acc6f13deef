"""What is being evaluated: an encoder spec (a module, "random", a low-level reference or a
checkpoint path) resolved to a module taking [0, 1] images, and a run's checkpoints read safely.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from medp2x.baselines import BASELINES, build_baseline
from medp2x.eval.settings import NORMALIZATIONS
from medp2x.networks import IMAGENET_MEAN, IMAGENET_STD, NormalizedEncoder, build_encoder

logger = logging.getLogger("medp2x.evaluate")


EncoderSpec = nn.Module | str | Path


def resolve_encoder(
    spec: EncoderSpec,
    arch: str = "resnet18",
    in_channels: int = 3,
    normalization: str = "auto",
    seed: int = 0,
) -> nn.Module:
    """An encoder taking [0, 1] images: a module as given, ``"random"`` (``build_encoder(arch)``
    with ImageNet mean/std, seeded), a low-level reference of ``medp2x.baselines``
    (``"colour_histogram"``, ``"tiny_image"``), or a checkpoint path read by ``medp2x.checkpoints``.

    ``normalization`` overrides what the file says ("imagenet" or "none"); "auto" trusts the
    file (plain state dicts carry no normalisation, so say "imagenet" for those trained so).
    """
    if normalization not in NORMALIZATIONS:
        raise ValueError(f"normalization must be one of {', '.join(NORMALIZATIONS)}")
    if isinstance(spec, nn.Module):
        return spec
    if str(spec) == "random":
        torch.manual_seed(seed)
        encoder = build_encoder(arch, in_channels)
        mean, std = (None, None) if normalization == "none" else (IMAGENET_MEAN, IMAGENET_STD)
        return NormalizedEncoder(encoder, mean, std)
    if str(spec) in BASELINES:
        return build_baseline(str(spec))
    encoder, file_norm = load_encoder_file(spec)  # the stem as stored; gray input is matched
    if normalization == "imagenet":
        mean, std = IMAGENET_MEAN, IMAGENET_STD
    elif normalization == "none" or file_norm is None:
        mean, std = None, None
    else:
        mean, std = file_norm["mean"], file_norm["std"]
    return NormalizedEncoder(encoder, mean, std)


def load_encoder_file(
    path: str | Path, in_channels: int | None = None
) -> tuple[nn.Module, dict | None]:
    """(encoder, normalisation or None) from any file ``medp2x.checkpoints`` reads (imported
    lazily: only path-given encoders need it)."""
    from medp2x.checkpoints import load_encoder

    encoder, report = load_encoder(path, in_channels=in_channels)
    logger.info("%s", report)
    return encoder, report.normalization


def read_run_checkpoint(path: str | Path) -> dict:
    """An engine checkpoint, read safely (weights only, plus the NumPy RNG state its trainer
    entry carries); any failure is one clear error."""
    from medp2x.checkpoints import torch_load_safe

    path = Path(path)
    try:
        ckpt = torch_load_safe(path)
    except Exception as err:  # noqa: BLE001 - any unreadable file gets the same clear message
        from medp2x.recovery import why_unloadable  # #21: never torch's advice to load unsafely

        raise ValueError(
            f"{path}: not a readable checkpoint ({why_unloadable(path, err)})"
        ) from None
    if not isinstance(ckpt, Mapping):
        raise ValueError(f"{path}: not a checkpoint dictionary")
    return dict(ckpt)


def checkpoint_progress(path: str | Path) -> dict[str, float | None]:
    """Pretraining progress of an engine checkpoint: ``{"iteration", "epoch"}`` from its Ignite
    ``trainer`` state (epoch = iteration / epoch_length), else the number in the file name
    (``checkpoint_<iteration>.pt``) as the iteration and no epoch."""
    path = Path(path)
    trainer = read_run_checkpoint(path).get("trainer")
    if isinstance(trainer, Mapping) and trainer.get("epoch_length"):
        length = int(trainer["epoch_length"])
        iteration = trainer.get("iteration")
        iteration = int(iteration) if iteration is not None else int(trainer["epoch"]) * length
        return {"iteration": iteration, "epoch": iteration / length}
    match = re.search(r"(\d+)(?=\.\w+$)", path.name)
    if match is None:
        raise ValueError(f"{path}: no trainer state and no iteration number in the file name")
    return {"iteration": int(match.group(1)), "epoch": None}


def encoder_name(spec: EncoderSpec) -> str:
    if isinstance(spec, nn.Module):
        return type(spec).__name__
    return "random" if str(spec) == "random" else Path(spec).stem
