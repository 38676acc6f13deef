"""MoCo v2 (Chen et al., 2020; He et al., 2020): InfoNCE against a queue of momentum-encoded keys.

Follows facebookresearch/moco ``builder.py`` with ``--mlp --moco-t 0.2``: query and key
networks are the encoder plus ``Linear -> ReLU -> Linear`` (hidden width = encoder width, no
BN); queries see view 0, keys view 1 (not symmetrised, as in v2; ``symmetric=True`` adds the
swapped pair as the authors' CIFAR demo does); logits are
``[q.k+, q.queue] / T`` with the positive at index 0; the keys of the *global* batch (gathered
without gradient) replace the oldest queue entries. The key network is an EMA of the query
network with constant momentum ``m``. The original updates it at the start of ``forward``;
here it happens in ``on_after_optimizer_step``, the same point in the step sequence.

Shuffling BN: with several processes the key batch is shuffled across ranks before the key
encoder and unshuffled after (``_batch_shuffle_ddp``), so a key's BN statistics do not come
from the rank holding its query. Without it the model "cheats": query and positive key share
their batch statistics, which lowers the loss without learning (MoCo §3.3). One process has no
ranks to shuffle across, so it simulates ``bn_splits`` of them, as the authors' CIFAR demo
does with its ``SplitBatchNorm``: queries go through the encoder in ``bn_splits`` contiguous
groups, keys are shuffled, go through in groups, and are unshuffled. Forwarding each group
separately gives each its own BN statistics without swapping the encoder's BN modules, so the
saved backbone stays a plain torchvision network.

The queue is a buffer of shape ``(queue_length, proj_out_dim)`` (rows are keys; the original
stores the transpose) saved in checkpoints with its pointer, so a resumed run continues it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from medp2x.distributed import broadcast, gather_no_grad, rank, world_size
from medp2x.methods.base import Recipe, ViewSpec, embedding_spread
from medp2x.methods.heads import mlp
from medp2x.methods.losses import at_least_float32, info_nce
from medp2x.methods.momentum import MomentumMethod, frozen_copy
from medp2x.views import AugmentRecipe, ViewAugment


@dataclass
class MoCoRecipe(Recipe):
    temperature: float = 0.2
    queue_length: int = 65536
    key_momentum: float = 0.999
    proj_hidden_dim: int | None = None  # None: the encoder's width, as builder.py
    proj_out_dim: int = 128
    shuffle_bn: bool = True
    bn_splits: int = 8  # BN groups simulated by one process (the original's 8 GPUs)
    # Also contrast view 1's queries with view 0's keys and sum both losses (the authors'
    # CIFAR demo, ``--symmetric``): twice the signal per image pair for 1.5x the compute,
    # and both key sets enter the queue.
    symmetric: bool = False


# full: MoCo v2 as used by HPT: SGD lr 0.03 x B/256, wd 1e-4, cosine, no warm-up, 200
# epochs. tiny: a queue that turns over in ~30 steps and a key network that follows quickly
# (m = 0.99, as lightly's small-scale MoCo benchmarks) for runs of a few hundred steps;
# lightly's rate 0.06 / 128.
RECIPES = {
    "full": MoCoRecipe(
        method="moco", profile="full", arch="resnet50", image_size=224,
        batch_size=256, epochs=200, optimizer="sgd", base_lr=0.03,
        weight_decay=1e-4, warmup_epochs=0,
        views=ViewSpec(n_large=2, large_size=224, large_scale=(0.2, 1.0)),
        temperature=0.2, queue_length=65536, key_momentum=0.999, proj_out_dim=128,
    ),
    "tiny": MoCoRecipe(
        method="moco", profile="tiny", arch="resnet18", image_size=64,
        batch_size=32, epochs=2, optimizer="sgd", base_lr=0.12,
        weight_decay=5e-4, warmup_epochs=0,
        views=ViewSpec(n_large=2, large_size=64, large_scale=(0.2, 1.0)),
        temperature=0.2, queue_length=1024, key_momentum=0.99, proj_out_dim=64,
        bn_splits=2,
    ),
}  # fmt: skip

# MoCo v2 (main_moco.py --aug-plus): flip, colour jitter (0.4, 0.4, 0.4, 0.1) with p 0.8,
# grayscale 0.2, blur with p 0.5; the same for both views.
MOCO_V2_VIEW = ViewAugment(brightness=0.4, contrast=0.4, saturation=0.4, hue=0.1)
AUGMENT = AugmentRecipe(large=(MOCO_V2_VIEW,), small=MOCO_V2_VIEW)


class MoCo(MomentumMethod):
    name = "moco"
    recipes = RECIPES
    augment = AUGMENT
    sync_bn = False  # shuffled BN instead: SyncBN would pool the statistics it keeps apart

    def __init__(self, encoder: nn.Module, recipe: MoCoRecipe):
        super().__init__(encoder, recipe)
        r = recipe
        if r.queue_length < 1:
            raise ValueError(f"moco queue_length must be positive, got {r.queue_length}")
        if r.bn_splits < 1:
            raise ValueError(f"moco bn_splits must be positive, got {r.bn_splits}")
        hidden = r.proj_hidden_dim or self.feature_dim
        self.projector = mlp([self.feature_dim, hidden, r.proj_out_dim], batch_norm=False)
        self.key_encoder = frozen_copy(encoder)
        self.key_projector = frozen_copy(self.projector)
        queue = F.normalize(torch.randn(r.queue_length, r.proj_out_dim), dim=1)
        self.register_buffer("queue", queue)
        self.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))

    def momentum_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        return [(self.encoder, self.key_encoder), (self.projector, self.key_projector)]

    def momentum(self, progress: float) -> float:
        return self.recipe.key_momentum  # constant, as in MoCo

    def forward(self, views: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        self.check_views(views)
        pairs = [(0, 1), (1, 0)] if self.recipe.symmetric else [(0, 1)]
        terms, queries, keys = [], [], []
        for query_view, key_view in pairs:  # both pairs score against the same queue
            q = self.projector(self._split_forward(self.encoder, views[query_view]))
            k = self._keys(views[key_view])
            terms.append(info_nce(q, k, self.queue, self.recipe.temperature))
            queries.append(q)
            keys.insert(0, k)  # the demo enqueues cat([k1, k2]): view 0's keys first
        if self.training:
            self.enqueue(F.normalize(at_least_float32(torch.cat(keys)), dim=1))
        return {
            "loss": sum(t["loss"] for t in terms),
            "top1": torch.stack([t["top1"] for t in terms]).mean(),
            "spread": embedding_spread(torch.cat(queries)),
        }

    def _shuffling_bn(self) -> bool:
        return self.recipe.shuffle_bn and self.training

    def _simulated_splits(self, batch: int) -> int:
        """BN groups for one process in training (1: no splitting), at least 2 images each."""
        if not self._shuffling_bn() or world_size() > 1:
            return 1
        return max(1, min(self.recipe.bn_splits, batch // 2))

    def _split_forward(self, network: nn.Module, images: torch.Tensor) -> torch.Tensor:
        splits = self._simulated_splits(images.shape[0])
        if splits == 1:
            return network(images)
        return torch.cat([network(group) for group in images.tensor_split(splits)])

    @torch.no_grad()
    def _key_forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.key_projector(self._split_forward(self.key_encoder, images))

    @torch.no_grad()
    def _keys(self, images: torch.Tensor) -> torch.Tensor:
        if world_size() == 1 and self._simulated_splits(images.shape[0]) > 1:
            order = torch.randperm(
                images.shape[0], device=images.device
            )  # _batch_shuffle_single_gpu
            return self._key_forward(images[order])[torch.argsort(order)]
        if world_size() == 1 or not self._shuffling_bn():
            return self._key_forward(images)
        everything = gather_no_grad(images)
        order = broadcast(torch.randperm(everything.shape[0], device=images.device), src=0)
        inverse = torch.argsort(order)
        mine = order.view(world_size(), -1)[rank()]
        keys = gather_no_grad(self._key_forward(everything[mine]))
        return keys[inverse.view(world_size(), -1)[rank()]]

    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor) -> None:
        """Write the global batch's keys over the oldest entries (ring buffer, rank order)."""
        keys = gather_no_grad(keys)
        n, length = keys.shape[0], self.queue.shape[0]
        if n > length:
            raise ValueError(f"moco queue_length {length} is smaller than the global batch {n}")
        ptr = int(self.queue_ptr)
        slots = (ptr + torch.arange(n, device=self.queue.device)) % length
        self.queue[slots] = keys.to(self.queue)
        self.queue_ptr[0] = (ptr + n) % length
