"""Collectives the SSL losses need, identity in a single process.

Contrastive losses take negatives from the *global* batch, so embeddings are gathered across
ranks *with* gradients: ``torch.distributed.nn.functional.all_gather`` sums the gradient of
every rank's loss back into the rank that produced each embedding (MONAI's ``ContrastiveLoss``
gathers nothing; lightly and VISSL once shipped gathers that dropped these gradients). With
DDP averaging the per-rank gradients afterwards, a W-process run then gets exactly the gradient
of the single-process loss on the concatenated batch (``tests/test_distributed.py``).
Rank and world size come from ``ignite.distributed``, which also notices a process group made
with ``torch.distributed.init_process_group`` directly.

``initialize`` and ``finalize`` are what a bundle's ``multi_gpu_train.json`` overlay runs
around the job under ``torchrun`` (docs/distributed.md): join the process group torchrun
describes in the environment, with NCCL on GPUs and gloo on CPUs unless told otherwise.
"""

from __future__ import annotations

import logging
import os
import sys
from datetime import timedelta

import ignite.distributed as idist
import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn

BACKENDS = ("auto", "nccl", "gloo")
# A collective that waits longer than this for a rank stops the job with an error (a rank
# that exits is caught sooner, by torchrun, which then stops the others).
DEFAULT_TIMEOUT_MINUTES = 30.0


def resolve_backend(backend: str = "auto") -> str:
    """``auto``: NCCL where this process sees a GPU, gloo on CPUs; else the backend named."""
    if backend not in BACKENDS:
        raise ValueError(f"backend = {backend!r} is not allowed: one of {', '.join(BACKENDS)}")
    if backend == "auto":
        return "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl" and not torch.cuda.is_available():
        raise ValueError(
            "backend = 'nccl' needs GPUs, and this process sees none: use gloo or auto"
        )
    return backend


def initialize(
    backend: str = "auto", timeout_minutes: float = DEFAULT_TIMEOUT_MINUTES, quiet: bool = True
) -> torch.device:
    """Join torchrun's process group (``env://``: RANK, WORLD_SIZE, MASTER_ADDR, ...) and
    return this process's device (``cuda:LOCAL_RANK`` under NCCL). ``quiet``: ranks other than
    0 print nothing to stdout and log warnings only, so one run prints one report; their
    errors still reach stderr."""
    if "WORLD_SIZE" not in os.environ:
        raise ValueError(
            "multi_gpu_train.json is for runs started by torchrun (or srun + torchrun): no "
            "WORLD_SIZE in the environment; drop the overlay to run in one process"
        )
    backend = resolve_backend(backend)
    if not dist.is_initialized():
        timeout = timedelta(minutes=float(timeout_minutes))
        store, rank, world = attempt_store(timeout)
        dist.init_process_group(backend, store=store, rank=rank, world_size=world, timeout=timeout)
    device = torch.device("cpu")
    if backend == "nccl":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    if quiet and dist.get_rank() != 0:
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 (for the life of the process)
        logging.getLogger("medp2x").setLevel(logging.WARNING)
    return device


def attempt_store(timeout: timedelta) -> tuple[dist.Store, int, int]:
    """torchrun's ``env://`` store, its keys prefixed by the restart attempt.

    The elastic agent keeps one store across ``--max-restarts`` restarts, and a process group
    created after the default one (Ignite's ``idist`` makes one to count processes per node)
    would read the previous attempt's peer addresses there and fail with "Connection refused"
    on every restart (torch 2.14, gloo; tests/test_distributed.py restarts a run)."""
    store, rank, world = next(dist.rendezvous("env://", timeout=timeout))
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    return dist.PrefixStore(f"medp2x/attempt_{attempt}", store), rank, world


def finalize() -> None:
    """Leave the process group (the bundle's ``finalize``)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def check_launch() -> None:
    """Refuse a run that torchrun started on several processes without a process group: each
    process would train alone and all would write the same files."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not (dist.is_available() and dist.is_initialized()):
        raise ValueError(
            f"started as one of {world} processes (WORLD_SIZE={world}) but no process group "
            "exists: add bundles/configs/multi_gpu_train.json to --config_file "
            "(docs/distributed.md)"
        )


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


@torch.no_grad()
def mean_over_ranks(values: dict[str, float]) -> dict[str, float]:
    """The mean of each logged scalar over ranks, so that rank 0's log is the global batch's
    (its own loss alone would be that of a 1/W batch, e.g. for SimCLR); identity in one process."""
    if not _distributed():
        return values
    keys = sorted(values)  # the same order on every rank
    total = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64)
    dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return dict(zip(keys, (total / dist.get_world_size()).tolist(), strict=True))
