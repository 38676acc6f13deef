"""Robust intensity windows and the sample tensor, shared by the DICOM and NIfTI readers.

Medical pixel values have long tails (collimator edges, burned-in text, fat, vessels with
contrast), so a plain min-max scaling wastes most of [0, 1] on a few outliers. Percentile
windows are the usual cure. We compute the window once (per frame or per volume, optionally
over a foreground mask) and apply it separately, because MONAI's
``ScaleIntensityRangePercentiles`` recomputes percentiles on whatever array it is given and
cannot take a mask: a volume's window must be applied to each of its slices unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torchvision.transforms.v2 import functional as TF


def percentile_window(
    values: np.ndarray,
    percentiles: tuple[float, float] = (1.0, 99.0),
    mask: np.ndarray | None = None,
) -> tuple[float, float]:
    """The ``(lo, hi)`` intensities at the given percentiles of the finite values
    (inside ``mask`` when it selects anything). ``(0, 100)`` is min-max."""
    low, high = percentiles
    if not 0.0 <= low < high <= 100.0:
        raise ValueError(f"percentiles must satisfy 0 <= low < high <= 100, got {percentiles}")
    selected = values[mask] if mask is not None and mask.any() else values
    selected = selected[np.isfinite(selected)]
    if selected.size == 0:
        return 0.0, 0.0
    lo, hi = np.percentile(selected, (low, high))
    return float(lo), float(hi)


def scale_to_unit(values: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """``values`` mapped linearly from ``[lo, hi]`` onto ``[0, 1]`` and clipped, as float32.
    A degenerate window (``hi <= lo``, a constant image) gives zeros, NaN gives 0."""
    if not hi > lo:
        return np.zeros(values.shape, dtype=np.float32)
    scaled = (values.astype(np.float64) - lo) / (hi - lo)
    return np.clip(np.nan_to_num(scaled, nan=0.0), 0.0, 1.0).astype(np.float32)


def to_sample_tensor(
    image: np.ndarray, channels: int | None = None, image_size: int | Sequence[int] | None = None
) -> torch.Tensor:
    """The last step every reader shares: an H x W or H x W x 3 image in [0, 1] becomes the
    float32 C x H x W tensor of the sample contract. ``channels`` forces 1 (ITU-R 601 luma)
    or 3 (grey repeated); ``image_size`` (int: square, or (H, W)) resizes with antialiasing
    so that samples of different sizes can share a batch."""
    tensor = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))
    tensor = tensor.unsqueeze(0) if tensor.ndim == 2 else tensor.permute(2, 0, 1)
    if channels == 1 and tensor.shape[0] == 3:
        tensor = TF.rgb_to_grayscale(tensor, num_output_channels=1)
    elif channels == 3 and tensor.shape[0] == 1:
        tensor = tensor.expand(3, -1, -1)
    if image_size is not None:
        size = [image_size, image_size] if isinstance(image_size, int) else list(image_size)
        tensor = TF.resize(tensor, size, antialias=True)
    return tensor.clamp(0.0, 1.0).contiguous()
