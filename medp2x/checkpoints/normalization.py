"""The input normalisation a checkpoint's weights expect, as plain ``{"mean", "std"}`` lists.

``None`` means images in [0, 1] with no mean/std (SimCLR). Each format declares its publisher's
normalisation in its registry entry (``formats/``); medp2x files carry their own.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from medp2x.networks import IMAGENET_MEAN, IMAGENET_STD

IMAGENET = {"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)}


def plain_normalization(normalization: Any) -> dict | None:
    """``{"mean": [floats], "std": [floats]}`` from a mapping or an object with ``.mean`` and
    ``.std`` (arrays, tensors or lists), or None when there is no mean."""
    if normalization is None:
        return None
    if hasattr(normalization, "mean") and not isinstance(normalization, Mapping):
        normalization = {"mean": normalization.mean, "std": normalization.std}
    if normalization.get("mean") is None:
        return None
    return {
        k: [float(v) for v in np.asarray(normalization[k], dtype=np.float64).reshape(-1)]
        for k in ("mean", "std")
    }
