"""Checkpoint selection by a probe during pretraining (HPT's convergence curves).

``ProbeSelection`` is a trainer handler: every ``every`` iterations (and at the end) it scores
the current encoder with a kNN or linear probe fitted on a labelled ``fit`` split and scored on
a labelled *validation* split (never the test split: the test split must stay unseen by every
choice, the checkpoint included), appends the score to ``probe_log.csv``, redraws ``probe.png``
and keeps the best encoder so far as ``best_encoder.pt`` (written atomically by
``checkpoints.save_encoder``). A resumed run drops the rows past its checkpoint (those steps
are re-run) and takes the best score back from the kept rows, so a killed run selects what an
uninterrupted one would.
"""

from __future__ import annotations

import csv
import logging
import math
from pathlib import Path

import torch
from ignite.engine import Engine, Events
from torch.utils.data import Dataset

logger = logging.getLogger("medp2x.selection")

PROBE_CSV, PROBE_PNG, BEST_ENCODER = "probe_log.csv", "probe.png", "best_encoder.pt"
COLUMNS = ["iteration", "epoch", "accuracy", "n_val", "best"]


class ProbeSelection:
    """A periodic probe on a validation split and the best checkpoint by it.

    ``fit`` and ``val`` are labelled datasets (samples ``{"image", "label"}`` or
    ``(image, label)`` pairs); ``protocol`` is ``knn`` (k nearest neighbours, cosine, as
    ``evaluate.knn_scores``) or ``linear`` (``evaluate.linear_probe`` without its L2 search).
    ``select_after``: the fraction of the run before which scores are logged but no checkpoint
    is kept (HPT chooses among the second half of a run: 0.5)."""

    def __init__(
        self,
        fit: Dataset,
        val: Dataset,
        every: int = 100,
        protocol: str = "knn",
        image_size: int | None = None,
        batch_size: int = 64,
        knn_k: int = 20,
        select_after: float = 0.0,
    ):
        if protocol not in ("knn", "linear"):
            raise ValueError(f"probe protocol = {protocol!r} is not allowed: knn or linear")
        if int(every) < 1:
            raise ValueError(f"probe every = {every!r} is not allowed: a positive integer")
        self.fit, self.val, self.every, self.protocol = fit, val, int(every), protocol
        self.image_size, self.batch_size, self.knn_k = image_size, batch_size, knn_k
        if not 0.0 <= float(select_after) < 1.0:
            raise ValueError(f"probe select_after = {select_after!r} is not allowed: in [0, 1)")
        self.select_after = float(select_after)
        self.best = -math.inf

    def attach(self, engine: Engine) -> None:
        from medp2x.handlers import run_of

        run = run_of(engine)
        if run.rank != 0:
            return
        self.run = run
        self.csv_path = run.out / PROBE_CSV
        engine.add_event_handler(Events.STARTED, self._resume_rows)
        when = Events.ITERATION_COMPLETED(every=self.every) | Events.COMPLETED
        engine.add_event_handler(when, self._probe)

    # -------------------------------------------------------------------------- the curve
    def rows(self) -> list[dict]:
        if not self.csv_path.exists():
            return []
        with open(self.csv_path, newline="") as f:
            return list(csv.DictReader(f))

    def _resume_rows(self, engine: Engine) -> None:
        kept = [r for r in self.rows() if int(r["iteration"]) <= engine.state.iteration]
        self._write(kept)
        eligible = [float(r["accuracy"]) for r in kept if self._eligible(int(r["iteration"]))]
        self.best = max(eligible, default=-math.inf)

    def _eligible(self, iteration: int) -> bool:
        return iteration >= self.select_after * self.run.plan.total_iterations

    def _write(self, rows: list[dict]) -> None:
        self.csv_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.csv_path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=COLUMNS)
            writer.writeheader()
            writer.writerows(rows)

    def _probe(self, engine: Engine) -> None:
        iteration = engine.state.iteration
        rows = self.rows()
        if rows and int(rows[-1]["iteration"]) == iteration:
            return  # COMPLETED right after a periodic probe of the same step
        accuracy, n_val = self.score()
        improved = self._eligible(iteration) and accuracy > self.best
        if improved:
            self.best = accuracy
            self._save_best()
        rows.append(
            {
                "iteration": iteration,
                "epoch": engine.state.epoch,
                "accuracy": f"{accuracy:.6f}",
                "n_val": n_val,
                "best": int(improved),
            }
        )
        self._write(rows)
        self._plot(rows)
        logger.info("probe at iteration %d: %s accuracy %.4f", iteration, self.protocol, accuracy)

    def _save_best(self) -> None:
        from medp2x.checkpoints import save_encoder

        run = self.run
        save_encoder(run.out / BEST_ENCODER, run.method.encoder.state_dict(), **run.meta)

    def _plot(self, rows: list[dict]) -> None:
        from medp2x.plots import plot_series

        points = [(int(r["iteration"]), 100 * float(r["accuracy"])) for r in rows]
        png = self.run.out / PROBE_PNG
        plot_series(
            {f"{self.protocol} probe (validation split)": points},
            png,
            xlabel="pretraining iteration",
            ylabel="validation accuracy (%)",
        )
        png.with_suffix(".csv").unlink(missing_ok=True)  # the plot's copy: probe_log.csv has them

    # -------------------------------------------------------------------------- the score
    @torch.no_grad()
    def score(self) -> tuple[float, int]:
        """Validation accuracy of the current encoder (frozen, eval mode, BN running stats);
        the encoder's train/eval mode is restored afterwards."""
        from medp2x.eval.features import extract_features
        from medp2x.eval.protocols.knn import knn_scores
        from medp2x.eval.protocols.linear import linear_probe
        from medp2x.eval.settings import EvalSettings
        from medp2x.networks import NormalizedEncoder

        run = self.run
        encoder = run.method.encoder
        was_training = encoder.training
        normalize = run.normalize
        network = NormalizedEncoder(encoder)
        network.normalize = normalize
        settings = EvalSettings(
            image_size=self.image_size or run.recipe.views.large_size,
            batch_size=self.batch_size,
            device=str(run.device),
            progress=False,
            knn_k=self.knn_k,
        )
        try:
            fit = extract_features(network, self.fit, settings, desc="probe fit")
            val = extract_features(network, self.val, settings, desc="probe val")
        finally:
            encoder.train(was_training)
        classes = int(max(fit[1].max(), val[1].max())) + 1
        if self.protocol == "knn":
            votes = knn_scores(*fit, val[0], classes, settings.knn_k, settings.knn_temperature)
            accuracy = float((votes.argmax(1) == val[1]).float().mean())
        else:
            settings.linear_weight_decays = ()
            accuracy = float(linear_probe(fit, None, val, classes, settings)[0]["accuracy"])
        return accuracy, len(val[1])


def best_row(out: str | Path) -> dict | None:
    """The probe row whose encoder ``best_encoder.pt`` holds (None: no probe was run)."""
    path = Path(out) / PROBE_CSV
    if not path.exists():
        return None
    with open(path, newline="") as f:
        kept = [r for r in csv.DictReader(f) if r["best"] == "1"]
    return kept[-1] if kept else None
