"""The embedded demo: real images that ship with scikit-image, turned into the three inputs a
P2X run needs, so ``make demo`` shows every stage on a fresh machine with no downloads.

1. A stand-in for a public ImageNet SSL checkpoint: public weights cannot be downloaded here,
   so the demo pretrains a small ResNet with SimCLR on crops of scikit-image's natural
   photographs (astronaut, coffee, rocket, ...). It says so on screen.
2. A whole-slide image: the left half of scikit-image's immunohistochemistry sample (a real
   IHC-stained tissue section, 512 x 512) written as a pyramidal tiled TIFF, read back through
   OpenSlide. The right half is kept for the downstream test and never pretrained on.
3. A labelled task that needs morphology, not stain colour: epithelium vs stroma tiles, labelled
   from the marker but shown to the encoders decolourised (gray, each tile's histogram
   equalised), so every tile has the same intensity histogram. Train tiles come from the left
   half, test tiles from the right half.

Why not stain classes: SimCLR's colour jitter and random grayscale teach invariance to exactly
the cue a background / haematoxylin / DAB label rests on, so such a probe rewards an encoder
for *not* having learnt what the recipe teaches (the demo's P2X scored below a random init).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

NATURAL_PHOTOS = (
    "astronaut",
    "coffee",
    "chelsea",
    "rocket",
    "hubble_deep_field",
    "camera",
    "coins",
    "moon",
    "brick",
    "gravel",
    "grass",
    "page",
)
SCAN_FACTOR = 2  # the demo slide is the section upsampled 2x: 0.25 um/px, as if scanned at 40x
TISSUE_CLASSES = ("epithelium", "stroma")


def natural_photos() -> list[np.ndarray]:
    """scikit-image's bundled photographs as RGB uint8 arrays."""
    import skimage.data

    photos = []
    for name in NATURAL_PHOTOS:
        image = getattr(skimage.data, name)()
        if image.ndim == 2:
            image = np.repeat(image[..., None], 3, axis=2)
        photos.append(np.ascontiguousarray(image[..., :3]))
    return photos


class RandomCropDataset(Dataset):
    """Fixed random crops (several scales) of a few large images: a small natural-scene
    pretraining set. Crops are drawn once from a seed so runs and resumes see the same data."""

    def __init__(
        self, images: list[np.ndarray], n_crops: int = 1024, size: int = 64, seed: int = 0
    ):
        rng = np.random.default_rng(seed)
        self.size = size
        self.images = [torch.from_numpy(im).permute(2, 0, 1).float().div(255) for im in images]
        self.crops = []
        for _ in range(n_crops):
            index = int(rng.integers(len(images)))
            _, h, w = self.images[index].shape
            side = int(rng.integers(min(h, w) // 8, min(h, w) // 2))
            y, x = int(rng.integers(h - side + 1)), int(rng.integers(w - side + 1))
            self.crops.append((index, y, x, side))

    def __len__(self) -> int:
        return len(self.crops)

    def __getitem__(self, i: int) -> dict:
        index, y, x, side = self.crops[i]
        crop = self.images[index][:, y : y + side, x : x + side]
        crop = torch.nn.functional.interpolate(
            crop[None], size=(self.size, self.size), mode="bilinear", antialias=True
        )[0]
        return {"image": crop.clamp(0, 1), "label": -1, "meta": {"source": NATURAL_PHOTOS[index]}}


def ihc_section(scan_factor: int = SCAN_FACTOR) -> np.ndarray:
    """scikit-image's IHC section (512 x 512 RGB uint8), upsampled ``scan_factor`` times (bicubic
    spline) as if scanned at that much higher magnification: the pixels of the demo slide."""
    import skimage.data
    import skimage.transform

    section = skimage.data.immunohistochemistry()
    if scan_factor == 1:
        return section
    upsampled = skimage.transform.rescale(
        section, scan_factor, channel_axis=2, order=3, anti_aliasing=False
    )
    return (upsampled.clip(0, 1) * 255).round().astype(np.uint8)


def write_demo_slide(folder: Path) -> Path:
    """The *training half* of scikit-image's IHC section as a pyramidal TIFF that OpenSlide
    opens (``generic-tiff``): the second stage never sees the half the downstream test uses.

    The 512 px section is upsampled 2x (as if scanned at twice the magnification, 0.25 um/px)
    so that the tiny recipe's 64 px tiles each cover 32 px of the section.
    """
    from medp2x.data.wsi import write_pyramidal_tiff

    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "ihc_train_half.tiff"
    if not path.exists():
        section = ihc_section()
        write_pyramidal_tiff(
            path, section[:, : section.shape[1] // 2], tile=256, levels=3, mpp=0.25
        )
    return path


@dataclass
class LabelledTiles(Dataset):
    images: torch.Tensor  # N x 3 x S x S in [0, 1]
    labels: torch.Tensor
    corners: torch.Tensor  # N x 2: each tile's top-left (y, x) in section pixels
    tile: int  # tile side in section pixels
    classes: tuple[str, ...] = TISSUE_CLASSES

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict:
        y, x = (int(v) for v in self.corners[i])
        return {"image": self.images[i], "label": int(self.labels[i]), "meta": {"y": y, "x": x}}


def tissue_regions(rgb: np.ndarray) -> np.ndarray:
    """Per-pixel tissue type of the IHC section: 0 background, 1 epithelium, 2 stroma.

    The section's marker stains the epithelial glands' membranes brown (DAB), so the marker
    *defines* the labels, as restained IHC labels epithelium for H&E in Bulten et al. 2019:
    epithelium is where the DAB optical density, averaged over a few cells (Gaussian,
    sigma 6 px), exceeds 0.06, with holes and specks under 1500 px closed or removed;
    background is bright (mean over sigma 4 px above 222 of 255) outside the glands; stroma is
    the rest. The classifier never sees this colour: see ``decolourise``.
    """
    import skimage.color
    import skimage.filters
    import skimage.morphology

    dab = skimage.filters.gaussian(skimage.color.rgb2hed(rgb)[..., 2], sigma=6)
    glands = skimage.morphology.remove_small_objects(dab > 0.06, max_size=1500)
    glands = skimage.morphology.remove_small_holes(glands, max_size=1500)
    brightness = skimage.filters.gaussian(rgb.astype(np.float64).mean(2), 4, preserve_range=True)
    regions = np.full(rgb.shape[:2], 2, np.uint8)
    regions[(brightness > 222) & ~glands] = 0
    regions[glands] = 1
    return regions


def decolourise(tile: np.ndarray) -> np.ndarray:
    """Luminance, then each tile's intensities replaced by their ranks (exact histogram
    equalisation): every tile has the same, uniform intensity histogram, so neither stain
    colour nor brightness nor contrast can tell the classes apart, only where intensities
    sit, i.e. morphology and texture. Returns an H x W float32 image in (0, 1)."""
    luminance = tile[..., :3].astype(np.float64) @ np.array([0.2125, 0.7154, 0.0721])
    ranks = np.empty(luminance.size, np.float64)
    ranks[np.argsort(luminance, axis=None, kind="stable")] = np.arange(luminance.size)
    return ((ranks + 0.5) / luminance.size).reshape(luminance.shape).astype(np.float32)


def ihc_tissue_tiles(
    size: int = 64, tile: int = 32, purity: float = 0.75
) -> tuple[LabelledTiles, LabelledTiles]:
    """The demo's downstream task: epithelium vs stroma on decolourised tiles of the IHC section.

    Epithelium vs stroma is the classic texture task of tissue image analysis (e.g. Linder et
    al. 2012): packed columnar cells outlined by membranes against sparse spindle nuclei in
    loose fibres. ``tile`` px of the section (the second stage's tiles: 64 px of the 2x
    slide) become ``size`` px images. A tile is labelled when ``purity`` of it is one tissue;
    mixed and background tiles are dropped. Train: the left half (the half the second stage
    pretrained on), tiles overlapping by half; test: the right half, never pretrained on,
    tiles that do not overlap, so the bootstrap's independent test images are not copies.
    """
    import skimage.data

    rgb = skimage.data.immunohistochemistry()
    regions = tissue_regions(rgb)
    section = ihc_section()
    half = rgb.shape[1] // 2
    train = _tiles(section, regions, range(0, half - tile + 1, tile // 2), tile, size, purity)
    test = _tiles(section, regions, range(half, rgb.shape[1] - tile + 1, tile), tile, size, purity)
    return train, test


def _tiles(
    section: np.ndarray, regions: np.ndarray, columns: range, tile: int, size: int, purity: float
) -> LabelledTiles:
    """Decolourised ``size`` px images and labels of the tiles on a grid of ``columns`` x rows
    with the same step (``section`` is ``regions`` upsampled by ``SCAN_FACTOR``)."""
    import skimage.transform

    images, labels, corners = [], [], []
    scale = section.shape[0] // regions.shape[0]
    for y in range(0, regions.shape[0] - tile + 1, columns.step):
        for x in columns:
            counts = np.bincount(regions[y : y + tile, x : x + tile].ravel(), minlength=3)
            label = int(np.argmax(counts[1:]))  # 0 epithelium, 1 stroma
            if counts[1 + label] < purity * tile * tile:
                continue
            pixels = section[scale * y : scale * (y + tile), scale * x : scale * (x + tile)]
            if pixels.shape[0] != size:
                pixels = skimage.transform.resize(pixels, (size, size), order=1, anti_aliasing=True)
            images.append(torch.from_numpy(decolourise(pixels)).expand(3, -1, -1))
            labels.append(label)
            corners.append((y, x))
    return LabelledTiles(
        torch.stack(images).contiguous(), torch.tensor(labels), torch.tensor(corners), tile
    )
