"""Collectives the SSL losses need, identity in a single process.

Contrastive losses take negatives from the *global* batch, so embeddings are gathered across
ranks *with* gradients: ``torch.distributed.nn.functional.all_gather`` sums the gradient of
every rank's loss back into the rank that produced each embedding (MONAI's ``ContrastiveLoss``
gathers nothing; lightly and VISSL once shipped gathers that dropped these gradients). With
DDP averaging the per-rank gradients afterwards, a W-process run then gets exactly the gradient
of the single-process loss on the concatenated batch (``tests/test_distributed.py``).
Rank and world size come from ``ignite.distributed``, which also notices a process group made
with ``torch.distributed.init_process_group`` directly.
"""

from __future__ import annotations

import ignite.distributed as idist
import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn


def world_size() -> int:
    """Number of processes in the run (1 without a process group)."""
    return idist.get_world_size()


def rank() -> int:
    """This process's rank (0 without a process group)."""
    return idist.get_rank()


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` from all ranks along dim 0, keeping gradients to every rank's copy.

    Ranks must hold the same number of rows (train with ``drop_last=True``).
    """
    if not _distributed():
        return x
    return torch.cat(dist_fn.all_gather(x), dim=0)


@torch.no_grad()
def gather_no_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` from all ranks along dim 0, detached (queues, key encoders)."""
    if not _distributed():
        return x.detach()
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.detach().contiguous())
    return torch.cat(parts, dim=0)


@torch.no_grad()
def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum ``x`` over ranks in place and return it (Sinkhorn-Knopp marginals)."""
    if _distributed():
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x


@torch.no_grad()
def all_reduce_max(x: torch.Tensor) -> torch.Tensor:
    """Maximum of ``x`` over ranks, in place (a shift shared by all ranks)."""
    if _distributed():
        dist.all_reduce(x, op=dist.ReduceOp.MAX)
    return x


@torch.no_grad()
def broadcast(x: torch.Tensor, src: int = 0) -> torch.Tensor:
    """Overwrite ``x`` on every rank with rank ``src``'s copy (shared random permutations)."""
    if _distributed():
        dist.broadcast(x, src=src)
    return x
