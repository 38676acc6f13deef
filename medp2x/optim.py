"""Optimisers and learning-rate schedules of the original SSL recipes.

LARS is not in PyTorch; it is written here after SimCLR/BYOL (You et al. 2017): the update
of each adapted parameter is scaled by the trust ratio ``eta * ||w|| / ||g + wd * w||``;
biases and BatchNorm/1-D parameters get neither adaptation nor weight decay (a param-group
flag). The momentum buffer follows torch.optim.SGD's convention (``lr`` applied after the
momentum, identical to the TF original while ``lr`` is constant), so LambdaLR schedules it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

OPTIMIZERS = ("lars", "sgd", "adam", "adamw")


class LARS(torch.optim.Optimizer):
    """SGD with momentum and layer-wise trust ratio. Param-group flags: ``lars_adapt``
    (apply the trust ratio) and ``weight_decay``; ``build_optimizer`` turns both off for
    biases and normalisation parameters."""

    def __init__(
        self,
        params: Iterable[Any],
        lr: float,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        trust_coefficient: float = 0.001,
        lars_adapt: bool = True,
    ):
        if lr < 0 or momentum < 0 or weight_decay < 0 or trust_coefficient <= 0:
            raise ValueError(
                f"invalid LARS settings: lr={lr}, momentum={momentum}, "
                f"weight_decay={weight_decay}, trust_coefficient={trust_coefficient}"
            )
        defaults = dict(
            lr=lr,
            momentum=momentum,
            weight_decay=weight_decay,
            trust_coefficient=trust_coefficient,
            lars_adapt=lars_adapt,
        )
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    self._update(p, group)
        return loss

    def _update(self, p: torch.Tensor, group: dict) -> None:
        d = p.grad
        if group["weight_decay"] != 0:
            d = d.add(p, alpha=group["weight_decay"])
        if group["lars_adapt"]:
            w_norm, d_norm = torch.linalg.vector_norm(p), torch.linalg.vector_norm(d)
            ratio = group["trust_coefficient"] * w_norm / d_norm
            # a zero weight or update norm (fresh layer, dead unit) keeps the plain step
            ratio = torch.where((w_norm > 0) & (d_norm > 0), ratio, torch.ones_like(ratio))
            d = d.mul(ratio)
        state = self.state[p]
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.clone(d).detach()
        else:
            state["momentum_buffer"].mul_(group["momentum"]).add_(d)
        p.add_(state["momentum_buffer"], alpha=-group["lr"])


def is_excluded(name: str, param: torch.Tensor) -> bool:
    """Biases and BatchNorm/LayerNorm parameters: all the 1-D ones (SimCLR/BYOL exclusion)."""
    return param.ndim <= 1 or name.endswith(".bias")


def param_groups(model: nn.Module, weight_decay: float, exclude: bool) -> list[dict]:
    """Trainable parameters only (a frozen BYOL/MoCo target network is left out); with
    ``exclude``, biases and norm parameters form a group without weight decay or LARS."""
    regular, excluded, seen = [], [], set()
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (excluded if exclude and is_excluded(name, p) else regular).append(p)
    groups = [{"params": regular, "weight_decay": weight_decay, "lars_adapt": True}]
    if excluded:
        groups.append({"params": excluded, "weight_decay": 0.0, "lars_adapt": False})
    if not regular and not excluded:
        raise ValueError("the model has no trainable parameters")
    return [g for g in groups if g["params"]]


def scaled_lr(base_lr: float, batch_size: int, divisor: float | None) -> float:
    """Linear scaling rule: ``base_lr * batch_size / divisor`` (divisor 0/None: unscaled)."""
    return base_lr * batch_size / divisor if divisor else base_lr


def warmup_cosine(warmup_steps: int, total_steps: int):
    """LR multiplier per iteration: linear warm-up to 1 at iteration ``warmup_steps - 1``,
    then a half cosine from 1 (iteration ``warmup_steps``) to 0 (iteration ``total_steps``)."""
    total_steps = max(int(total_steps), 1)
    warmup_steps = min(max(int(warmup_steps), 0), total_steps)

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        if step >= total_steps:
            return 0.0
        progress = (step - warmup_steps) / max(total_steps - warmup_steps, 1)
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def build_optimizer(
    model: nn.Module, recipe: Any, batch_size: int, steps_per_epoch: int
) -> tuple[torch.optim.Optimizer, LambdaLR]:
    """The recipe's optimiser at the batch-scaled peak lr, and a LambdaLR (warm-up + cosine to
    0 over ``recipe.epochs * steps_per_epoch``) to step after every iteration.

    ``batch_size`` is the global batch (all ranks). Reads recipe fields optimizer, base_lr,
    lr_batch_divisor, weight_decay, momentum, warmup_epochs, epochs, and optionally
    trust_coefficient (0.001) and exclude_bias_and_norm (default: only for LARS, as the
    originals: MoCo v2's SGD decays every parameter)."""
    name = str(recipe.optimizer).lower()
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {recipe.optimizer!r}; choose one of {OPTIMIZERS}")
    if steps_per_epoch < 1 or batch_size < 1:
        raise ValueError(
            f"need steps_per_epoch >= 1 and batch_size >= 1, got {steps_per_epoch}, {batch_size}"
        )
    lr = scaled_lr(recipe.base_lr, batch_size, getattr(recipe, "lr_batch_divisor", None))
    exclude = getattr(recipe, "exclude_bias_and_norm", None)
    groups = param_groups(
        model, recipe.weight_decay, name == "lars" if exclude is None else exclude
    )
    momentum = getattr(recipe, "momentum", 0.9)
    if name == "lars":
        eta = getattr(recipe, "trust_coefficient", 0.001)
        optimizer = LARS(groups, lr=lr, momentum=momentum, trust_coefficient=eta)
    elif name == "sgd":
        optimizer = torch.optim.SGD([_plain(g) for g in groups], lr=lr, momentum=momentum)
    elif name == "adam":
        optimizer = torch.optim.Adam([_plain(g) for g in groups], lr=lr)
    else:
        optimizer = torch.optim.AdamW([_plain(g) for g in groups], lr=lr)
    total = round(recipe.epochs * steps_per_epoch)
    warmup = round(getattr(recipe, "warmup_epochs", 0) * steps_per_epoch)
    return optimizer, LambdaLR(optimizer, warmup_cosine(warmup, total))


def _plain(group: dict) -> dict:
    """A param group without the LARS-only flag, for torch's own optimisers."""
    return {k: v for k, v in group.items() if k != "lars_adapt"}
