"""The second-stage (and first-stage) self-supervised pretraining loop, on one Ignite engine.

Reading order: ``pretrain`` builds the pieces (encoder from the SSL checkpoint, method, views,
optimiser), attaches the handlers (surgery on a fresh run, checkpoints, progress bar,
TensorBoard, loss log), resumes from the newest checkpoint in the run folder if there is one,
and runs. One training step is ``training_step``: augment the batch on the device, normalise
the views the way the weights expect, compute the method's loss, step.

``DeterministicEngine`` is used so that a killed run resumes with exactly the data order and
random state it would have had: a resumed run equals an uninterrupted one.
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
from ignite.handlers import Checkpoint, DiskSaver, ProgressBar
from torch.utils.data import Dataset, DistributedSampler

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
    lr: float | None = None
    ssl_checkpoint: str | Path | None = None
    checkpoint_format: str = "auto"
    scale: str = "per_layer"  # weight surgery, applied only to a fresh run from ssl_checkpoint
    filters: str = "copy"
    modality: str = "rgb"  # "rgb" or "gray": channels of the stem and the augmentation recipe
    normalization: dict | str | None = (
        "auto"  # "auto": what the checkpoint expects; "imagenet"; "none"
    )
    gray_stem: str = "sum"  # gray data from an RGB checkpoint: "sum" (1-channel stem) or "repeat"
    num_workers: int = 0
    amp: bool = False  # bf16 autocast
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
    from medp2x.checkpoints import save_encoder, torch_load_safe
    from medp2x.methods import build_method
    from medp2x.optim import build_optimizer
    from medp2x.provenance import record_seen_files
    from medp2x.surgery import SurgeryHandler
    from medp2x.views import build_views, source_size_for

    out = Path(cfg.output_dir)
    ckpt_dir = out / "checkpoints"
    resume_from = latest_checkpoint(ckpt_dir) if ckpt_dir.exists() else None
    torch.manual_seed(cfg.seed)

    recipe = resolve_recipe(cfg)
    encoder, report = first_stage_encoder(cfg, recipe.arch)
    channels = first_conv_channels(encoder)
    normalization = resolve_normalization(cfg, report)
    normalize = Normalize(**normalization) if normalization else Normalize(None, None)
    arch, batch_size, epochs = recipe.arch, recipe.batch_size, recipe.epochs

    method = build_method(cfg.method, encoder, recipe=recipe, **cfg.method_options)
    recipe = method.recipe
    device = idist.device()
    if cfg.amp and device.type == "cpu":
        check_bf16_view_sizes(encoder, recipe.views, channels)
    model = idist.auto_model(method, sync_bn=True)  # SyncBN across GPUs, as the originals
    normalize = normalize.to(device)
    augment = build_views(
        cfg.method, cfg.modality, recipe.views, device=device, overrides=cfg.view_options
    )

    # The shuffle order is a function of (seed, epoch) alone, never of the global RNG, so a
    # resumed run sees the same batches (Ignite's ReproducibleBatchSampler draws its order
    # lazily, after the resumed RNG state is restored, which breaks that for RandomSampler).
    sampler = DistributedSampler(
        cfg.dataset,
        num_replicas=idist.get_world_size(),
        rank=idist.get_rank(),
        shuffle=True,
        seed=cfg.seed,
        drop_last=True,
    )
    loader = idist.auto_dataloader(
        cfg.dataset,
        batch_size=batch_size,
        sampler=sampler,
        drop_last=True,
        num_workers=cfg.num_workers,
        collate_fn=collate_images(source_size_for(recipe, cfg.source_size), channels),
        persistent_workers=cfg.num_workers > 0,
    )
    if len(loader) == 0:
        raise ValueError(
            f"the dataset has {len(cfg.dataset)} samples, fewer than one batch of {batch_size}: "
            "lower batch_size or add data"
        )
    optimizer, scheduler = build_optimizer(
        method, recipe, batch_size * idist.get_world_size(), len(loader)
    )
    total_iterations = epochs * len(loader)

    def training_step(engine: Engine, images: ImageBatch) -> dict[str, float]:
        model.train()
        images = images.to(device, non_blocking=True)
        with torch.no_grad():
            views = [normalize(v) for v in augment(images)]
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.amp):
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
        "global_batch_size": batch_size * idist.get_world_size(),
        "epochs": epochs,
        "iterations_per_epoch": len(loader),
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
    every = Events.EPOCH_COMPLETED | Events.TERMINATE  # TERMINATE: an early stop keeps its work
    if cfg.checkpoint_every:
        every = every | Events.ITERATION_COMPLETED(every=cfg.checkpoint_every)
    monitor = CollapseMonitor(total_iterations)
    if idist.get_rank() == 0:
        trainer.add_event_handler(every, saver)
        attach_loggers(trainer, out, cfg.progress)
        monitor.attach(trainer)
    if cfg.max_iterations:
        trainer.add_event_handler(
            Events.ITERATION_COMPLETED(once=cfg.max_iterations), lambda e: e.terminate()
        )

    if resume_from is not None:
        state = torch_load_safe(resume_from)
        check_resumable(resume_from, state.get("settings"), settings)
        Checkpoint.load_objects(to_load=to_save, checkpoint=state)
        logger.info("resuming from %s (iteration %d)", resume_from, trainer.state.iteration)
        if idist.get_rank() == 0:
            print(
                f"Resuming from {resume_from} at iteration {trainer.state.iteration}; no weight surgery."
            )

    finished = trainer.state.iteration >= total_iterations
    if finished:  # Ignite would restart a finished run from scratch: keep its result instead
        if idist.get_rank() == 0:
            print(f"{out} already finished {total_iterations} iterations; delete it to retrain.")
    else:
        torch.manual_seed(cfg.seed)  # DeterministicEngine draws its data seed from here
        trainer.run(loader, max_epochs=epochs)

    encoder_path = out / "encoder.pt"
    if idist.get_rank() == 0:
        save_encoder(encoder_path, method.encoder.state_dict(), **meta)
        write_run_config(out, cfg, meta, recipe)
        record_seen_files(out, cfg.dataset, cfg.ssl_checkpoint)  # no test image pretrained on
    losses = read_loss_log(out)
    if idist.get_rank() == 0 and losses:
        from medp2x.plots import plot_loss_curve

        plot_loss_curve(losses, out / "loss.png", title=f"{cfg.method} pretraining loss: {out}")
    return RunSummary(
        output_dir=out,
        encoder_path=encoder_path,
        method=cfg.method,
        arch=arch,
        iterations=trainer.state.iteration,
        epochs=trainer.state.epoch,
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


def write_run_config(out: Path, cfg: PretrainConfig, meta: dict, recipe: Any) -> None:
    """What was run, for the record (no data contents, no patient information)."""
    import json

    record = {
        k: str(v) if isinstance(v, Path) else v for k, v in asdict(cfg).items() if k != "dataset"
    }
    record["ssl_checkpoint"] = str(cfg.ssl_checkpoint) if cfg.ssl_checkpoint else None
    record["recipe"] = asdict(recipe)
    record["meta"] = meta
    (out / "run_config.json").write_text(json.dumps(record, indent=2, default=str))
