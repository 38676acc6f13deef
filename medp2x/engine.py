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
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import ignite.distributed as idist
import torch
from ignite.engine import DeterministicEngine, Engine, Events
from ignite.handlers import Checkpoint
from torch.utils.data import DataLoader, Dataset

from medp2x import __version__, run_folder
from medp2x.atomic import atomic_write, atomic_write_bytes, atomic_write_text
from medp2x.data.collate import ImageBatch, PretrainCollate
from medp2x.monitor import CollapseMonitor
from medp2x.networks import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    Normalize,
    build_encoder,
)
from medp2x.precision import AmpDecision, resolve_amp, wants_sync_bn
from medp2x.sampling import (
    VIEW_STREAM,
    EpochPlan,
    PassSampler,
    derived_seed,
    plan_epochs,
    resolve_epoch_length,
)
from medp2x.settings import check_pretrain_settings

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
    batch_size: int | None = None  # per process and per forward pass (docs/distributed.md)
    # Forward passes summed into one optimiser step: global batch = batch_size x ranks x this.
    accumulation_steps: int = 1
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

    def __post_init__(self) -> None:
        check_pretrain_settings(self)


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
    skipped: int = 0  # unreadable files passed over under on_error="skip"
    skipped_list: Path | None = None  # their list (file and reason), None when there were none

    def skipped_line(self) -> str:
        """The line every run summary ends with (#21): how many files were skipped, and where."""
        if not self.skipped:
            return "skipped files: 0 (every file read)"
        return f"skipped files: {self.skipped} (list with reasons: {self.skipped_list})"


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
        world_batch = recipe.batch_size * idist.get_world_size() * cfg.accumulation_steps
        recipe = override_recipe(recipe, base_lr=cfg.lr, lr_batch_divisor=world_batch)
    return recipe


def first_stage_encoder(
    cfg: PretrainConfig, arch: str, encoder: torch.nn.Module | None = None
) -> tuple[torch.nn.Module, Any]:
    """The first-stage SSL weights (P2X) or a random init (P1X), and the load report.

    ``encoder`` is the network to train (a bundle's ``network_def``); None builds torchvision's
    ``arch``. On resume the weights are replaced by the run's checkpoint, but the first-stage
    file still decides the stem and the input normalisation.
    """
    from medp2x.checkpoints import load_encoder, read_checkpoint

    channels = 1 if cfg.modality == "gray" else 3
    if not cfg.ssl_checkpoint:
        if encoder is None:
            return build_encoder(arch, in_channels=channels), None
        return random_init(encoder, cfg.seed), None
    if encoder is None:
        encoder, report = load_encoder(
            cfg.ssl_checkpoint,
            arch=arch,
            in_channels=channels,  # gray_stem "repeat" keeps 3 channels: gray images are repeated
            format=cfg.checkpoint_format,
            gray=cfg.gray_stem,
        )
    else:
        state, report = read_checkpoint(
            cfg.ssl_checkpoint, cfg.checkpoint_format, False, channels, cfg.gray_stem, arch=arch
        )
        try:
            encoder.load_state_dict(state)
        except RuntimeError as err:
            raise ValueError(
                f"ssl_checkpoint {cfg.ssl_checkpoint} does not fit network_def ({arch}, "
                f"{first_conv_channels(encoder)} input channels): {str(err).splitlines()[0]}"
            ) from None
    logger.info("first-stage weights:\n%s", report)
    return encoder, report


def random_init(encoder: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Re-draw a declared network's weights from the run's seed, with torchvision's ResNet
    init (He normal, fan-out, for convolutions; BN at 1 and 0): a bundle instantiates
    ``network_def`` before the run is seeded, and ``--seed`` must still decide a P1X init."""
    torch.manual_seed(seed)
    for module in encoder.modules():
        if isinstance(module, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            if module.bias is not None:  # else left as the unseeded construction drew it
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, (torch.nn.BatchNorm2d, torch.nn.GroupNorm)):
            torch.nn.init.ones_(module.weight)
            torch.nn.init.zeros_(module.bias)
        elif hasattr(module, "reset_parameters"):
            module.reset_parameters()
    return encoder


def first_conv_channels(encoder: torch.nn.Module) -> int:
    return next(m for m in encoder.modules() if isinstance(m, torch.nn.Conv2d)).in_channels


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


# --- One run, in pieces: build it, create its trainer, attach handlers, resume, train, finish -
#
# ``pretrain`` composes these for the Python API; the bundles (``bundles/configs/train.json``)
# compose the same pieces with the handler list a user can edit.


@dataclass
class PretrainRun:
    """Everything one pretraining run is made of, built once by ``build_run``.

    Handlers read what they need from here (``trainer.pretraining``), so a handler declared in a
    bundle needs no reference to objects that exist only once the data has been read."""

    cfg: PretrainConfig
    out: Path
    recipe: Any
    method: Any  # medp2x.methods.SSLMethod: the encoder and the method's heads
    model: torch.nn.Module  # ``method`` wrapped for the processes (idist.auto_model)
    device: torch.device
    amp: AmpDecision
    normalize: Normalize
    augment: Any  # medp2x.views.BatchAugment
    view_generator: torch.Generator
    plan: EpochPlan
    sampler: PassSampler
    loader: DataLoader
    optimizer: torch.optim.Optimizer
    scheduler: Any  # stepped inside the training step, after the optimiser (see create_trainer)
    meta: dict  # what the encoder's weights are: saved with every checkpoint and encoder.pt
    settings: dict  # what must match for a checkpoint to be resumed
    rank: int = 0
    surgery_applied: bool = False
    resumed_from: Path | None = None
    monitor: CollapseMonitor | None = None  # set by the collapse-monitor handler
    handlers: list = field(default_factory=list)  # as attached, for the run's record

    @property
    def ckpt_dir(self) -> Path:
        return run_folder.checkpoint_dir(self.out)

    @property
    def has_first_stage(self) -> bool:
        return bool(self.cfg.ssl_checkpoint)


class PretrainEngine(DeterministicEngine):
    """The Ignite trainer of one run; ``pretraining`` is the ``PretrainRun`` its handlers read."""

    pretraining: PretrainRun


def build_run(
    cfg: PretrainConfig,
    encoder: torch.nn.Module | None = None,
    method: Any = None,
    views: Any = None,
    optimizer: Any = None,
) -> PretrainRun:
    """Build the run's pieces in the paper's order: recipe, first-stage encoder (or a random
    init), method, views, epoch plan and loader, optimiser and schedule.

    The bundles declare the pieces (``_mode_: partial`` components): ``encoder`` is the network
    to train (its ``arch`` must be the recipe's, which names it in the checkpoints), ``method``
    a callable like ``medp2x.methods.build_method`` (``name, encoder, recipe=, **options``),
    ``views`` one like ``medp2x.views.build_views`` (``method, modality, spec, device=,
    generator=, overrides=``), ``optimizer`` one like ``medp2x.optim.build_optimizer``
    (``method, recipe, global_batch, steps_per_epoch``; it returns the optimiser and the
    per-iteration schedule). None: medp2x's own.
    """
    from medp2x.distributed import check_launch
    from medp2x.methods import build_method
    from medp2x.optim import build_optimizer
    from medp2x.views import build_views

    check_launch()
    torch.manual_seed(cfg.seed)  # the same on every rank: heads' init, Ignite's data seed
    rank = idist.get_rank()
    recipe = resolve_recipe(cfg)
    encoder, report = first_stage_encoder(cfg, recipe.arch, encoder)
    channels = first_conv_channels(encoder)
    normalization = resolve_normalization(cfg, report)
    normalize = Normalize(**normalization) if normalization else Normalize(None, None)

    ssl = (method or build_method)(cfg.method, encoder, recipe=recipe, **cfg.method_options)
    recipe = ssl.recipe
    device = idist.device()
    amp = resolve_amp(cfg.amp, device, encoder, recipe.views, channels)
    model = idist.auto_model(ssl, sync_bn=wants_sync_bn(ssl, device))
    # Each rank draws its own views: the generator is re-seeded from (seed, rank, iteration) at
    # every step (create_trainer), a pure function of where the run is, so resuming is exact.
    view_generator = torch.Generator()
    augment = (views or build_views)(
        cfg.method,
        cfg.modality,
        recipe.views,
        device=device,
        generator=view_generator,
        overrides=cfg.view_options,
    )

    plan, sampler, loader = epoch_loader(cfg, recipe, channels, device)
    optim, scheduler = (optimizer or build_optimizer)(
        ssl, recipe, plan.global_batch_size, plan.iterations_per_epoch
    )
    meta = {
        "version": __version__,
        "arch": recipe.arch,
        "in_channels": channels,
        "normalization": normalization,
        "method": cfg.method,
    }
    return PretrainRun(
        cfg=cfg,
        out=Path(cfg.output_dir),
        recipe=recipe,
        method=ssl,
        model=model,
        device=device,
        amp=amp,
        normalize=normalize.to(device),
        augment=augment,
        view_generator=view_generator,
        plan=plan,
        sampler=sampler,
        loader=loader,
        optimizer=optim,
        scheduler=scheduler,
        meta=meta,
        settings=resumable_settings(cfg, recipe, plan),
        rank=rank,
    )


def epoch_loader(
    cfg: PretrainConfig, recipe: Any, channels: int, device: torch.device
) -> tuple[EpochPlan, PassSampler, DataLoader]:
    """An epoch of ``epoch_length`` samples from repeated shuffled passes, this rank's share.
    The loader is plain torch (``idist.auto_dataloader`` would divide ``batch_size`` by the
    world size, but ``batch_size`` is per process)."""
    from medp2x.views import source_size_for

    world, rank = idist.get_world_size(), idist.get_rank()
    step_batch = recipe.batch_size * cfg.accumulation_steps  # this rank's samples per step
    plan = plan_epochs(
        len(cfg.dataset), step_batch * world, recipe.epochs, resolve_epoch_length(cfg)
    )
    sampler = PassSampler(len(cfg.dataset), plan.samples_per_epoch, world, rank, cfg.seed)
    loader = DataLoader(
        cfg.dataset,
        batch_size=step_batch,
        sampler=sampler,
        drop_last=True,
        num_workers=cfg.num_workers,
        collate_fn=collate_images(source_size_for(recipe, cfg.source_size), channels),
        persistent_workers=cfg.num_workers > 0,
        pin_memory=device.type == "cuda",
    )
    return plan, sampler, loader


def resumable_settings(cfg: PretrainConfig, recipe: Any, plan: EpochPlan) -> dict:
    """What must match for a checkpoint to be resumed (``check_resumable``)."""
    from medp2x.views import source_size_for

    return {
        "method": cfg.method,
        "arch": recipe.arch,
        "image_size": recipe.views.large_size,
        "source_size": source_size_for(recipe, cfg.source_size),
        "global_batch_size": plan.global_batch_size,
        "epochs": recipe.epochs,
        "samples_per_epoch": plan.samples_per_epoch,
        "iterations_per_epoch": plan.iterations_per_epoch,
        "seed": cfg.seed,
    }


def create_trainer(run: PretrainRun) -> PretrainEngine:
    """The Ignite engine of one run: the training step, the epoch's sampler draw, the views'
    seed for each step, and ``max_iterations``.

    The learning-rate schedule steps inside the step, right after the optimiser: as a separate
    handler, its order relative to the checkpoint saver would decide whether a checkpoint holds
    the schedule before or after the step it saved, and resuming would no longer be exact.
    One iteration is one optimiser step: with ``accumulation_steps`` A, the loader's batch is
    split into A forward passes whose gradients (each loss divided by A) add up before the
    step, and DDP all-reduces only after the last (``no_sync``); the schedule, the momentum
    encoders and the checkpoints count optimiser steps.
    """
    from medp2x.distributed import mean_over_ranks

    cfg, method, optimizer, scheduler = run.cfg, run.method, run.optimizer, run.scheduler
    device, amp, total = run.device, run.amp, run.plan.total_iterations
    steps = cfg.accumulation_steps

    def forward_backward(engine: Engine, images: ImageBatch, sync: bool) -> dict:
        images = images.to(device, non_blocking=True)  # one pass's images on the device at a time
        with torch.no_grad():
            views = [run.normalize(v) for v in run.augment(images)]
        with no_sync(run.model, enabled=not sync):
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp.enabled):
                outputs = run.model(views)
            check_finite(outputs["loss"], engine, cfg.method, run.ckpt_dir)
            (outputs["loss"] / steps if steps > 1 else outputs["loss"]).backward()
        return {k: float(v.detach()) for k, v in outputs.items() if scalar(v)}

    def training_step(engine: Engine, images: ImageBatch) -> dict[str, float]:
        run.model.train()
        optimizer.zero_grad(set_to_none=True)
        parts = split_batch(images, steps)
        passes = [forward_backward(engine, p, i == len(parts) - 1) for i, p in enumerate(parts)]
        method.on_before_optimizer_step(engine.state.epoch - 1, engine.state.iteration - 1)
        optimizer.step()
        scheduler.step()
        method.on_after_optimizer_step(engine.state.iteration / total)
        logs = mean_over_ranks({k: sum(p[k] for p in passes) / len(passes) for k in passes[0]})
        logs["lr"] = optimizer.param_groups[0]["lr"]
        return logs

    trainer = PretrainEngine(training_step)
    trainer.pretraining = run
    trainer.add_event_handler(
        Events.EPOCH_STARTED, lambda e: run.sampler.set_epoch(e.state.epoch - 1)
    )

    @trainer.on(Events.ITERATION_STARTED)
    def seed_views(engine: Engine) -> None:
        run.view_generator.manual_seed(
            derived_seed(cfg.seed, VIEW_STREAM, run.rank, engine.state.iteration)
        )

    if cfg.max_iterations:  # also when resumed at or past it (``once=`` would never fire)
        trainer.add_event_handler(
            Events.STARTED | Events.ITERATION_COMPLETED,
            lambda e: e.terminate() if e.state.iteration >= cfg.max_iterations else None,
        )
    return trainer


def scalar(value: Any) -> bool:
    return torch.is_tensor(value) and value.numel() == 1


def split_batch(images: ImageBatch, parts: int) -> list[ImageBatch]:
    """``images`` as ``parts`` consecutive equal forward passes (gradient accumulation)."""
    if parts == 1:
        return [images]
    size = len(images) // parts
    return [
        ImageBatch(
            images.pixels[i * size : (i + 1) * size], images.sizes[i * size : (i + 1) * size]
        )
        for i in range(parts)
    ]


def no_sync(model: torch.nn.Module, enabled: bool) -> Any:
    """DDP's ``no_sync`` (keep this pass's gradients local: they are all-reduced with the last
    pass of the step) where ``enabled`` and the model is DDP; else nothing."""
    from contextlib import nullcontext

    return model.no_sync() if enabled and hasattr(model, "no_sync") else nullcontext()


def default_handlers(cfg: PretrainConfig) -> list:
    """The handlers a run gets from the Python API, in the bundles' order: weight surgery
    (a P2X run: it needs first-stage weights), checkpoints, progress bar, TensorBoard, loss
    CSV, collapse monitor."""
    from medp2x import handlers

    chosen = [
        handlers.WeightSurgery(scale=cfg.scale, filters=cfg.filters),
        handlers.CheckpointSaver(every=cfg.checkpoint_every, n_saved=cfg.n_saved),
        handlers.ProgressBarHandler() if cfg.progress else None,
        handlers.TensorBoardHandler(),
        handlers.LossCSV(),
        handlers.CollapseMonitorHandler(),
    ]
    return [h for h in chosen if h is not None]


def attach_handlers(trainer: PretrainEngine, handlers: list) -> None:
    """Attach each handler in order (Ignite fires handlers of one event in attach order).

    A handler is anything with ``attach(engine)``: medp2x's read the run from
    ``engine.pretraining``; MONAI's and Ignite's handlers work as they are. ``None`` entries are
    skipped, so a bundle can switch one off."""
    for handler in handlers:
        if handler is None:
            continue
        if not callable(getattr(handler, "attach", None)):
            raise TypeError(
                f"train#handlers: {handler!r} has no attach(engine) method: a handler must be an "
                "Ignite/MONAI handler object"
            )
        handler.attach(trainer)
        trainer.pretraining.handlers.append(handler)


def checkpoint_objects(trainer: PretrainEngine) -> dict:
    """What a checkpoint holds: everything a resumed run needs to continue exactly."""
    run = trainer.pretraining
    return {
        "model": run.method,
        "optimizer": run.optimizer,
        "lr_scheduler": run.scheduler,
        "trainer": trainer,
        "meta": RunMeta(run.meta),
        "settings": RunMeta(run.settings),
    }


def resume(trainer: PretrainEngine) -> Path | None:
    """Load the newest checkpoint of the run folder, if any (weights, optimiser, schedule and
    the trainer's position); weight surgery then sees iteration > 0 and is not re-applied."""
    from medp2x.recovery import recover_checkpoints

    run = trainer.pretraining
    recovery = recover_checkpoints(run.ckpt_dir, run.rank == 0)  # newest loadable (#21)
    for handler in run.handlers:  # keep_checkpoints counts the earlier sessions' files
        getattr(handler, "adopt", lambda _: None)(recovery)
    resume_from = recovery.path
    if resume_from is None:
        return None
    state = recovery.state
    check_resumable(resume_from, state.get("settings"), run.settings)
    Checkpoint.load_objects(to_load=checkpoint_objects(trainer), checkpoint=state)
    logger.info("resuming from %s (iteration %d)", resume_from, trainer.state.iteration)
    if run.rank == 0:
        print(
            f"Resuming from {resume_from} at iteration {trainer.state.iteration}; no weight surgery."
        )
    run.resumed_from = resume_from
    return resume_from


def train(trainer: PretrainEngine) -> None:
    """Run the trainer to the end of the schedule (a finished run is kept, not restarted)."""
    run = trainer.pretraining
    total = run.plan.total_iterations
    if trainer.state.iteration >= total:  # Ignite would restart a finished run from scratch
        if run.rank == 0:
            print(f"{run.out} already finished {total} iterations; delete it to retrain.")
        return
    torch.manual_seed(run.cfg.seed)  # DeterministicEngine draws its data seed from here
    # The epoch being resumed: with workers, the loader reads the sampler before the first
    # EPOCH_STARTED.
    run.sampler.set_epoch(trainer.state.iteration // run.plan.iterations_per_epoch)
    trainer.run(run.loader, max_epochs=run.plan.epochs)


SKIPPED_LIST = run_folder.SKIPPED_FILES


def skipped_files(dataset: Any) -> list[tuple[str, str]]:
    """(file, reason) of every file the dataset's readers skipped, through ``Subset`` and
    ``ConcatDataset`` wrappers (each reader keeps a ``SkipLog`` in ``.skipped``)."""
    from medp2x.data.base import SkipLog

    found, seen, stack = [], set(), [dataset]
    while stack:
        node = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        if isinstance(getattr(node, "skipped", None), SkipLog):
            found += node.skipped.skipped
        if getattr(node, "dataset", None) is not None:
            stack.append(node.dataset)
        stack += list(getattr(node, "datasets", None) or [])
    return list(dict.fromkeys(found))


def write_skipped_list(out: Path, skipped: list[tuple[str, str]]) -> Path | None:
    """``out/skipped_files.txt``, one ``file<TAB>reason`` line each (a stale list of an earlier
    run is removed when none was skipped this time); undecodable names are escaped."""
    listing = out / SKIPPED_LIST
    if not skipped:
        listing.unlink(missing_ok=True)
        return None
    text = "".join(f"{path}\t{reason}\n" for path, reason in skipped)
    data = text.encode("utf-8", errors="backslashreplace")
    return atomic_write_bytes(listing, data)


def finish(trainer: PretrainEngine) -> RunSummary:
    """Write the encoder, the run's record and its seen-files list (rank 0), then summarise."""
    from medp2x.checkpoints import save_encoder
    from medp2x.provenance import record_seen_files

    run = trainer.pretraining
    cfg, out = run.cfg, run.out
    encoder_path = out / run_folder.ENCODER
    if run.rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        save_encoder(encoder_path, run.method.encoder.state_dict(), **run.meta)
        write_run_config(out, cfg, run.meta, run.recipe, run.plan, run.amp, run.handlers)
        record_seen_files(out, cfg.dataset, cfg.ssl_checkpoint)  # no test image pretrained on
    skipped = skipped_files(cfg.dataset)
    listing = write_skipped_list(out, skipped) if run.rank == 0 else out / SKIPPED_LIST
    idist.barrier()  # the outputs exist before any rank reads them or starts another run
    losses = read_loss_log(out)
    if run.rank == 0 and losses:
        from medp2x.plots import plot_loss_curve

        plot_loss_curve(losses, out / "loss.png", title=f"{cfg.method} pretraining loss: {out}")
    monitor = run.monitor
    return RunSummary(
        output_dir=out,
        encoder_path=encoder_path,
        method=cfg.method,
        arch=run.recipe.arch,
        iterations=trainer.state.iteration,
        epochs=trainer.state.epoch,
        iterations_per_epoch=run.plan.iterations_per_epoch,
        total_iterations=run.plan.total_iterations,
        amp=run.amp.enabled,
        first_loss=losses[0] if losses else math.nan,
        last_loss=losses[-1] if losses else math.nan,
        resumed=run.resumed_from is not None,
        surgery_applied=run.surgery_applied,
        spread=monitor.mean("spread") if monitor else None,
        warnings=list(monitor.warnings) if monitor else [],
        skipped=len(skipped),
        skipped_list=listing if skipped else None,
    )


def pretrain(
    cfg: PretrainConfig,
    handlers: list | None = None,
    trainer_factory: Any = None,
    **components: Any,
) -> RunSummary:
    """Run (or resume) one self-supervised pretraining run and write its encoder.

    ``handlers`` replaces ``default_handlers(cfg)`` (the bundles pass their ``train#handlers``);
    ``trainer_factory`` replaces ``create_trainer``; ``components`` (``encoder``, ``method``,
    ``views``, ``optimizer``) replace medp2x's own (``build_run``)."""
    run = build_run(cfg, **components)
    trainer = (trainer_factory or create_trainer)(run)
    attach_handlers(trainer, default_handlers(cfg) if handlers is None else handlers)
    resume(trainer)
    train(trainer)
    return finish(trainer)


def read_loss_rows(out: Path) -> list[dict]:
    path = Path(out) / run_folder.LOSS_CSV
    if not path.exists():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def write_loss_rows(path: Path, rows: list[dict]) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["iteration", "epoch", "loss", "spread"])
            writer.writerows(
                [r["iteration"], r["epoch"], r["loss"], r.get("spread", "")] for r in rows
            )

    atomic_write(path, write)


def read_loss_log(out: Path) -> list[float]:
    return [float(r["loss"]) for r in read_loss_rows(out)]


def write_run_config(
    out: Path,
    cfg: PretrainConfig,
    meta: dict,
    recipe: Any,
    plan: EpochPlan,
    amp: AmpDecision,
    handlers: list = (),
) -> None:
    """What was run, for the record (no data contents, no patient information): the settings,
    the resolved recipe, the epoch plan, the bf16 decision with its reason, and the handlers
    the trainer had (a bundle's ``train#handlers`` decide surgery, not ``cfg.scale``)."""
    import json

    record = {
        k: str(v) if isinstance(v, Path) else v for k, v in asdict(cfg).items() if k != "dataset"
    }
    record["ssl_checkpoint"] = str(cfg.ssl_checkpoint) if cfg.ssl_checkpoint else None
    record["recipe"] = asdict(recipe)
    record["epoch_plan"] = {**asdict(plan), "total_iterations": plan.total_iterations}
    record["world_size"] = idist.get_world_size()  # global batch = batch x this x accumulation
    record["amp"] = asdict(amp)
    record["meta"] = meta
    record["handlers"] = [describe_handler(h) for h in handlers]
    atomic_write_text(out / run_folder.RUN_CONFIG, json.dumps(record, indent=2, default=str))


def describe_handler(handler: Any) -> dict:
    """A handler as its class and its plain settings (numbers, strings, flags)."""
    cls = type(handler)
    plain = {
        k: v
        for k, v in vars(handler).items()
        if not k.startswith("_") and (v is None or isinstance(v, (bool, int, float, str)))
    }
    return {"class": f"{cls.__module__}.{cls.__qualname__}", **plain}
