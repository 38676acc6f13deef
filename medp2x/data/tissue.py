"""Tissue detection on a low-resolution slide image, and per-tile tissue fractions.

Brightfield slides (H&E, IHC) have a bright, grey background and saturated stain, so Otsu's
threshold on the HSV saturation separates tissue from glass. Fluorescence slides have a dark
background on which saturation is meaningless (a near-black pixel like (0, 0, 5) is "fully
saturated"), so there Otsu runs on log brightness instead. Both channels are smoothed first:
the mask should outline tissue regions, not single nuclei, because tiles are then kept by the
fraction of their area that is tissue.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage
from skimage.filters import threshold_otsu

# Median brightness below which a slide is taken as fluorescence (dark background).
# Brightfield glass is ~0.9 and even dense H&E tissue stays above ~0.5.
DARK_BACKGROUND = 0.3
# Thresholds never go below these floors, so a blank slide with JPEG noise finds no tissue
# instead of Otsu splitting the noise in two.
TISSUE_MODES = ("auto", "brightfield", "fluorescence")
MIN_SATURATION = 0.05
MIN_BRIGHTNESS = 0.03


def tissue_mask(rgb: np.ndarray, mode: str = "auto") -> np.ndarray:
    """Boolean H x W tissue mask of an H x W x 3 uint8 image.

    ``mode``: "brightfield" (Otsu on saturation), "fluorescence" (Otsu on log brightness) or
    "auto" (fluorescence when the median brightness is below ``DARK_BACKGROUND``).
    """
    if rgb.ndim != 3 or rgb.shape[-1] != 3:
        raise ValueError(f"tissue_mask needs an H x W x 3 image, got shape {rgb.shape}")
    image = rgb.astype(np.float32) / 255.0
    value = image.max(axis=-1)
    if mode == "auto":
        mode = "fluorescence" if float(np.median(value)) < DARK_BACKGROUND else "brightfield"
    sigma = max(1.0, max(rgb.shape[:2]) / 150.0)  # outline regions, not nuclei
    if mode == "brightfield":
        saturation = (value - image.min(axis=-1)) / np.maximum(value, 1e-6)
        channel = ndimage.gaussian_filter(saturation, sigma)
        return channel > max(_otsu(channel), MIN_SATURATION)
    if mode == "fluorescence":
        channel = np.log(ndimage.gaussian_filter(value, sigma) + 1.0 / 255.0)
        return channel > max(_otsu(channel), np.log(MIN_BRIGHTNESS + 1.0 / 255.0))
    raise ValueError(f"tissue mode must be 'auto', 'brightfield' or 'fluorescence', not {mode!r}")


def _otsu(channel: np.ndarray) -> float:
    # threshold_otsu on a constant image returns that constant; ``>`` then selects nothing,
    # and the floors above decide for nearly constant images.
    return float(threshold_otsu(channel))


def tile_fractions(
    mask: np.ndarray,
    xy: np.ndarray,
    footprint: tuple[float, float],
    slide_size: tuple[int, int],
) -> np.ndarray:
    """Fraction of tissue in each tile, from a mask covering the whole slide.

    ``xy`` holds N level-0 top-left corners, ``footprint`` the tile's level-0 width and
    height, ``slide_size`` the level-0 (width, height) the mask covers. Uses a summed-area
    table so a slide with 10^5 tiles takes milliseconds. Tiles smaller than a mask pixel get
    the value of the mask pixels they touch.
    """
    mh, mw = mask.shape
    sx, sy = mw / slide_size[0], mh / slide_size[1]
    table = np.zeros((mh + 1, mw + 1), dtype=np.int64)
    table[1:, 1:] = mask.astype(np.int64).cumsum(0).cumsum(1)
    x0 = np.clip(np.floor(xy[:, 0] * sx).astype(np.int64), 0, mw - 1)
    y0 = np.clip(np.floor(xy[:, 1] * sy).astype(np.int64), 0, mh - 1)
    x1 = np.clip(np.ceil((xy[:, 0] + footprint[0]) * sx).astype(np.int64), x0 + 1, mw)
    y1 = np.clip(np.ceil((xy[:, 1] + footprint[1]) * sy).astype(np.int64), y0 + 1, mh)
    inside = table[y1, x1] - table[y0, x1] - table[y1, x0] + table[y0, x0]
    return (inside / ((x1 - x0) * (y1 - y0))).astype(np.float32)
