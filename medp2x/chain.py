"""An N-stage chain of pretraining runs in one command: HPT's base -> source -> target and
S3L's small-architecture pretraining -> warm-up.

Each stage is one ``engine.pretrain`` run in ``<output_dir>/<i>_<name>/``, initialised from
the previous stage's ``encoder.pt`` (the first from ``base_checkpoint``). Only the backbone
moves between stages: every stage builds its method's heads afresh (projector, predictor,
prototypes, MoCo's queue and key network, which copies the new query encoder), as HPT loads
its ``pretrained`` weights into the backbone only and S3L loads conv1-conv5 without heads.

``chain.json`` in the run folder records the stages (settings, data folder and sample count,
where each started from) and their status. A killed chain started again with the same
command skips the finished stages and resumes the running one from its newest checkpoint
(``engine.resume``: mid-stage, exactly); a chain started again with other stage settings is
refused instead of mixing two recipes.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from torch.utils.data import Dataset, Subset

from medp2x.atomic import atomic_write_text
from medp2x.pipeline import DatasetFactory, check_output_dir
from medp2x.schedules import TRAINABLE, largest_size, parse_resolution_schedule

logger = logging.getLogger("medp2x.chain")

CHAIN_RECORD = "chain.json"
INITS = ("previous", "random")
PROBE_VAL_FRACTION = 0.2  # of the labelled training split, for checkpoint selection


@dataclass
class Stage:
    """One stage. ``None`` settings take the chain's (and then the method's recipe).

    ``init``: ``previous`` (the previous stage's encoder; the base checkpoint for the first
    stage) or ``random``. ``trainable``: ``all``, ``bn`` (HPT's BN-only) or ``last_stage``
    (S3L's warm-up). ``without_last_stage``: S3L's small architecture (``layer4`` skipped).
    ``restore_last_stage``: start ``layer4`` afresh (after a small-architecture stage).
    ``resolution_schedule``: ``[[from_iteration, size], ...]`` (S3L's multi-resolution).
    ``scale``/``filters``: weight surgery on the stage's initial weights (``none``: HPT, S3L).
    ``optional``: a stage without ``data_dir`` is skipped (e.g. HPT without a source set)."""

    name: str
    data_dir: str | None = None
    dataset: Dataset | None = None
    init: str = "previous"
    method: str | None = None
    epochs: int | None = None
    epoch_length: int | None = None
    batch_size: int | None = None
    lr: float | None = None
    image_size: int | None = None
    max_iterations: int | None = None
    trainable: str = "all"
    without_last_stage: bool = False
    restore_last_stage: bool = False
    resolution_schedule: list | None = None
    scale: str = "none"
    filters: str = "none"
    optional: bool = False
    method_options: dict = field(default_factory=dict)
    view_options: dict = field(default_factory=dict)

    def check(self) -> None:
        from medp2x.settings import SettingError, check_choice, check_int, check_positive_number

        if not isinstance(self.name, str) or not self.name.replace("-", "_").isidentifier():
            raise SettingError(f"stage name {self.name!r} is not allowed: letters, digits, _")
        check_choice(f"{self.name}.init", self.init, INITS)
        check_choice(f"{self.name}.trainable", self.trainable, TRAINABLE)
        for name in ("epochs", "batch_size", "image_size", "max_iterations"):
            check_int(f"{self.name}.{name}", getattr(self, name), minimum=1)
        check_int(f"{self.name}.epoch_length", self.epoch_length, minimum=0)
        check_positive_number(f"{self.name}.lr", self.lr)
        try:
            parse_resolution_schedule(self.resolution_schedule)
        except ValueError as err:
            raise SettingError(f"{self.name}: {err}") from None
        if self.without_last_stage and self.trainable == "last_stage":
            raise SettingError(f"{self.name}: trainable last_stage on a run without its last stage")

    def record(self) -> dict:
        """The stage's settings as written to ``chain.json`` (the dataset as its size)."""
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "dataset"}
        if self.dataset is not None:
            out["dataset"] = f"{type(self.dataset).__name__} ({len(self.dataset)} samples)"
        return out


def as_stage(spec: Stage | dict) -> Stage:
    if isinstance(spec, Stage):
        return spec
    if not isinstance(spec, dict) or "name" not in spec:
        raise ValueError(f"a chain stage must be a Stage or a dict with a name, got {spec!r}")
    known = {f.name for f in fields(Stage)}
    unknown = sorted(set(spec) - known)
    if unknown:
        raise ValueError(f"stage {spec['name']!r}: unknown setting(s) {', '.join(unknown)}")
    return Stage(**spec)


@dataclass
class StageResult:
    name: str
    folder: Path
    status: str  # "done" (this session), "finished before", "skipped"
    encoder_path: Path | None = None
    summary: Any = None  # engine.RunSummary when it ran in this session


@dataclass
class ChainJob:
    """The chain's stages and the settings they share (a bundle's ``job``)."""

    name: str
    output_dir: str
    stages: Sequence[Stage | dict]
    base_checkpoint: str | None = None
    make_dataset: DatasetFactory | None = None  # reads a stage's data_dir
    method: str = "moco"  # HPT's base method is MoCo v2
    profile: str = "tiny"
    arch: str | None = None
    modality: str = "rgb"
    normalization: dict | str | None = "auto"
    gray_stem: str = "sum"
    num_workers: int = 0
    accumulation_steps: int = 1  # forward passes per optimiser step, every stage (distributed.md)
    amp: bool | str = "auto"
    seed: int = 0
    checkpoint_every: int = 0
    keep_checkpoints: int = 2
    progress: bool = True
    make_probe_data: Callable[[], tuple[Dataset | None, Dataset | None]] | None = None
    probe_every: int = 0  # iterations; 0: no probe
    probe_protocol: str = "knn"
    probe_select_after: float = 0.5  # HPT: the best checkpoint of the run's second half
    extra_handlers: list = field(default_factory=list)

    def run(self) -> list[StageResult]:
        """Run (or resume) every stage; user errors are one line and exit status 2."""
        from medp2x.settings import SettingError

        try:
            return self._run()
        except (SettingError, FileNotFoundError, ValueError) as err:
            if not _bundle_run():
                raise
            print(f"{self.name}: error: {err}", file=sys.stderr)
            raise SystemExit(2) from None

    # -------------------------------------------------------------------------- the chain
    def _run(self) -> list[StageResult]:
        stages = [as_stage(s) for s in self.stages]
        self._check(stages)
        out = check_output_dir(self.output_dir)
        record = ChainRecord(out / CHAIN_RECORD)
        record.check_stages(stages)
        started, results = time.time(), []
        previous = Path(self.base_checkpoint) if self.base_checkpoint else None
        for index, stage in enumerate(stages):
            folder = out / f"{index}_{stage.name}"
            if stage.optional and stage.dataset is None and not stage.data_dir:
                print(f"[chain {index + 1}/{len(stages)}] {stage.name}: no data_dir, skipped")
                record.set(index, status="skipped")
                results.append(StageResult(stage.name, folder, "skipped"))
                continue
            start_from = previous if stage.init == "previous" else None
            if record.status(index) == "done" and (folder / "encoder.pt").is_file():
                print(f"[chain {index + 1}/{len(stages)}] {stage.name}: finished before, kept")
                results.append(
                    StageResult(stage.name, folder, "finished before", folder / "encoder.pt")
                )
                previous = folder / "encoder.pt"
                continue
            summary = self._run_stage(index, len(stages), stage, folder, start_from, record)
            results.append(StageResult(stage.name, folder, "done", summary.encoder_path, summary))
            previous = summary.encoder_path
        print(f"== {self.name}: {len(stages)} stages in {(time.time() - started) / 60:.1f} min ==")
        for result in results:
            print(f"  {result.name:<12} {result.status:<16} {result.encoder_path or ''}")
        return results

    def _check(self, stages: list[Stage]) -> None:
        from medp2x.settings import SettingError, check_choice, check_int

        if not stages:
            raise SettingError("a chain needs at least one stage")
        names = [s.name for s in stages]
        if len(set(names)) != len(names):
            raise SettingError(f"stage names must differ, got {names}")
        for stage in stages:
            stage.check()
        check_choice("probe_protocol", self.probe_protocol, ("knn", "linear"))
        check_int("probe_every", self.probe_every, minimum=0, optional=False)
        check_int("accumulation_steps", self.accumulation_steps, minimum=1, optional=False)
        runs = [s for s in stages if not (s.optional and s.dataset is None and not s.data_dir)]
        if runs and runs[0].init == "previous" and not self.base_checkpoint:
            raise SettingError(
                "base_checkpoint (ssl_checkpoint in a bundle) is required: the first stage "
                f"({runs[0].name}) starts from it (or give that stage init: random)"
            )
        if self.base_checkpoint:
            from medp2x.data.base import existing_path

            existing_path(self.base_checkpoint, "ssl_checkpoint")

    def _run_stage(
        self,
        index: int,
        count: int,
        stage: Stage,
        folder: Path,
        start_from: Path | None,
        record: ChainRecord,
    ):
        from medp2x import engine
        from medp2x.schedules import trained_parameters_line

        if stage.restore_last_stage and start_from is not None:
            start_from = write_restored(start_from, self.seed)
        cfg = self._config(stage, folder, start_from)
        data = stage.data_dir or record_dataset_name(stage.dataset)
        record.set(
            index,
            status="running",
            folder=str(folder),
            data=data,
            samples=len(cfg.dataset),
            started_from=str(start_from) if start_from else "random init",
        )
        print(
            f"[chain {index + 1}/{count}] {stage.name}: {cfg.method} on {len(cfg.dataset)} "
            f"samples from {data}, from {start_from or 'a random init'}"
        )
        run = engine.build_run(cfg, encoder=self._encoder(stage, cfg))
        print(f"      {trained_parameters_line(run.method, stage.trainable)}")
        trainer = engine.create_trainer(run)
        engine.attach_handlers(trainer, self._handlers(stage, cfg))
        engine.resume(trainer)
        engine.train(trainer)
        summary = engine.finish(trainer)
        record.set(index, status="done", encoder=str(summary.encoder_path),
                   iterations=summary.iterations)  # fmt: skip
        return summary

    def _config(self, stage: Stage, folder: Path, start_from: Path | None):
        from medp2x.engine import PretrainConfig
        from medp2x.methods import recipe_for
        from medp2x.views import default_source_size

        method = stage.method or self.method
        recipe = recipe_for(method, self.profile)
        image_size = stage.image_size or recipe.image_size
        if stage.resolution_schedule:
            image_size = parse_resolution_schedule(stage.resolution_schedule)[0][1]
        largest = largest_size(stage.resolution_schedule, image_size)
        source_size = default_source_size(largest, self.profile)
        dataset = stage.dataset if stage.dataset is not None else self._read(stage, source_size)
        return PretrainConfig(
            dataset=dataset,
            output_dir=folder,
            method=method,
            profile=self.profile,
            arch=self.arch,
            image_size=image_size,
            source_size=source_size,
            batch_size=stage.batch_size,
            epochs=stage.epochs,
            epoch_length=stage.epoch_length,
            lr=stage.lr,
            ssl_checkpoint=start_from,
            scale=stage.scale,
            filters=stage.filters,
            modality=self.modality,
            normalization=self.normalization,
            gray_stem=self.gray_stem,
            num_workers=self.num_workers,
            accumulation_steps=self.accumulation_steps,
            amp=self.amp,
            seed=self.seed,
            checkpoint_every=self.checkpoint_every,
            n_saved=self.keep_checkpoints or None,
            max_iterations=stage.max_iterations,
            progress=self.progress,
            method_options={**stage.method_options},
            view_options={**stage.view_options},
        )

    def _read(self, stage: Stage, source_size: int) -> Dataset:
        from medp2x.data.base import existing_path

        if self.make_dataset is None:
            raise ValueError(f"stage {stage.name}: data_dir given but the chain has no reader")
        root = existing_path(stage.data_dir, f"{stage.name}.data_dir")
        return self.make_dataset(root, source_size)

    def _encoder(self, stage: Stage, cfg: Any):
        """The network the stage trains, its frozen parts already frozen (the optimiser is
        built over the parameters that still require gradients)."""
        from medp2x.engine import resolve_recipe
        from medp2x.networks import build_encoder
        from medp2x.schedules import select_trainable, without_last_stage

        channels = 1 if self.modality == "gray" and self.gray_stem == "sum" else 3
        encoder = build_encoder(resolve_recipe(cfg).arch, in_channels=channels)
        select_trainable(encoder, stage.trainable)
        return without_last_stage(encoder) if stage.without_last_stage else encoder

    def _handlers(self, stage: Stage, cfg: Any) -> list:
        from medp2x.engine import default_handlers
        from medp2x.schedules import ResolutionSchedule

        chosen = default_handlers(cfg)
        if stage.resolution_schedule:
            chosen.append(ResolutionSchedule(stage.resolution_schedule))
        if self.probe_every:
            chosen.append(self._probe())
        return chosen + list(self.extra_handlers or [])

    def _probe(self):
        """A probe on a validation part of the labelled *training* split (the test split is
        never read)."""
        from medp2x.data.split import stratified_split
        from medp2x.eval.splits import dataset_labels
        from medp2x.selection import ProbeSelection

        if self.make_probe_data is None:
            raise ValueError("probe_every is set but no labelled data (evaluation_data) is given")
        train, _ = self.make_probe_data()
        if train is None:
            raise ValueError("probe_every is set but the labelled training split is missing")
        labels = dataset_labels(train)
        fit, val = stratified_split(labels, PROBE_VAL_FRACTION, self.seed)
        return ProbeSelection(
            Subset(train, fit.tolist()),
            Subset(train, val.tolist()),
            every=self.probe_every,
            protocol=self.probe_protocol,
            select_after=self.probe_select_after,
        )


def record_dataset_name(dataset: Dataset | None) -> str:
    return "a dataset given in Python" if dataset is None else type(dataset).__name__


def write_restored(encoder_file: Path, seed: int) -> Path:
    """``encoder_file`` with a fresh ``layer4`` (S3L's warm-up start), written beside it so the
    provenance record of the run that made it is found (``provenance.find_record``)."""
    from medp2x.checkpoints import read_checkpoint, save_encoder
    from medp2x.schedules import restore_last_stage

    state, report = read_checkpoint(encoder_file, in_channels=None)
    path = encoder_file.with_name("encoder_fresh_layer4.pt")
    restored = restore_last_stage(state, report.arch, seed)
    save_encoder(path, restored, report.arch, report.in_channels, report.normalization, "s3l")
    return path


class ChainRecord:
    """``chain.json``: the stages' settings and their progress, rewritten after each change."""

    def __init__(self, path: Path):
        self.path = path
        self.data = json.loads(path.read_text()) if path.is_file() else {"stages": []}

    def check_stages(self, stages: list[Stage]) -> None:
        """Same stages as the run recorded (or a new run); keep the recorded progress."""
        wanted = [_plain(s.record()) for s in stages]
        recorded = [s.get("settings") for s in self.data["stages"]]
        if recorded and recorded != wanted:
            changed = [w["name"] for w, r in zip(wanted, recorded, strict=False) if w != r]
            raise ValueError(
                f"{self.path} records a chain with other stages (changed: "
                f"{', '.join(changed) or 'the number of stages'}): use the same settings, or "
                f"choose a new output_dir"
            )
        if not recorded:
            self.data["stages"] = [{"settings": w, "status": "pending"} for w in wanted]
            self._write()

    def status(self, index: int) -> str:
        return self.data["stages"][index].get("status", "pending")

    def set(self, index: int, **values: Any) -> None:
        self.data["stages"][index].update(values)
        self._write()

    def _write(self) -> None:
        atomic_write_text(self.path, json.dumps(self.data, indent=2, default=str) + "\n")


def _plain(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


def _bundle_run() -> bool:
    main = Path(sys.argv[0]) if sys.argv else Path()
    return main.name == "__main__.py" and main.parent.name == "bundle"
