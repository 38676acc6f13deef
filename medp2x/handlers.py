"""The pretraining trainer's handlers, as a bundle's ``train#handlers`` list declares them.

Each is an object with ``attach(engine)``, like MONAI's and Ignite's handlers, so one list can
mix them. medp2x's handlers read the run they serve from ``engine.pretraining`` (a
``medp2x.engine.PretrainRun``): the bundle declares them before any data is read, and the run's
model, optimiser and output folder exist only once it is built. In the bundles' order:

1. ``WeightSurgery``: Ciga et al. §3 on the first-stage weights, on a fresh P2X run only.
2. ``CheckpointSaver``: what a resumed run needs to continue exactly.
3. ``ProgressBarHandler``, ``TensorBoardHandler``, ``LossCSV``: what a user watches.
4. ``CollapseMonitorHandler``: warns when a run ends with collapsed embeddings.

Logging handlers write on rank 0 only; surgery runs on every rank (it is deterministic).
"""

from __future__ import annotations

import csv
import logging
from pathlib import Path
from typing import Any

from ignite.engine import Engine, Events
from ignite.handlers import Checkpoint, DiskSaver, ProgressBar

from medp2x.run_folder import LOSS_CSV
from medp2x.surgery import DEFAULT_SCALE

logger = logging.getLogger("medp2x.handlers")


def run_of(engine: Engine) -> Any:
    """The ``PretrainRun`` of ``engine``, or a clear error for a trainer medp2x did not create."""
    run = getattr(engine, "pretraining", None)
    if run is None:
        raise TypeError(
            "medp2x handlers attach to a trainer made by medp2x.engine.create_trainer "
            "(it carries the run they serve as engine.pretraining)"
        )
    return run


class WeightSurgery:
    """Weight scaling and dead-filter selection on the first-stage weights when a fresh P2X run
    starts; never on a resumed run (``medp2x.surgery.SurgeryHandler``), never without
    first-stage weights (P1X starts from a random init: nothing to repair)."""

    def __init__(self, scale: str = DEFAULT_SCALE, filters: str = "copy", **surgery_options):
        from medp2x.surgery import FILTER_MODES, SCALE_MODES, _check_choice

        _check_choice(scale, SCALE_MODES, "scale")
        _check_choice(filters, FILTER_MODES, "filters")
        self.scale, self.filters, self.surgery_options = scale, filters, surgery_options

    def attach(self, engine: Engine) -> None:
        from medp2x.surgery import SurgeryHandler

        run = run_of(engine)
        if not run.has_first_stage:
            logger.info("no first-stage weights (P1X): weight surgery has nothing to repair")
            return
        if self.scale == "none" and self.filters == "none":
            return

        def after_surgery() -> None:
            run.surgery_applied = True
            run.method.reset_momentum_encoders()  # targets start from the repaired weights

        SurgeryHandler(
            run.method.encoder,
            scale=self.scale,
            filters=self.filters,
            seed=run.cfg.seed,
            output_dir=run.out,
            after=after_surgery,
            **self.surgery_options,
        ).attach(engine)


class CheckpointSaver:
    """Checkpoints every ``every`` iterations (0: at the end of each epoch only), at the end of
    each epoch and when the run stops early, keeping the newest ``n_saved`` (None: all, for the
    convergence figures). ``medp2x.engine.resume`` reads them back."""

    def __init__(self, every: int = 0, n_saved: int | None = 2):
        if n_saved == 0:
            n_saved = None  # the bundles' keep_checkpoints 0: keep every one
        self.every, self.n_saved = int(every or 0), n_saved

    def attach(self, engine: Engine) -> None:
        from medp2x.engine import CHECKPOINT_PREFIX, checkpoint_objects

        run = run_of(engine)
        if run.rank != 0:
            return
        saver = Checkpoint(
            checkpoint_objects(engine),
            DiskSaver(str(run.ckpt_dir), require_empty=False, create_dir=True, atomic=True),
            filename_prefix="",
            filename_pattern=f"{CHECKPOINT_PREFIX}_{{global_step}}.{{ext}}",
            n_saved=self.n_saved,
            global_step_transform=lambda e, _: e.state.iteration,
        )
        every = Events.EPOCH_COMPLETED | Events.TERMINATE  # TERMINATE: an early stop keeps its work
        if self.every:
            every = every | Events.ITERATION_COMPLETED(every=self.every)
        engine.add_event_handler(every, saver)
        self.saver = saver

    def adopt(self, recovery) -> None:
        """Rotate the checkpoints already on disk with this run's (``medp2x.recovery``)."""
        if getattr(self, "saver", None) is not None:
            recovery.adopt(self.saver, self.n_saved)


class ProgressBarHandler:
    """Ignite's progress bar with the loss."""

    def __init__(self, persist: bool = True):
        self.persist = persist

    def attach(self, engine: Engine) -> None:
        if run_of(engine).rank == 0:
            ProgressBar(persist=self.persist).attach(
                engine, output_transform=lambda logs: {"loss": logs["loss"]}
            )


class TensorBoardHandler:
    """Every scalar of each step (loss, lr, spread, ...) under ``<output_dir>/<subdir>``."""

    def __init__(self, subdir: str = "tb"):
        self.subdir = subdir

    def attach(self, engine: Engine) -> None:
        from ignite.handlers.tensorboard_logger import OutputHandler, TensorboardLogger

        run = run_of(engine)
        if run.rank != 0:
            return
        tb = TensorboardLogger(log_dir=str(run.out / self.subdir))
        tb.attach(
            engine,
            log_handler=OutputHandler(tag="train", output_transform=lambda logs: logs),
            event_name=Events.ITERATION_COMPLETED,
        )
        engine.add_event_handler(Events.COMPLETED | Events.TERMINATE, lambda _: tb.close())


class LossCSV:
    """``loss.csv`` (iteration, epoch, loss, spread), consistent across resumes: rows logged
    after the last checkpoint of a killed run are dropped, since those steps are re-run.
    The run's summary and loss curve read it."""

    def attach(self, engine: Engine) -> None:
        from medp2x.engine import read_loss_rows, write_loss_rows

        run = run_of(engine)
        if run.rank != 0:
            return
        out: Path = run.out
        out.mkdir(parents=True, exist_ok=True)
        log_path = out / LOSS_CSV

        @engine.on(Events.STARTED)
        def truncate_log_to_resumed_iteration(e: Engine) -> None:
            rows = read_loss_rows(out)
            kept = [r for r in rows if int(r["iteration"]) <= e.state.iteration]
            write_loss_rows(log_path, kept)

        @engine.on(Events.ITERATION_COMPLETED)
        def append_loss(e: Engine) -> None:
            output = e.state.output
            with open(log_path, "a", newline="") as f:
                csv.writer(f).writerow(
                    [e.state.iteration, e.state.epoch, output["loss"], output.get("spread", "")]
                )


class CollapseMonitorHandler:
    """``medp2x.monitor.CollapseMonitor`` over the last tenth of the run; its spread and
    warnings go into the run's summary."""

    def attach(self, engine: Engine) -> None:
        from medp2x.monitor import CollapseMonitor

        run = run_of(engine)
        if run.rank != 0:
            return
        run.monitor = CollapseMonitor(run.plan.total_iterations)
        run.monitor.attach(engine)
