"""What an epoch is: a fixed number of samples drawn in repeated shuffled passes, shared between
ranks without overlap (Ciga et al., Section 4), and the seeds derived from (seed, rank, step) that
make a resumed run equal an uninterrupted one."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch.utils.data import Sampler

if TYPE_CHECKING:
    from medp2x.engine import PretrainConfig

# Samples per epoch by profile. The paper fixes them "to fairly compare datasets with different
# number of pretraining samples" (100,000, read as samples: 1000 epochs at batch 1024 are then
# ~97,000 steps on any dataset). 0 means one pass over the data, the tiny profile's smoke runs.
EPOCH_LENGTH = {"full": 100_000, "tiny": 0}

# Independent random streams of one run, mixed with its seed (``derived_seed``).
SAMPLER_STREAM, VIEW_STREAM = 0, 1


def derived_seed(seed: int, *keys: int) -> int:
    """A seed for the stream ``keys`` of run ``seed`` (NumPy's SeedSequence mixes them, so the
    streams of nearby seeds, ranks or iterations do not overlap as ``seed + k`` would)."""
    state = np.random.SeedSequence(seed % 2**64, spawn_key=keys).generate_state(1, np.uint64)
    return int(state[0] >> np.uint64(1))  # 63 bits: any torch.Generator takes it


def resolve_epoch_length(cfg: PretrainConfig) -> int:
    """Samples per epoch (all ranks together): the user's, else the profile's; 0: one pass.
    The user's value was checked (and 1e5 made an int) by ``check_pretrain_settings``."""
    return EPOCH_LENGTH[cfg.profile] if cfg.epoch_length is None else cfg.epoch_length


@dataclass(frozen=True)
class EpochPlan:
    """How many samples and steps make an epoch and a run; every schedule counted in epochs
    (warm-up, cosine, SwAV's frozen prototypes and queue start, checkpoints) uses these."""

    dataset_size: int
    global_batch_size: int
    samples_per_epoch: int  # a whole number of global batches
    iterations_per_epoch: int
    epochs: int

    @property
    def total_iterations(self) -> int:
        return self.epochs * self.iterations_per_epoch

    @property
    def passes_per_epoch(self) -> float:
        return self.samples_per_epoch / self.dataset_size


def plan_epochs(
    dataset_size: int, global_batch_size: int, epochs: int, epoch_length: int
) -> EpochPlan:
    """Iterations per epoch = ``epoch_length // global batch`` (``epoch_length`` 0: one pass
    over the data, at least one batch, so a set smaller than a batch still trains)."""
    if dataset_size < 1:
        raise ValueError("the dataset is empty: check data_dir and what the reader accepts")
    if epoch_length and epoch_length < global_batch_size:
        raise ValueError(
            f"epoch_length {epoch_length} is less than one global batch of {global_batch_size} "
            f"samples: raise epoch_length or lower batch_size"
        )
    samples = epoch_length or max(dataset_size, global_batch_size)
    iterations = samples // global_batch_size
    return EpochPlan(
        dataset_size=dataset_size,
        global_batch_size=global_batch_size,
        samples_per_epoch=iterations * global_batch_size,
        iterations_per_epoch=iterations,
        epochs=int(epochs),
    )


class PassSampler(Sampler[int]):
    """This rank's share of one epoch, taken from an endless stream of shuffled passes.

    The stream concatenates passes over the dataset, pass ``p`` a permutation seeded by
    ``(seed, p)``; epoch ``e`` is the stream's next ``samples_per_epoch`` indices, dealt to the
    ranks in turn (rank ``r`` takes positions ``r, r + W, ...``, so no two ranks share one).
    A set smaller than an epoch is seen in repeated passes (no image twice before every image
    once), a larger one across epochs, and the order is a function of ``(seed, epoch)`` alone:
    a resumed run draws the same batches whatever the random state (Ignite's
    ReproducibleBatchSampler draws lazily, after the resumed RNG state is restored).
    """

    def __init__(
        self,
        dataset_size: int,
        samples_per_epoch: int,
        num_replicas: int = 1,
        rank: int = 0,
        seed: int = 0,
    ):
        if dataset_size < 1 or samples_per_epoch < 1 or samples_per_epoch % num_replicas:
            raise ValueError(
                f"need a non-empty dataset and samples_per_epoch a multiple of the {num_replicas} "
                f"ranks, got {dataset_size} samples and {samples_per_epoch} per epoch"
            )
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} is outside 0..{num_replicas - 1}")
        self.dataset_size, self.samples_per_epoch = dataset_size, samples_per_epoch
        self.num_replicas, self.rank, self.seed = num_replicas, rank, seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.samples_per_epoch // self.num_replicas

    def permutation(self, pass_index: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(derived_seed(self.seed, SAMPLER_STREAM, pass_index))
        return torch.randperm(self.dataset_size, generator=g)

    def epoch_indices(self, epoch: int) -> torch.Tensor:
        """The indices of ``epoch`` for all ranks together, in stream order."""
        start = epoch * self.samples_per_epoch
        stop = start + self.samples_per_epoch
        first, last = start // self.dataset_size, (stop - 1) // self.dataset_size
        stream = torch.cat([self.permutation(p) for p in range(first, last + 1)])
        offset = start - first * self.dataset_size
        return stream[offset : offset + self.samples_per_epoch]

    def __iter__(self) -> Iterator[int]:
        indices = self.epoch_indices(self.epoch)[self.rank :: self.num_replicas]
        return iter(indices.tolist())
