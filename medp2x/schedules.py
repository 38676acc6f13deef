"""What one stage of a chain trains, and at which crop size: the HPT and S3L knobs.

- ``select_trainable``: which encoder parameters a stage trains. ``"bn"`` is HPT's BN-only
  target stage (only BatchNorm affine parameters; convolutions frozen), ``"last_stage"`` is
  S3L's warm-up of a restored ``layer4`` (conv1-conv4 frozen, as ``main_freeze.py --freeze``).
  Frozen parameters get ``requires_grad=False`` before the optimiser is built, so
  ``optim.param_groups`` leaves them out. The method's heads are always trained (they are
  re-initialised for every stage). Running statistics: BN layers stay in train mode and keep
  updating their running mean/variance, as HPT's ``norm_train=True`` and S3L's ``model.train()``
  do; only parameters are frozen.
- ``without_last_stage`` / ``restore_last_stage``: S3L's small architecture, a ResNet whose
  ``layer4`` is skipped during pretraining (``custom_resnet50``) and re-initialised for the
  warm-up stage (``load_pretrained_model_no_conv5``). The skipped stage stays in the state dict
  (untrained) so the weights keep the torchvision layout every reader expects.
- ``ResolutionSchedule``: S3L's multi-resolution pretraining (e.g. 112 px, then a short 224 px
  stretch) inside one run; the crop size is a function of the iteration, so it survives resume.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
from ignite.engine import Engine, Events
from torch import nn

logger = logging.getLogger("medp2x.schedules")

TRAINABLE = ("all", "bn", "last_stage")
RESTORE_STREAM = 2  # sampling.derived_seed stream of a restored layer4 (0, 1: sampler, views)


# ----------------------------------------------------------------------------- trainable parts
def is_batchnorm(module: nn.Module) -> bool:
    return isinstance(module, nn.modules.batchnorm._BatchNorm)


def select_trainable(encoder: nn.Module, trainable: str) -> int:
    """Freeze the encoder's parameters outside ``trainable`` (``all``, ``bn``, ``last_stage``);
    returns how many encoder parameters stay trainable."""
    if trainable not in TRAINABLE:
        raise ValueError(f"trainable = {trainable!r} is not allowed: one of {', '.join(TRAINABLE)}")
    for name, module in encoder.named_modules():
        for param in module.parameters(recurse=False):
            param.requires_grad_(_kept(name, module, trainable))
    return sum(p.numel() for p in encoder.parameters() if p.requires_grad)


def _kept(name: str, module: nn.Module, trainable: str) -> bool:
    if trainable == "all":
        return True
    if trainable == "bn":
        return is_batchnorm(module)
    return name == "layer4" or name.startswith("layer4.")


def count_parameters(module: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts, shared tensors once."""
    seen: dict[int, torch.Tensor] = {id(p): p for p in module.parameters()}
    trained = sum(p.numel() for p in seen.values() if p.requires_grad)
    return trained, sum(p.numel() for p in seen.values())


# ----------------------------------------------------------------------------- small architecture
def _skip(x: torch.Tensor) -> torch.Tensor:
    return x


def without_last_stage(encoder: nn.Module) -> nn.Module:
    """A torchvision ResNet whose ``layer4`` is skipped (S3L's ``custom_resnet``): the features
    are ``layer3``'s, pooled (256 wide for ResNet-18/34, 1024 for ResNet-50). ``layer4`` keeps
    its (untrained, frozen) tensors so the state dict stays a complete torchvision backbone."""
    if not hasattr(encoder, "layer4"):
        raise ValueError("without_last_stage needs a torchvision ResNet (no layer4 found)")
    encoder.layer4.forward = _skip  # an instance attribute: module calls resolve it first
    for param in encoder.layer4.parameters():
        param.requires_grad_(False)
    encoder.feature_dim = _width(encoder.layer3)
    return encoder


def _width(stage: nn.Module) -> int:
    last_block = list(stage.children())[-1]
    bns = [m for m in last_block.modules() if isinstance(m, nn.BatchNorm2d)]
    return int(bns[-1].num_features)


def restore_last_stage(state: dict[str, torch.Tensor], arch: str, seed: int) -> dict:
    """``state`` with a fresh ``layer4`` (torchvision's init, from its own stream of ``seed``,
    not the untrained ``layer4`` a random-init run of the same seed carried along): S3L loads
    conv1-conv4 from the small-architecture run and starts conv5 anew."""
    from medp2x.engine import random_init
    from medp2x.networks import build_encoder
    from medp2x.sampling import derived_seed

    channels = int(state["conv1.weight"].shape[1])
    fresh = build_encoder(arch, in_channels=channels)
    fresh = random_init(fresh, derived_seed(seed, RESTORE_STREAM)).state_dict()
    restored = dict(state)
    restored.update({k: v for k, v in fresh.items() if k.startswith("layer4.")})
    return restored


# ----------------------------------------------------------------------------- resolution
def parse_resolution_schedule(steps: Sequence[Sequence[int]] | None) -> list[tuple[int, int]]:
    """``[[from_iteration, size], ...]``: iteration ``i`` (1-based) crops at the size of the
    last entry whose ``from_iteration < i``; the first entry must start at 0."""
    if not steps:
        return []
    parsed = []
    for step in steps:
        if len(step) != 2 or any(isinstance(v, bool) or int(v) != v for v in step):
            raise ValueError(f"resolution_schedule entry {step!r} is not [from_iteration, size]")
        parsed.append((int(step[0]), int(step[1])))
    starts = [s for s, _ in parsed]
    if starts[0] != 0 or starts != sorted(set(starts)) or min(s for _, s in parsed) < 8:
        raise ValueError(
            f"resolution_schedule {steps!r}: starts must begin at 0 and increase, sizes >= 8 px"
        )
    return parsed


class ResolutionSchedule:
    """Switch the views' crop size at stated iterations (S3L's multi-resolution pretraining).

    Each view keeps its ratio to the large crop (a multi-crop run's small crops shrink too).
    The size of iteration ``i`` depends on ``i`` alone, so a run killed after the switch
    resumes at the later size, and one killed before it switches at the same iteration."""

    def __init__(self, steps: Sequence[Sequence[int]]):
        self.steps = parse_resolution_schedule(steps)
        if not self.steps:
            raise ValueError("ResolutionSchedule needs at least one [from_iteration, size]")

    def size_at(self, iteration: int) -> int:
        """The large-crop size of 1-based ``iteration``."""
        return [size for start, size in self.steps if start < iteration][-1]

    def attach(self, engine: Engine) -> None:
        from medp2x.handlers import run_of

        augment = run_of(engine).augment
        base, reference = list(augment.sizes), max(augment.sizes)

        @engine.on(Events.ITERATION_STARTED)
        def set_size(e: Engine) -> None:
            size = self.size_at(e.state.iteration)
            augment.sizes = [max(8, round(s * size / reference)) for s in base]

    def describe(self) -> list[list[int]]:
        return [list(step) for step in self.steps]


def largest_size(steps: Sequence[Sequence[int]] | None, default: int) -> int:
    parsed = parse_resolution_schedule(steps)
    return max([default, *(size for _, size in parsed)])


def trained_parameters_line(method: Any, trainable: str) -> str:
    trained, total = count_parameters(method)
    enc_trained, enc_total = count_parameters(method.encoder)
    return (
        f"trainable = {trainable}: {trained:,} of {total:,} parameters trained "
        f"(encoder {enc_trained:,} of {enc_total:,}; heads {trained - enc_trained:,})"
    )
