"""The second-stage (and first-stage) self-supervised pretraining loop, on one Ignite engine.

Reading order: ``pretrain`` builds the pieces (encoder from the SSL checkpoint, method, views,
optimiser), attaches the handlers (surgery on a fresh run, checkpoints, progress bar,
TensorBoard, loss log), resumes from the newest checkpoint in the run folder if there is one,
and runs. One training step is ``training_step``: augment the batch on the device, normalise
the views the way the weights expect, compute the method's loss, step.

An epoch is a fixed number of samples (``epoch_length``; the paper's 100,000 in the full
profile), drawn in repeated shuffled passes when the set is smaller, so a recipe gives the same
number of steps on any dataset. ``DeterministicEngine`` is used so that a killed run resumes
with exactly the data order and random state it would have had: a resumed run equals an
uninterrupted one. Each rank draws its own augmentations, from a generator keyed by (seed, rank,
iteration), so resuming needs no saved generator state.
"""

from __future__ import annotations

import csv
import logging
import math
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import ignite.distributed as idist
import numpy as np
import torch
from ignite.engine import DeterministicEngine, Engine, Events
from ignite.handlers import Checkpoint, DiskSaver, ProgressBar
from torch.utils.data import DataLoader, Dataset, Sampler

from medp2x import __version__
from medp2x.data.collate import ImageBatch, PretrainCollate
from medp2x.monitor import CollapseMonitor
from medp2x.networks import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    Normalize,
    build_encoder,
    strided_convs_on_one_pixel,
)

logger = logging.getLogger("medp2x.engine")

CHECKPOINT_PREFIX = "checkpoint"


@dataclass
class PretrainConfig:
    """One pretraining run. ``None`` means "the method's recipe for this profile"."""

    dataset: Dataset
    output_dir: str | Path
    method: str = "simclr"
    profile: str = "tiny"
    arch: str | None = None
    image_size: int | None = None
    # Shorter-side cap of the images the views crop from (aspect kept, never enlarged; None:
    # the profile's multiple of the crop, views.default_source_size). Crops come from each
    # image at its own resolution, as a RandomResizedCrop of the original image does.
    source_size: int | None = None
    batch_size: int | None = None
    epochs: int | None = None
    # Samples per epoch, all ranks together (None: the profile's, EPOCH_LENGTH; 0: one pass).
    epoch_length: int | None = None
    lr: float | None = None
    ssl_checkpoint: str | Path | None = None
    checkpoint_format: str = "auto"
    scale: str = "per_filter"  # weight surgery, applied only to a fresh run from ssl_checkpoint
    filters: str = "copy"
    modality: str = "rgb"  # "rgb" or "gray": channels of the stem and the augmentation recipe
    normalization: dict | str | None = (
        "auto"  # "auto": what the checkpoint expects; "imagenet"; "none"
    )
    gray_stem: str = "sum"  # gray data from an RGB checkpoint: "sum" (1-channel stem) or "repeat"
    num_workers: int = 0  # per process
    # bf16 autocast: "auto" where the device computes bf16 natively (resolve_amp), True, False
    amp: bool | str = "auto"
    seed: int = 0
    checkpoint_every: int = 0  # iterations; 0 = at the end of every epoch only
    n_saved: int | None = 2  # checkpoints kept; None keeps every one (for convergence figures)
    max_iterations: int | None = None  # stop early (smoke tests); the schedule still spans epochs
    progress: bool = True
    method_options: dict = field(default_factory=dict)  # recipe fields, e.g. {"temperature": 0.2}
    view_options: dict = field(default_factory=dict)  # augmentation fields, e.g. {"blur_p": 0.0}


@dataclass
class RunSummary:
    output_dir: Path
    encoder_path: Path
    method: str
    arch: str
    iterations: int
    epochs: int
    iterations_per_epoch: int
    total_iterations: int
    amp: bool
    first_loss: float
    last_loss: float
    resumed: bool
    surgery_applied: bool
    spread: float | None = None  # embedding spread over the last tenth of the run (None: not run)
    warnings: list[str] = field(default_factory=list)  # collapse warnings (medp2x.monitor)


class RunMeta:
    """What a checkpoint's weights are (arch, channels, normalisation, method), saved with them
    so any later reader knows how to feed the encoder."""

    def __init__(self, meta: dict):
        self.meta = meta

    def state_dict(self) -> dict:
        return dict(self.meta)

    def load_state_dict(self, state: dict) -> None:
        self.meta.update(state)


def collate_images(source_size: int, channels: int) -> PretrainCollate:
    """Batch samples at their own sizes, each capped at ``source_size`` on its shorter side,
    with the encoder's channels: an ``ImageBatch`` (padded, with every image's (h, w)) whose
    views crop each image inside its own pixels (``medp2x.data.collate``)."""
    return PretrainCollate(source_size, channels)


def resolve_normalization(cfg: PretrainConfig, report: Any) -> dict | None:
    """The input normalisation for the encoder: the user's choice, else what its weights expect."""
    if cfg.normalization != "auto":
        if cfg.normalization in (None, "none"):
            return None
        if cfg.normalization == "imagenet":
            return {"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)}
        return {"mean": list(cfg.normalization["mean"]), "std": list(cfg.normalization["std"])}
    if report is not None:
        return report.normalization
    return {"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)}


def latest_checkpoint(checkpoint_dir: Path) -> Path | None:
    files = sorted(
        checkpoint_dir.glob(f"{CHECKPOINT_PREFIX}_*.pt"),
        key=lambda p: int(p.stem.rsplit("_", 1)[-1]),
    )
    return files[-1] if files else None


def resolve_recipe(cfg: PretrainConfig) -> Any:
    """The method's recipe for the profile, with the user's overrides."""
    from medp2x.methods import recipe_for
    from medp2x.methods.base import override_recipe

    recipe = recipe_for(cfg.method, cfg.profile)
    overrides = dict(
        arch=cfg.arch, image_size=cfg.image_size, batch_size=cfg.batch_size, epochs=cfg.epochs
    )
    recipe = override_recipe(recipe, **{k: v for k, v in overrides.items() if v is not None})
    if cfg.lr is not None:  # an explicit peak learning rate: no batch-size scaling
        world_batch = recipe.batch_size * idist.get_world_size()
        recipe = override_recipe(recipe, base_lr=cfg.lr, lr_batch_divisor=world_batch)
    return recipe


# --- What an epoch is (Ciga et al. §4) --------------------------------------------------------

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
    """Samples per epoch (all ranks together): the user's, else the profile's; 0: one pass."""
    length = EPOCH_LENGTH[cfg.profile] if cfg.epoch_length is None else cfg.epoch_length
    if isinstance(length, float) and length.is_integer():  # "--epoch_length 1e5"
        length = int(length)
    if isinstance(length, bool) or not isinstance(length, int) or length < 0:
        raise ValueError(
            f"epoch_length must be a number of samples >= 0 (0: one pass over the data), "
            f"got {length!r}"
        )
    return length


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


# --- Precision and batch statistics on the device ---------------------------------------------

AMP_CHOICES = {"auto": "auto", "true": "true", "false": "false", "1": "true", "0": "false"}


@dataclass(frozen=True)
class AmpDecision:
    """Whether this run computes in bf16 autocast, and why (written to run_config.json)."""

    requested: str  # "auto", "true" or "false"
    enabled: bool
    reason: str


def parse_amp(value: bool | str | None) -> str:
    """``amp`` as given in Python (True/False/"auto") or on a bundle's command line ("true")."""
    if isinstance(value, bool):
        return "true" if value else "false"
    choice = AMP_CHOICES.get(str(value).strip().lower())
    if choice is None:
        raise ValueError(f"amp must be true, false or auto, got {value!r}")
    return choice


def cpu_bf16_features(cpuinfo: str | Path = "/proc/cpuinfo") -> list[str]:
    """The native bf16 instructions of this CPU: AVX512_BF16 and/or AMX (oneDNN's fast bf16
    paths). ``torch.backends.cpu.get_cpu_capability()`` says only "AVX512" on such CPUs, so ask
    torch's cpuinfo probes, else read the Linux flags."""
    probes = {"AVX512_BF16": "_is_avx512_bf16_supported", "AMX": "_is_amx_tile_supported"}
    if all(hasattr(torch.cpu, probe) for probe in probes.values()):
        return [name for name, probe in probes.items() if getattr(torch.cpu, probe)()]
    try:
        flags = set(Path(cpuinfo).read_text().split())
    except OSError:
        return []
    return [
        name
        for name, flag in (("AVX512_BF16", "avx512_bf16"), ("AMX", "amx_bf16"))
        if flag in flags
    ]


def native_bf16(device: torch.device) -> tuple[bool, str]:
    """Does ``device`` compute bf16 natively (True), or emulate it, many times slower than fp32?"""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        if torch.cuda.is_bf16_supported(including_emulation=False):
            return True, f"{name} computes bf16 natively"
        return False, f"{name} has no native bf16 (it needs compute capability 8.0 or later)"
    if device.type == "cpu":
        features = cpu_bf16_features()
        if features:
            return True, f"this CPU computes bf16 natively ({' and '.join(features)})"
        return False, (
            f"this CPU ({torch.backends.cpu.get_cpu_capability()}) has neither AVX512_BF16 nor "
            "AMX, so bf16 is emulated and many times slower than fp32"
        )
    return False, f"no native-bf16 check for {device.type} devices"


def resolve_amp(
    amp: bool | str | None,
    device: torch.device,
    encoder: torch.nn.Module,
    views: Any,
    channels: int,
) -> AmpDecision:
    """bf16 autocast: ``auto`` turns it on where the device computes bf16 natively and the crops
    are safe for it; an explicit ``true`` is obeyed (with a warning where bf16 is emulated) but
    still refused where it would give wrong gradients (``check_bf16_view_sizes``)."""
    requested = parse_amp(amp)
    if requested == "false":
        return AmpDecision(requested, False, "amp=false")
    native, why = native_bf16(device)
    if requested == "true":
        if device.type == "cpu":
            check_bf16_view_sizes(encoder, views, channels)
        if not native:
            message = f"amp=true, but {why}: expect a slower run than with amp=false"
            logger.warning(message)
            warnings.warn(message, RuntimeWarning, stacklevel=2)
        return AmpDecision(requested, True, f"amp=true; {why}")
    if native and device.type == "cpu":
        smallest = min(views.sizes())
        bad = strided_convs_on_one_pixel(encoder, smallest, channels)
        if bad:  # the guard of check_bf16_view_sizes, as a reason to stay in fp32
            native, why = (
                False,
                (
                    f"{why}, but its {smallest} px crops give 1 x 1 maps to strided convolutions "
                    f"({', '.join(bad)}), whose bf16 weight gradients are wrong on CPU"
                ),
            )
    decision = AmpDecision(requested, native, f"amp=auto: {'bf16' if native else 'fp32'}, {why}")
    logger.info(decision.reason)
    return decision


def wants_sync_bn(method: torch.nn.Module, device: torch.device) -> bool:
    """SyncBatchNorm across processes where the method's original uses it (SimCLR, BYOL, SwAV;
    not MoCo, whose shuffled BN needs each GPU's own statistics) and where torch has it (CUDA:
    CPU processes each keep their own BN statistics)."""
    wanted = bool(getattr(method, "sync_bn", True)) and idist.get_world_size() > 1
    if wanted and device.type != "cuda":
        logger.info(
            "SyncBatchNorm runs on CUDA only: each of the %d %s processes normalises over its own "
            "batch",
            idist.get_world_size(),
            device.type,
        )
        return False
    return wanted


def first_stage_encoder(cfg: PretrainConfig, arch: str) -> tuple[torch.nn.Module, Any]:
    """The first-stage SSL weights (P2X) or a random init (P1X), and the load report.

    On resume the weights are replaced by the run's checkpoint, but the first-stage file still
    decides the stem and the input normalisation.
    """
    from medp2x.checkpoints import load_encoder

    channels = 1 if cfg.modality == "gray" else 3
    if not cfg.ssl_checkpoint:
        return build_encoder(arch, in_channels=channels), None
    encoder, report = load_encoder(
        cfg.ssl_checkpoint,
        arch=arch,
        in_channels=channels,  # gray_stem "repeat" keeps 3 channels: gray images are repeated
        format=cfg.checkpoint_format,
        gray=cfg.gray_stem,
    )
    logger.info("first-stage weights:\n%s", report)
    return encoder, report


def first_conv_channels(encoder: torch.nn.Module) -> int:
    return next(m for m in encoder.modules() if isinstance(m, torch.nn.Conv2d)).in_channels


def check_bf16_view_sizes(encoder: torch.nn.Module, views: Any, channels: int) -> None:
    """bf16 autocast on CPU gets the weight gradients of strided convolutions on 1 x 1 maps
    wrong (``networks.strided_convs_on_one_pixel``): refuse crops that produce them."""
    smallest = min(views.sizes())
    bad = strided_convs_on_one_pixel(encoder, smallest, channels)
    if bad:
        raise ValueError(
            f"amp (bf16 autocast) on CPU computes wrong weight gradients for strided "
            f"convolutions of 1 x 1 feature maps, and {smallest} px crops give those in "
            f"{', '.join(bad)}: use larger crops (views.small_size / image_size) or amp=False"
        )


def check_finite(loss: torch.Tensor, engine: Engine, method: str, ckpt_dir: Path) -> None:
    """Stop a diverged run before the step that would write NaN into the weights (and into the
    next checkpoint): the checkpoints already on disk stay the last good state."""
    if not torch.isfinite(loss.detach()):
        raise FloatingPointError(
            f"{method} loss is {float(loss.detach())} at iteration {engine.state.iteration} (epoch "
            f"{engine.state.epoch}): the run diverged; lower lr or add warm-up "
            f"(warmup_epochs). Checkpoints before this step are in {ckpt_dir}."
        )


def check_resumable(path: Path, stored: dict | None, current: dict) -> None:
    """Refuse to resume a checkpoint of a run with other settings: its schedule, data order and
    heads would silently continue under the new ones (e.g. a stale folder reused)."""
    differ = {
        k: (stored[k], v) for k, v in current.items() if k in (stored or {}) and stored[k] != v
    }
    if differ:
        what = ", ".join(f"{k} {old!r} there, {new!r} now" for k, (old, new) in differ.items())
        raise ValueError(
            f"{path} is a checkpoint of a run with other settings ({what}): resume with the "
            f"same settings, or choose a new output_dir (or delete {path.parent.parent})"
        )


def pretrain(cfg: PretrainConfig) -> RunSummary:
    """Run (or resume) one self-supervised pretraining run and write its encoder."""
    from medp2x.checkpoints import save_encoder
    from medp2x.recovery import recover_checkpoints
    from medp2x.methods import build_method
    from medp2x.optim import build_optimizer
    from medp2x.provenance import record_seen_files
    from medp2x.surgery import SurgeryHandler
    from medp2x.views import build_views, source_size_for

    out = Path(cfg.output_dir)
    ckpt_dir = out / "checkpoints"
    recovery = recover_checkpoints(ckpt_dir, idist.get_rank() == 0)  # newest loadable one
    resume_from = recovery.path
    torch.manual_seed(cfg.seed)  # the same on every rank: heads' init, Ignite's data seed
    world, rank = idist.get_world_size(), idist.get_rank()

    recipe = resolve_recipe(cfg)
    encoder, report = first_stage_encoder(cfg, recipe.arch)
    channels = first_conv_channels(encoder)
    normalization = resolve_normalization(cfg, report)
    normalize = Normalize(**normalization) if normalization else Normalize(None, None)
    arch, batch_size, epochs = recipe.arch, recipe.batch_size, recipe.epochs

    method = build_method(cfg.method, encoder, recipe=recipe, **cfg.method_options)
    recipe = method.recipe
    device = idist.device()
    amp = resolve_amp(cfg.amp, device, encoder, recipe.views, channels)
    model = idist.auto_model(method, sync_bn=wants_sync_bn(method, device))
    normalize = normalize.to(device)
    # Each rank draws its own views: the generator is re-seeded from (seed, rank, iteration) at
    # every step (seed_views), a pure function of where the run is, so resuming is exact.
    view_generator = torch.Generator()
    augment = build_views(
        cfg.method,
        cfg.modality,
        recipe.views,
        device=device,
        generator=view_generator,
        overrides=cfg.view_options,
    )

    # An epoch of epoch_length samples from repeated shuffled passes, this rank's share; the
    # loader is plain torch (idist.auto_dataloader would divide batch_size by the world size,
    # but batch_size is per process).
    plan = plan_epochs(len(cfg.dataset), batch_size * world, epochs, resolve_epoch_length(cfg))
    sampler = PassSampler(len(cfg.dataset), plan.samples_per_epoch, world, rank, cfg.seed)
    loader = DataLoader(
        cfg.dataset,
        batch_size=batch_size,
        sampler=sampler,
        drop_last=True,
        num_workers=cfg.num_workers,
        collate_fn=collate_images(source_size_for(recipe, cfg.source_size), channels),
        persistent_workers=cfg.num_workers > 0,
        pin_memory=device.type == "cuda",
    )
    optimizer, scheduler = build_optimizer(
        method, recipe, plan.global_batch_size, plan.iterations_per_epoch
    )
    total_iterations = plan.total_iterations

    def training_step(engine: Engine, images: ImageBatch) -> dict[str, float]:
        model.train()
        images = images.to(device, non_blocking=True)
        with torch.no_grad():
            views = [normalize(v) for v in augment(images)]
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp.enabled):
            outputs = model(views)
        check_finite(outputs["loss"], engine, cfg.method, ckpt_dir)
        optimizer.zero_grad(set_to_none=True)
        outputs["loss"].backward()
        method.on_before_optimizer_step(engine.state.epoch - 1, engine.state.iteration - 1)
        optimizer.step()
        scheduler.step()
        method.on_after_optimizer_step(engine.state.iteration / total_iterations)
        logs = {
            k: float(v.detach())
            for k, v in outputs.items()
            if torch.is_tensor(v) and v.numel() == 1
        }
        logs["lr"] = optimizer.param_groups[0]["lr"]
        return logs

    trainer = DeterministicEngine(training_step)
    trainer.add_event_handler(Events.EPOCH_STARTED, lambda e: sampler.set_epoch(e.state.epoch - 1))

    @trainer.on(Events.ITERATION_STARTED)
    def seed_views(engine: Engine) -> None:
        view_generator.manual_seed(
            derived_seed(cfg.seed, VIEW_STREAM, rank, engine.state.iteration)
        )

    meta = {
        "version": __version__,
        "arch": arch,
        "in_channels": channels,
        "normalization": normalization,
        "method": cfg.method,
    }
    surgery_applied = False
    if cfg.ssl_checkpoint and (cfg.scale != "none" or cfg.filters != "none"):

        def after_surgery() -> None:
            nonlocal surgery_applied
            surgery_applied = True
            method.reset_momentum_encoders()

        SurgeryHandler(
            method.encoder,
            scale=cfg.scale,
            filters=cfg.filters,
            seed=cfg.seed,
            output_dir=out,
            after=after_surgery,
        ).attach(trainer)

    settings = {
        "method": cfg.method,
        "arch": arch,
        "image_size": recipe.views.large_size,
        "source_size": source_size_for(recipe, cfg.source_size),
        "global_batch_size": plan.global_batch_size,
        "epochs": epochs,
        "samples_per_epoch": plan.samples_per_epoch,
        "iterations_per_epoch": plan.iterations_per_epoch,
        "seed": cfg.seed,
    }
    to_save = {
        "model": method,
        "optimizer": optimizer,
        "lr_scheduler": scheduler,
        "trainer": trainer,
        "meta": RunMeta(meta),
        "settings": RunMeta(settings),
    }
    saver = Checkpoint(
        to_save,
        DiskSaver(str(ckpt_dir), require_empty=False, create_dir=True, atomic=True),
        filename_prefix="",
        filename_pattern=f"{CHECKPOINT_PREFIX}_{{global_step}}.{{ext}}",
        n_saved=cfg.n_saved,
        global_step_transform=lambda engine, _: engine.state.iteration,
    )
    recovery.adopt(saver, cfg.n_saved, rank == 0)  # keep_checkpoints counts earlier sessions'
    every = Events.EPOCH_COMPLETED | Events.TERMINATE  # TERMINATE: an early stop keeps its work
    if cfg.checkpoint_every:
        every = every | Events.ITERATION_COMPLETED(every=cfg.checkpoint_every)
    monitor = CollapseMonitor(total_iterations)
    if rank == 0:
        trainer.add_event_handler(every, saver)
        attach_loggers(trainer, out, cfg.progress)
        monitor.attach(trainer)
    if cfg.max_iterations:  # also when resumed at or past it (``once=`` would never fire)
        trainer.add_event_handler(
            Events.STARTED | Events.ITERATION_COMPLETED,
            lambda e: e.terminate() if e.state.iteration >= cfg.max_iterations else None,
        )

    if resume_from is not None:
        state = recovery.state
        check_resumable(resume_from, state.get("settings"), settings)
        Checkpoint.load_objects(to_load=to_save, checkpoint=state)
        logger.info("resuming from %s (iteration %d)", resume_from, trainer.state.iteration)
        if rank == 0:
            print(
                f"Resuming from {resume_from} at iteration {trainer.state.iteration}; no weight surgery."
            )

    finished = trainer.state.iteration >= total_iterations
    if finished:  # Ignite would restart a finished run from scratch: keep its result instead
        if rank == 0:
            print(f"{out} already finished {total_iterations} iterations; delete it to retrain.")
    else:
        torch.manual_seed(cfg.seed)  # DeterministicEngine draws its data seed from here
        # The epoch being resumed: with workers, the loader reads the sampler before the first
        # EPOCH_STARTED.
        sampler.set_epoch(trainer.state.iteration // plan.iterations_per_epoch)
        trainer.run(loader, max_epochs=epochs)

    encoder_path = out / "encoder.pt"
    if rank == 0:
        save_encoder(encoder_path, method.encoder.state_dict(), **meta)
        write_run_config(out, cfg, meta, recipe, plan, amp)
        record_seen_files(out, cfg.dataset, cfg.ssl_checkpoint)  # no test image pretrained on
    idist.barrier()  # the outputs exist before any rank reads them or starts another run
    losses = read_loss_log(out)
    if rank == 0 and losses:
        from medp2x.plots import plot_loss_curve

        plot_loss_curve(losses, out / "loss.png", title=f"{cfg.method} pretraining loss: {out}")
    return RunSummary(
        output_dir=out,
        encoder_path=encoder_path,
        method=cfg.method,
        arch=arch,
        iterations=trainer.state.iteration,
        epochs=trainer.state.epoch,
        iterations_per_epoch=plan.iterations_per_epoch,
        total_iterations=total_iterations,
        amp=amp.enabled,
        first_loss=losses[0] if losses else math.nan,
        last_loss=losses[-1] if losses else math.nan,
        resumed=resume_from is not None,
        surgery_applied=surgery_applied,
        spread=monitor.mean("spread"),
        warnings=list(monitor.warnings),
    )


def attach_loggers(trainer: Engine, out: Path, progress: bool) -> None:
    """Progress bar, TensorBoard scalars, and a CSV loss log that survives resumes."""
    from ignite.handlers.tensorboard_logger import OutputHandler, TensorboardLogger

    out.mkdir(parents=True, exist_ok=True)
    if progress:
        ProgressBar(persist=True).attach(
            trainer, output_transform=lambda logs: {"loss": logs["loss"]}
        )
    tb = TensorboardLogger(log_dir=str(out / "tb"))
    tb.attach(
        trainer,
        log_handler=OutputHandler(tag="train", output_transform=lambda logs: logs),
        event_name=Events.ITERATION_COMPLETED,
    )
    trainer.add_event_handler(Events.COMPLETED | Events.TERMINATE, lambda _: tb.close())

    log_path = out / "loss.csv"

    @trainer.on(Events.STARTED)
    def truncate_log_to_resumed_iteration(engine: Engine) -> None:
        # Iterations logged after the last checkpoint of a killed run are re-run: drop them.
        rows = read_loss_rows(out)
        kept = [r for r in rows if int(r["iteration"]) <= engine.state.iteration]
        write_loss_rows(log_path, kept)

    @trainer.on(Events.ITERATION_COMPLETED)
    def append_loss(engine: Engine) -> None:
        with open(log_path, "a", newline="") as f:
            output = engine.state.output
            csv.writer(f).writerow(
                [
                    engine.state.iteration,
                    engine.state.epoch,
                    output["loss"],
                    output.get("spread", ""),
                ]
            )


def read_loss_rows(out: Path) -> list[dict]:
    path = Path(out) / "loss.csv"
    if not path.exists():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def write_loss_rows(path: Path, rows: list[dict]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["iteration", "epoch", "loss", "spread"])
        writer.writerows([r["iteration"], r["epoch"], r["loss"], r.get("spread", "")] for r in rows)


def read_loss_log(out: Path) -> list[float]:
    return [float(r["loss"]) for r in read_loss_rows(out)]


def write_run_config(
    out: Path, cfg: PretrainConfig, meta: dict, recipe: Any, plan: EpochPlan, amp: AmpDecision
) -> None:
    """What was run, for the record (no data contents, no patient information): the settings,
    the resolved recipe, the epoch plan and the bf16 decision with its reason."""
    import json

    record = {
        k: str(v) if isinstance(v, Path) else v for k, v in asdict(cfg).items() if k != "dataset"
    }
    record["ssl_checkpoint"] = str(cfg.ssl_checkpoint) if cfg.ssl_checkpoint else None
    record["recipe"] = asdict(recipe)
    record["epoch_plan"] = {**asdict(plan), "total_iterations": plan.total_iterations}
    record["amp"] = asdict(amp)
    record["meta"] = meta
    (out / "run_config.json").write_text(json.dumps(record, indent=2, default=str))
