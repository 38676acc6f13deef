"""One P2X (or P1X) job, the object every pretraining bundle runs: the paper's recipe, in order.

1. First stage: an ImageNet self-supervised checkpoint (``ssl_checkpoint``), or, in the demo,
   a small one made on the spot; none at all for P1X.
2. Weight surgery (scaling + dead-filter selection) on a fresh run, never on resume.
3. Second-stage pretraining with the same method on the user's unlabelled images.
4. Downstream evaluation of P2X next to the first stage and a random init, when labels exist.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ignite.distributed as idist
from torch.utils.data import Dataset

logger = logging.getLogger("medp2x.pipeline")

# make_dataset(data_dir, source_size): images at their own resolution, shorter side capped at
# source_size (readers: image_size=source_size, resize="cap"); the views crop from them.
DatasetFactory = Callable[[Path, int], Dataset]


@dataclass
class P2XJob:
    """The run's stages in order; the bundle (``bundles/configs/train.json``) declares its
    components and passes them here, the Python API may leave them None (medp2x's own).

    Components: ``network_def`` (the encoder to train), ``ssl_method``, ``views``,
    ``optimizer`` (partials, see ``engine.build_run``), ``trainer`` (like
    ``engine.create_trainer``) and ``handlers`` (the trainer's handler list; None: surgery,
    checkpoints, progress bar, TensorBoard, loss CSV and collapse monitor from the settings
    below). ``extra_handlers`` are attached after them, so one override adds a handler.
    """

    name: str
    make_dataset: DatasetFactory
    output_dir: str
    data_dir: str | None = None
    ssl_checkpoint: str | None = None
    schedule: str = "p2x"  # "p2x": start from ssl_checkpoint; "p1x": from random init
    method: str = "simclr"
    profile: str = "tiny"
    arch: str | None = None
    image_size: int | None = None
    source_size: int | None = None  # shorter-side cap of the images (None: 2-2.3x image_size)
    batch_size: int | None = None
    accumulation_steps: int = 1  # forward passes per optimiser step (docs/distributed.md)
    epochs: int | None = None
    epoch_length: int | None = None  # samples per epoch (None: the profile's; 0: one pass)
    lr: float | None = None
    scale: str = "per_filter"
    filters: str = "copy"
    modality: str = "rgb"
    normalization: str = "auto"
    gray_stem: str = "sum"
    eval_dir: str | None = None
    make_eval_data: Callable[[], tuple[Dataset, Dataset]] | None = None  # overrides eval_dir
    eval_protocol: str = "linear"
    eval_epochs: int = 30
    num_workers: int = 0
    amp: bool | str = "auto"  # bf16 autocast: "auto" where the device has native bf16
    seed: int = 0
    checkpoint_every: int = 0
    keep_checkpoints: int = 2  # 0 keeps every one: what the convergence figures read
    first_stage_epochs: int = 4  # demo only: the stand-in first stage
    demo_epochs: int = 10  # demo only: second-stage epochs when `epochs` is not set
    demo_epoch_length: int = 256  # demo only: samples per second-stage epoch (its slide: ~20 tiles)
    max_iterations: int | None = None
    method_options: dict = field(default_factory=dict)
    view_options: dict = field(default_factory=dict)
    network_def: Any = None
    ssl_method: Any = None
    views: Any = None
    optimizer: Any = None
    trainer: Any = None
    handlers: list | None = None
    extra_handlers: list = field(default_factory=list)

    def run(self) -> dict:
        try:
            return self._run()
        except (FileNotFoundError, ValueError) as err:  # user errors: one clear line
            logging.getLogger("medp2x").debug("job failed", exc_info=True)
            print(f"{self.name}: error: {err}", file=sys.stderr)
            raise SystemExit(2) from None
        except OSError as err:
            if err.filename is None:  # not about a path the user gave: keep the traceback
                raise
            where = err.filename2 or err.filename  # os.replace(tmp, target): the target
            print(f"{self.name}: error: {where}: {err.strerror}", file=sys.stderr)
            raise SystemExit(2) from None

    def check_settings(self) -> None:
        """Every setting as given, before any file is read or written (``PretrainConfig``
        checks the same ones again for the Python API)."""
        from medp2x.settings import (
            check_amp,
            check_choice,
            check_int,
            check_normalization,
            check_positive_number,
        )

        check_choice("schedule", self.schedule, ("p1x", "p2x"))
        for name in ("image_size", "source_size", "batch_size", "epochs", "max_iterations"):
            check_int(name, getattr(self, name), minimum=1)
        check_int("epoch_length", self.epoch_length, minimum=0)
        check_int("accumulation_steps", self.accumulation_steps, minimum=1, optional=False)
        for name in ("num_workers", "seed", "checkpoint_every", "keep_checkpoints"):
            check_int(name, getattr(self, name), minimum=0, optional=False)
        for name in ("first_stage_epochs", "eval_epochs", "demo_epochs"):
            check_int(name, getattr(self, name), minimum=1, optional=False)
        check_positive_number("lr", self.lr)
        check_amp(self.amp)
        check_normalization(self.normalization)
        check_choice("eval_protocol", self.eval_protocol, ("linear", "finetune", "knn"))
        check_output_dir(self.output_dir)

    def _run(self) -> dict:
        from medp2x.engine import PretrainConfig, default_handlers, pretrain
        from medp2x.methods import recipe_for
        from medp2x.views import default_source_size

        self.check_settings()
        started = time.time()
        out = Path(self.output_dir)
        demo = self.data_dir is None
        data_dir = self._data_dir(out, demo)
        first_stage = self._first_stage(out, demo)
        recipe = recipe_for(self.method, self.profile)
        image_size = self.image_size or recipe.image_size
        source_size = self.source_size or default_source_size(image_size, self.profile)
        dataset = self.make_dataset(data_dir, source_size)
        print(
            f"[2-3/4] {self.schedule.upper()} {self.method} pretraining on {len(dataset)} samples from {data_dir}"
        )
        cfg = PretrainConfig(
            dataset=dataset,
            output_dir=out / self.schedule,
            method=self.method,
            profile=self.profile,
            arch=self.arch,
            image_size=image_size,
            source_size=source_size,
            batch_size=self.batch_size,
            accumulation_steps=self.accumulation_steps,
            epochs=self.epochs or (self.demo_epochs if demo else None),
            epoch_length=self.demo_epoch_length
            if demo and self.epoch_length is None
            else self.epoch_length,
            lr=self.lr,
            ssl_checkpoint=first_stage,
            scale=self.scale,
            filters=self.filters,
            modality=self.modality,
            normalization=self.normalization,
            gray_stem=self.gray_stem,
            num_workers=self.num_workers,
            amp=self.amp,
            seed=self.seed,
            checkpoint_every=self.checkpoint_every,
            n_saved=self.keep_checkpoints or None,
            max_iterations=self.max_iterations,
            method_options=self.method_options,
            view_options=self.view_options,
        )
        cfg.scale, cfg.filters = self._surgery_settings()  # the record says what the list does
        handlers = default_handlers(cfg) if self.handlers is None else list(self.handlers)
        summary = pretrain(
            cfg,
            handlers=handlers + list(self.extra_handlers or []),
            trainer_factory=self.trainer,
            encoder=self.network_def,
            method=self.ssl_method,
            views=self.views,
            optimizer=self.optimizer,
        )
        results = []  # rank 0 alone evaluates the written encoder; the others are done
        if idist.get_rank() == 0:
            results = self._evaluate(
                out, demo, first_stage, summary.encoder_path, summary.arch, image_size
            )
        report = {"summary": summary, "results": results, "minutes": (time.time() - started) / 60}
        if idist.get_rank() == 0:  # one summary, not one per process
            print_summary(self, report)
        return report

    def _surgery_settings(self) -> tuple[str, str]:
        """Surgery as the handler list declares it (a bundle's ``train#handlers``): the first
        ``WeightSurgery`` handler's settings, ``none`` when the list has none (P1X)."""
        if self.handlers is None:
            return self.scale, self.filters
        from medp2x.handlers import WeightSurgery

        surgery = [h for h in self.handlers if isinstance(h, WeightSurgery)]
        return (surgery[0].scale, surgery[0].filters) if surgery else ("none", "none")

    def _data_dir(self, out: Path, demo: bool) -> Path:
        from medp2x.data.base import existing_path

        if not demo:
            try:
                return existing_path(self.data_dir, "data_dir")
            except FileNotFoundError as err:  # say where the benchmark's data comes from
                hint = getattr(self.make_dataset, "missing_data_hint", None)
                raise FileNotFoundError(f"{err}; {hint}" if hint else str(err)) from None
        from medp2x.demo import write_demo_slide

        print(
            "[demo] no data_dir given: writing the left half of scikit-image's IHC section as a pyramidal TIFF slide (the right half is the downstream test)"
        )
        return write_demo_slide(out / "demo_data").parent

    def _first_stage(self, out: Path, demo: bool) -> Path | None:
        if self.schedule == "p1x":
            print("[1/4] P1X: no first stage, the encoder starts from random weights")
            return None
        if self.ssl_checkpoint:
            from medp2x.data.base import existing_path

            return existing_path(self.ssl_checkpoint, "ssl_checkpoint")
        if not demo:
            raise ValueError(
                "ssl_checkpoint is required for P2X on your data (or use the p1x bundle)"
            )
        return make_demo_first_stage(out / "stage1", self)

    def _evaluate(self, out, demo, first_stage, p2x_path, arch, image_size) -> list[dict]:
        """The paper's comparison on the labelled set: this run's encoder next to its first
        stage and a random init, scored on the same test images, with the paired differences
        its claims rest on (P2X - first stage, anything - Random) and their 95 % intervals."""
        train, test = self._labelled_data(demo, image_size)
        if train is None:
            why = getattr(self.make_eval_data, "skipped", None) or "no eval_dir given"
            print(f"[4/4] {why}: skipping the downstream evaluation")
            return []
        from medp2x.eval.compare import compare_encoders
        from medp2x.eval.report import format_differences, format_table, write_results

        # Files, not modules: the evaluation then checks each run's seen-files record against
        # the test split (and refuses an encoder that was pretrained on a test image).
        encoders = {"Random": "random"}
        if first_stage is not None:
            encoders["First stage"] = str(first_stage)
        encoders[self.schedule.upper()] = str(p2x_path)
        if demo:  # what colour alone scores: chance on the demo's decolourised tiles
            encoders["Colour histogram"] = "colour_histogram"
        print(
            f"[4/4] {self.eval_protocol} evaluation of {', '.join(encoders)} on {len(train)} train / {len(test)} test samples"
        )
        rows = compare_encoders(
            encoders,
            train,
            test,
            protocol=self.eval_protocol,
            epochs=self.eval_epochs,
            image_size=image_size,
            seed=self.seed,
            arch=arch,
            in_channels=1 if self.modality == "gray" else 3,
            reference=["Random", "First stage"] if first_stage is not None else ["Random"],
        )
        rows = _claimed_differences(rows, self.schedule.upper())
        write_results(rows, out / "evaluation")
        print(format_table(rows))
        print(format_differences(rows))
        return rows

    def _labelled_data(self, demo: bool, image_size: int):
        if self.make_eval_data is not None:
            train, test = self.make_eval_data()
            if train is not None:
                return train, test
        if self.eval_dir:
            from torch.utils.data import Subset

            from medp2x.data.base import existing_path
            from medp2x.data.folder import ImageFolderDataset
            from medp2x.data.split import stratified_split
            from medp2x.eval.splits import dataset_labels

            root = existing_path(self.eval_dir, "eval_dir")
            data = ImageFolderDataset(
                root, gray=self.modality == "gray", image_size=image_size, on_error="skip"
            )
            train, test = stratified_split(dataset_labels(data), fraction=0.3, seed=self.seed)
            return Subset(data, train.tolist()), Subset(data, test.tolist())
        if demo:
            from medp2x.demo import ihc_tissue_tiles

            print(
                "[demo] labelled set: epithelium vs stroma tiles of the IHC section, decolourised "
                "(gray, each tile histogram-equalised: colour cannot tell them apart); train: the "
                "half the second stage saw, test: the half it never saw"
            )
            return ihc_tissue_tiles(size=image_size)
        return None, None


def check_output_dir(path: str | Path, name: str = "output_dir") -> Path:
    """The run folder, created if absent; one line where it is a file or cannot be written."""
    from medp2x.settings import SettingError

    if not isinstance(path, (str, Path)) or not str(path):
        raise SettingError(f"{name} = {path!r} is not allowed: a folder path")
    folder = Path(path).expanduser()
    if folder.exists() and not folder.is_dir():
        raise SettingError(f"{name} '{folder}' is a file, not a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise SettingError(f"{name} '{folder}' cannot be created: {err.strerror}") from None
    if not os.access(folder, os.W_OK | os.X_OK):
        raise SettingError(f"{name} '{folder}' is not writable by this user")
    return folder


def make_demo_first_stage(folder: Path, job: P2XJob) -> Path:
    """The demo's stand-in for a public ImageNet SSL checkpoint (see ``demo.py``)."""
    from medp2x.demo import RandomCropDataset, natural_photos
    from medp2x.engine import PretrainConfig, pretrain

    print(
        "[1/4] public ImageNet SSL weights cannot be downloaded here: making a small first-stage "
        f"encoder with {job.method} on crops of scikit-image's natural photographs"
    )
    summary = pretrain(
        PretrainConfig(
            dataset=RandomCropDataset(natural_photos(), n_crops=1024, size=64, seed=job.seed),
            output_dir=folder,
            method=job.method,
            profile=job.profile,
            arch=job.arch,
            epochs=job.first_stage_epochs,
            seed=job.seed,
            normalization="imagenet",
            max_iterations=job.max_iterations,
            method_options=job.method_options,
            checkpoint_every=job.checkpoint_every,  # #21: the first stage saves as the second does
            n_saved=job.keep_checkpoints or None,
        )
    )
    print(
        f"      first stage: {summary.iterations} iterations, loss {summary.first_loss:.3f} -> {summary.last_loss:.3f}, weights {summary.encoder_path}"
    )
    return summary.encoder_path


def _claimed_differences(rows: list[dict], run: str) -> list[dict]:
    """Keep the differences a P2X claim is about: each encoder against Random, and this run
    against its first stage (not Random - first stage, nor a low-level reference against it)."""
    kept = []
    for row in rows:
        if row["encoder"] != run:
            row = {k: v for k, v in row.items() if "_diff_vs_First stage" not in k}
        kept.append(row)
    return kept


def print_summary(job: P2XJob, report: dict) -> None:
    s = report["summary"]
    lines = [
        "",
        f"== {job.name}: done in {report['minutes']:.1f} min ==",
        f"outputs      : {Path(job.output_dir).resolve()}",
        f"encoder      : {s.encoder_path}",
        f"tensorboard  : tensorboard --logdir {s.output_dir / 'tb'}",
        f"{job.schedule} loss     : {s.first_loss:.4f} (first iteration) -> {s.last_loss:.4f} (last), "
        f"{s.iterations} iterations{' (resumed)' if s.resumed else ''}",
        f"surgery      : {'applied (see surgery_report.csv)' if s.surgery_applied else 'not applied on this run'}",
    ]
    for row in report["results"]:
        interval = (
            f" [{row['accuracy_low']:.3f}, {row['accuracy_high']:.3f}]"
            if "accuracy_low" in row
            else ""
        )
        lines.append(
            f"downstream   : {row['encoder']:<16} accuracy {row['accuracy']:.3f}{interval}  macro-F1 {row['macro_f1']:.3f}"
        )
    for d in _paired(report["results"]):
        verdict = "interval excludes 0" if d["accuracy_excludes_0"] else "interval includes 0"
        lines.append(
            f"difference   : {d['encoder'] + ' - ' + d['reference']:<26} accuracy "
            f"{100 * d['accuracy']:+.1f} points, 95% CI [{100 * d['accuracy_low']:+.1f}, "
            f"{100 * d['accuracy_high']:+.1f}] ({verdict})"
        )
    lines.append(s.skipped_line())  # the last line: what was skipped, and where it is listed
    print("\n".join(lines))


def _paired(rows: list[dict]) -> list[dict]:
    from medp2x.eval.report import paired_differences

    return paired_differences(rows) if rows else []
