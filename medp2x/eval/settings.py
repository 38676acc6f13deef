"""One settings object for a downstream evaluation: ``EvalSettings``.

It holds the protocols' hyper-parameters (defaults: the paper's fine-tuning, DINO's kNN) and
what a comparison needs besides the data (protocols, label budget, draws, reference,
intervals), checked once here. ``compare_encoders(..., settings, **changes)`` and the other
entry points accept keyword changes on top of it (``with_changes``), so a call can stay short.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace

from medp2x.batchnorm import BN_STATS
from medp2x.metrics import METRICS

PROTOCOLS = ("finetune", "linear", "knn")
NORMALIZATIONS = ("auto", "imagenet", "none")
SELECTIONS = ("none", "draw", "val")


@dataclass(frozen=True)
class EvalSettings:
    """Everything an evaluation is run with, besides the encoders and the data."""

    # the protocols' hyper-parameters
    epochs: int = 20
    batch_size: int = 64
    lr: float = 3e-4
    weight_decay: float = 1e-4
    image_size: int | None = None
    device: str = "cpu"
    knn_k: int = 20
    knn_temperature: float = 0.07
    linear_weight_decays: tuple[float, ...] = (1e-1, 1e-2, 1e-3, 1e-4, 0.0)  # searched grid
    linear_weight_decay: float | None = None  # without selection; None: 1 / n (sklearn's C = 1)
    linear_max_iter: int = 200
    select_metric: str = "accuracy"
    augment: bool = True
    crop_scale: float = 0.08  # fine-tuning random-resized crop: smallest area fraction
    num_workers: int = 0
    progress: bool = True
    bn_stats: str = "saved"  # "recomputed": frozen protocols first re-average BN (batchnorm.py)
    selection: str = "none"  # "none" (the paper's), "draw" (inside each draw), "val" (given)
    # the comparison
    protocol: str | tuple[str, ...] = "linear"  # one name or several
    label_fraction: float = 1.0
    draws: int = 1
    seed: int = 0
    disjoint: bool = False  # draws share no sample (as far as the fraction allows)
    val_fraction: float = 0.1  # held out of each draw with selection "draw"
    arch: str = "resnet18"  # of "random"
    in_channels: int = 3  # of "random"
    normalization: str = "auto"  # "auto": what the file says; "imagenet" / "none" override it
    reference: str | tuple[str, ...] | None = "auto"  # paired differences against these
    bootstrap: int = 2000  # resamples of the paired intervals (0: none)
    allow_test_overlap: bool = False

    def __post_init__(self) -> None:
        protocols = (self.protocol,) if isinstance(self.protocol, str) else tuple(self.protocol)
        unknown = [p for p in protocols if p not in PROTOCOLS]
        if unknown or not protocols:
            raise ValueError(f"unknown protocol(s) {unknown}; choose from {', '.join(PROTOCOLS)}")
        object.__setattr__(self, "linear_weight_decays", tuple(self.linear_weight_decays))
        if self.reference is not None and not isinstance(self.reference, str):
            object.__setattr__(self, "reference", tuple(self.reference))
        if self.select_metric not in METRICS:
            raise ValueError(f"select_metric must be one of {', '.join(METRICS)}")
        if self.bn_stats not in BN_STATS:
            raise ValueError(
                f"bn_stats must be one of {', '.join(BN_STATS)}, got {self.bn_stats!r}"
            )
        if self.selection not in SELECTIONS:
            raise ValueError(
                f"selection must be one of {', '.join(SELECTIONS)}, not {self.selection!r}"
            )
        if self.normalization not in NORMALIZATIONS:
            raise ValueError(f"normalization must be one of {', '.join(NORMALIZATIONS)}")

    @property
    def protocols(self) -> list[str]:
        return [self.protocol] if isinstance(self.protocol, str) else list(self.protocol)


def with_changes(settings: EvalSettings | None, changes: Mapping[str, object]) -> EvalSettings:
    """``settings`` (default: ``EvalSettings()``) with the keyword ``changes`` applied; an
    unknown name is a TypeError naming it."""
    base = settings or EvalSettings()
    unknown = sorted(set(changes) - set(EvalSettings.__dataclass_fields__))
    if unknown:
        raise TypeError(f"unknown evaluation setting(s): {', '.join(unknown)}")
    return replace(base, **changes) if changes else base
