"""Optimisers and learning-rate schedules of the original SSL recipes.

The layer-wise trust ratio is not in PyTorch; ``LARS`` here holds both published forms
(param-group option ``trust_mode``), since they differ where the recipes differ:

- ``"lars"``, after SimCLR/BYOL (You et al. 2017): the update ``g + wd * w`` is scaled by
  ``eta * ||w|| / ||g + wd * w||``; biases and BatchNorm/1-D parameters get neither
  adaptation nor weight decay (``build_optimizer``'s default exclusion for LARS).
- ``"larc"``, apex's ``LARC(SGD(...), trust_coefficient=0.001, clip=False)`` as SwAV's
  ``main_swav.py`` uses it over *every* parameter: the update ``g + wd * w`` is scaled by
  ``eta * ||w|| / (||g|| + wd * ||w|| + eps)``, and a parameter whose weight or gradient
  norm is 0 takes its plain gradient with no weight decay (apex switches SGD's decay off and
  adds it back only where it adapts).

The momentum buffer follows torch.optim.SGD's convention (``lr`` applied after the momentum;
identical to the TF original while ``lr`` is constant, and what apex's LARC wraps), so a
LambdaLR schedules it. The schedule is warm-up then a half cosine, with main_swav.py's
warm-up start and non-zero end as options.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

OPTIMIZERS = ("lars", "sgd", "adam", "adamw")
TRUST_MODES = ("lars", "larc")


class LARS(torch.optim.Optimizer):
    """SGD with momentum and a layer-wise trust ratio. Param-group options: ``lars_adapt``
    (apply the trust ratio), ``weight_decay``, ``trust_mode`` (``"lars"`` or ``"larc"``, see
    the module docstring) and ``eps`` (LARC's denominator guard); ``build_optimizer`` turns
    adaptation and decay off for biases and normalisation parameters where the recipe
    excludes them."""

    def __init__(
        self,
        params: Iterable[Any],
        lr: float,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        trust_coefficient: float = 0.001,
        lars_adapt: bool = True,
        trust_mode: str = "lars",
        eps: float = 1e-8,
    ):
        if lr < 0 or momentum < 0 or weight_decay < 0 or trust_coefficient <= 0 or eps < 0:
            raise ValueError(
                f"invalid LARS settings: lr={lr}, momentum={momentum}, "
                f"weight_decay={weight_decay}, trust_coefficient={trust_coefficient}, eps={eps}"
            )
        check_trust_mode(trust_mode)
        defaults = dict(
            lr=lr,
            momentum=momentum,
            weight_decay=weight_decay,
            trust_coefficient=trust_coefficient,
            lars_adapt=lars_adapt,
            trust_mode=trust_mode,
            eps=eps,
        )
        super().__init__(params, defaults)

    def __setstate__(self, state: dict) -> None:
        """Checkpoints written before ``trust_mode`` existed were trained with LARS proper."""
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("trust_mode", "lars")
            group.setdefault("eps", 1e-8)

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
        if not group["lars_adapt"]:
            d = p.grad.add(p, alpha=group["weight_decay"]) if group["weight_decay"] else p.grad
        elif group["trust_mode"] == "larc":
            d = larc_update(
                p, p.grad, group["weight_decay"], group["trust_coefficient"], group["eps"]
            )
        else:
            d = lars_update(p, p.grad, group["weight_decay"], group["trust_coefficient"])
        state = self.state[p]
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.clone(d).detach()
        else:
            state["momentum_buffer"].mul_(group["momentum"]).add_(d)
        p.add_(state["momentum_buffer"], alpha=-group["lr"])


def lars_update(w: torch.Tensor, g: torch.Tensor, wd: float, eta: float) -> torch.Tensor:
    """SimCLR/BYOL's LARS direction ``d * eta ||w|| / ||d||`` with ``d = g + wd * w``."""
    d = g.add(w, alpha=wd) if wd != 0 else g
    w_norm, d_norm = torch.linalg.vector_norm(w), torch.linalg.vector_norm(d)
    ratio = eta * w_norm / d_norm
    # a zero weight or update norm (fresh layer, dead unit) keeps the plain step
    ratio = torch.where((w_norm > 0) & (d_norm > 0), ratio, torch.ones_like(ratio))
    return d.mul(ratio)


def larc_update(
    w: torch.Tensor, g: torch.Tensor, wd: float, eta: float, eps: float
) -> torch.Tensor:
    """apex LARC's direction (``clip=False``): ``(g + wd * w) * eta ||w|| / (||g|| + wd ||w||
    + eps)``; where ``||w||`` or ``||g||`` is 0 (a zero-initialised BN shift, a dead unit) the
    plain gradient, without weight decay, as apex leaves it. ``torch.where`` rather than
    Python branches keeps the step free of device-to-host syncs."""
    w_norm, g_norm = torch.linalg.vector_norm(w), torch.linalg.vector_norm(g)
    adapts = (w_norm > 0) & (g_norm > 0)
    ratio = torch.where(adapts, eta * w_norm / (g_norm + wd * w_norm + eps), 1.0)
    decay = torch.where(adapts, wd, 0.0)
    return torch.addcmul(g, w, decay).mul_(ratio)  # one temporary: optimiser steps are memory-bound


def check_trust_mode(trust_mode: str) -> None:
    if trust_mode not in TRUST_MODES:
        raise ValueError(
            f"unknown trust_mode {trust_mode!r}; choose one of {TRUST_MODES} "
            "(lars: SimCLR/BYOL's LARS, larc: apex LARC as in SwAV's main_swav.py)"
        )


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


def warmup_cosine(
    warmup_steps: int,
    total_steps: int,
    start_ratio: float | None = None,
    final_ratio: float = 0.0,
):
    """LR multiplier (of the peak) per iteration: a linear warm-up over ``warmup_steps``
    iterations reaching 1 at iteration ``warmup_steps - 1``, then a half cosine from 1
    (iteration ``warmup_steps``) to ``final_ratio`` (iteration ``total_steps`` and after).

    The warm-up starts at ``1 / warmup_steps`` (SimCLR/BYOL's ``(step + 1) / W``) or, with
    ``start_ratio``, at ``start_ratio`` (main_swav.py's ``np.linspace(start_warmup, base_lr,
    W)``); ``final_ratio`` is main_swav.py's ``final_lr / base_lr``."""
    total_steps = max(int(total_steps), 1)
    warmup_steps = min(max(int(warmup_steps), 0), total_steps)

    def factor(step: int) -> float:
        if step < warmup_steps:
            if start_ratio is None:
                return (step + 1) / warmup_steps
            if warmup_steps == 1:
                return start_ratio
            return start_ratio + (1.0 - start_ratio) * step / (warmup_steps - 1)
        if step >= total_steps:
            return final_ratio
        progress = (step - warmup_steps) / max(total_steps - warmup_steps, 1)
        return final_ratio + (1.0 - final_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def build_optimizer(
    model: nn.Module, recipe: Any, batch_size: int, steps_per_epoch: int
) -> tuple[torch.optim.Optimizer, LambdaLR]:
    """The recipe's optimiser at the batch-scaled peak lr, and a LambdaLR (warm-up + cosine
    over ``recipe.epochs * steps_per_epoch``) to step after every iteration.

    ``batch_size`` is the global batch (all ranks). Reads recipe fields optimizer, base_lr,
    lr_batch_divisor, weight_decay, momentum, warmup_epochs, epochs, and optionally
    trust_coefficient (0.001), trust_mode (``"lars"``; LARS only), exclude_bias_and_norm
    (default: only for LARS, as SimCLR/BYOL; MoCo v2's SGD decays every parameter),
    start_warmup_ratio (None: warm-up from ``peak / W``) and final_lr_ratio (0). The two
    ratios are fractions of the peak lr, so they follow its batch scaling or an explicit lr."""
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
    check_trust_mode(getattr(recipe, "trust_mode", "lars"))  # also where it is unused (SGD)
    if name == "lars":
        optimizer = LARS(
            groups,
            lr=lr,
            momentum=momentum,
            trust_coefficient=getattr(recipe, "trust_coefficient", 0.001),
            trust_mode=getattr(recipe, "trust_mode", "lars"),
        )
    elif name == "sgd":
        optimizer = torch.optim.SGD([_plain(g) for g in groups], lr=lr, momentum=momentum)
    elif name == "adam":
        optimizer = torch.optim.Adam([_plain(g) for g in groups], lr=lr)
    else:
        optimizer = torch.optim.AdamW([_plain(g) for g in groups], lr=lr)
    return optimizer, LambdaLR(optimizer, recipe_schedule(recipe, steps_per_epoch))


def recipe_schedule(recipe: Any, steps_per_epoch: int):
    """The recipe's ``warmup_cosine`` in iterations, its optional ratios checked first."""
    start = getattr(recipe, "start_warmup_ratio", None)
    final = getattr(recipe, "final_lr_ratio", 0.0)
    if start is not None and not 0.0 <= start <= 1.0:
        raise ValueError(
            f"start_warmup_ratio must be in [0, 1] (the first warm-up lr as a fraction of the "
            f"peak lr), got {start}"
        )
    if not 0.0 <= final <= 1.0:
        raise ValueError(
            f"final_lr_ratio must be in [0, 1] (the last lr as a fraction of the peak lr), "
            f"got {final}"
        )
    total = round(recipe.epochs * steps_per_epoch)
    warmup = round(getattr(recipe, "warmup_epochs", 0) * steps_per_epoch)
    return warmup_cosine(warmup, total, start_ratio=start, final_ratio=final)


def _plain(group: dict) -> dict:
    """A param group without the LARS-only flag, for torch's own optimisers."""
    return {k: v for k, v in group.items() if k != "lars_adapt"}
