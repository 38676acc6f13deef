"""Methods with momentum networks: target copies that follow the online ones as an EMA.

BYOL's target network, MoCo's key network and DINO's teacher are each an exponential moving
average of the network trained by gradient. A ``MomentumMethod`` names its (online, target)
pairs (``momentum_pairs``, as solo-learn's ``BaseMomentumMethod``) and its momentum at a point
of training (``momentum``); the base copies, freezes and updates them after every optimizer
step, so a method writes no EMA code of its own.
"""

from __future__ import annotations

import copy
import math
from abc import abstractmethod

import torch
from torch import nn

from medp2x.methods.base import SSLMethod


class MomentumMethod(SSLMethod):
    """An SSL method whose target modules are EMA copies of online ones.

    Subclasses create their targets with ``frozen_copy`` (so saved module names stay theirs:
    ``target_encoder``, ``key_encoder``, ``teacher_encoder``...), list the pairs in
    ``momentum_pairs`` and give the schedule in ``momentum``. ``tau`` is the momentum of the
    last update (the schedule's start before any), for logging.
    """

    def __init__(self, encoder: nn.Module, recipe):
        super().__init__(encoder, recipe)
        self.tau = self.momentum(0.0)

    @abstractmethod
    def momentum_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        """The (online, target) module pairs, target following online."""

    @abstractmethod
    def momentum(self, progress: float) -> float:
        """The EMA momentum after the step that brought training to ``progress`` (0 to 1)."""

    def reset_momentum_encoders(self) -> None:
        """Make every target an exact copy of its online module (after weight surgery)."""
        for online, target in self.momentum_pairs():
            copy_params(online, target)

    def on_after_optimizer_step(self, progress: float) -> None:
        super().on_after_optimizer_step(progress)
        self.tau = self.momentum(progress)
        for online, target in self.momentum_pairs():
            ema_update(online, target, self.tau)


def frozen_copy(module: nn.Module) -> nn.Module:
    """A copy of ``module`` (parameters and buffers) whose parameters take no gradient."""
    target = copy.deepcopy(module)
    for p in target.parameters():
        p.requires_grad_(False)
    return target


@torch.no_grad()
def copy_params(source: nn.Module, target: nn.Module) -> None:
    """Make ``target`` an exact copy of ``source`` (parameters and buffers), frozen."""
    target.load_state_dict(source.state_dict())
    for p in target.parameters():
        p.requires_grad_(False)


@torch.no_grad()
def ema_update(online: nn.Module, target: nn.Module, tau: float) -> None:
    """``target <- tau * target + (1 - tau) * online`` for parameters; buffers (BN statistics)
    stay the target's own, updated by its forward passes as in the BYOL, MoCo and DINO code."""
    t_params = list(target.parameters())
    o_params = list(online.parameters())
    torch._foreach_mul_(t_params, tau)
    torch._foreach_add_(t_params, [p.detach() for p in o_params], alpha=1.0 - tau)


def cosine_momentum(base: float, progress: float) -> float:
    """BYOL's and DINO's schedule ``1 - (1 - base) (cos(pi p) + 1) / 2``: ``base`` at progress
    0, rising to 1 at progress 1."""
    progress = min(max(progress, 0.0), 1.0)
    return 1.0 - (1.0 - base) * (math.cos(math.pi * progress) + 1.0) / 2.0
