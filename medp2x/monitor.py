"""Is the run learning? Collapse warnings from the scalars each method reports per step.

A collapsed SSL run looks healthy from its loss alone: BYOL's loss keeps falling while every
image maps to one point, and SwAV's loss settles at ln K once its predictions are uniform. So
the methods report ``spread`` (``methods.base.embedding_spread``: ~1 spread out, 0 collapsed)
and SwAV ``prediction_entropy`` and DINO ``teacher_entropy`` (1 = uniform); this handler
averages them over the last tenth of the run and warns at its end, on screen and in the log,
naming the fix to look at. DINO's other collapse (one dimension dominates) shows as a falling
``spread``; a low teacher entropy alone is the sharpening working, so it is not warned about.
"""

from __future__ import annotations

import logging
import math
from collections import deque

import torch
from ignite.engine import Engine, Events

logger = logging.getLogger("medp2x.monitor")

SPREAD_COLLAPSED = 0.05  # random unit vectors give 1; a few dominant directions still give > 0.2
UNIFORM_PREDICTIONS = 0.99
# Entropies (of ln K) that mean "uniform, nothing learnt" above UNIFORM_PREDICTIONS: what to say.
UNIFORM_WARNINGS = {
    "prediction_entropy": "predictions are uniform over the prototypes (entropy {:.3f} of ln K): "
    "the SwAV loss sits at ln K and nothing is learnt; train on more images or longer, or see "
    "docs/methods.md (SwAV)",
    "teacher_entropy": "DINO's teacher outputs are uniform (entropy {:.3f} of ln K): centring "
    "outweighs sharpening and the student learns nothing; lower teacher_temp or "
    "warmup_teacher_temp, see docs/methods.md (DINO)",
}


class CollapseMonitor:
    """Keep the recent ``spread`` and entropy values; warn when a run ends collapsed."""

    def __init__(self, total_iterations: int):
        self.window = max(1, total_iterations // 10)
        self.recent: dict[str, deque] = {}
        self.warnings: list[str] = []

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.record)
        engine.add_event_handler(Events.COMPLETED | Events.TERMINATE, self.report)

    def record(self, engine: Engine) -> None:
        for name in ("spread", *UNIFORM_WARNINGS):
            value = engine.state.output.get(name)
            if value is not None and math.isfinite(value):
                self.recent.setdefault(name, deque(maxlen=self.window)).append(float(value))

    def mean(self, name: str) -> float | None:
        values = self.recent.get(name)
        return sum(values) / len(values) if values else None

    def report(self, engine: Engine | None = None) -> list[str]:
        self.warnings = []
        spread = self.mean("spread")
        if spread is not None and spread < SPREAD_COLLAPSED:
            self.warnings.append(
                f"embeddings collapsed (spread {spread:.3f}, about 1 when healthy): every image "
                "maps to nearly the same point; lower the learning rate, add warm-up, or check "
                "the augmentations"
            )
        for name, warning in UNIFORM_WARNINGS.items():
            entropy = self.mean(name)
            if entropy is not None and entropy > UNIFORM_PREDICTIONS:
                self.warnings.append(warning.format(entropy))
        for warning in self.warnings:
            logger.warning(warning)
            print(f"WARNING: {warning}")
        return self.warnings


@torch.no_grad()
def rankme(features: torch.Tensor, eps: float = 1e-7) -> float:
    """Effective rank of a feature matrix (RankMe, Garrido et al. 2023): exp of the entropy of
    its L1-normalised singular values; between 1 and min(N, d).

    The projector's ``spread`` misses *dimensional* collapse: BYOL and SwAV runs too short for
    their method can keep well-spread projections while the backbone features they hand on use
    a few directions (effective rank ~4 of 512), and a kNN on those features falls below
    random init. RankMe needs no labels and tracks downstream accuracy (use N >> d rows).
    """
    sigma = torch.linalg.svdvals(features.detach().double().flatten(1))
    p = sigma / sigma.sum() + eps
    return float(torch.exp(-(p * p.log()).sum()))
