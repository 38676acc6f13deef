"""The embedded demo: real images that ship with scikit-image, turned into the three inputs a
P2X run needs, so ``make demo`` shows every stage on a fresh machine with no downloads.

1. A stand-in for a public ImageNet SSL checkpoint: public weights cannot be downloaded here,
   so the demo pretrains a small ResNet with SimCLR on crops of scikit-image's natural
   photographs (astronaut, coffee, rocket, ...). It says so on screen.
2. A whole-slide image: scikit-image's immunohistochemistry sample (a real IHC-stained tissue
   section, 512 x 512) written as a pyramidal tiled TIFF, read back through OpenSlide.
3. A small labelled set from the same stain: tiles labelled background / haematoxylin-only /
   DAB-positive by colour deconvolution (``skimage.color.rgb2hed``), split left/right so
   train and test tiles never overlap.
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
IHC_CLASSES = ("background", "haematoxylin", "dab_positive")


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


def write_demo_slide(folder: Path) -> Path:
    """scikit-image's IHC section as a pyramidal TIFF that OpenSlide opens (``generic-tiff``).

    The 512 px section is upsampled 2x (as if scanned at twice the magnification, 0.25 um/px)
    so that the tiny recipe's 64 px tiles give the second stage about 150 tissue tiles.
    """
    import skimage.data
    import skimage.transform

    from medp2x.data.wsi import write_pyramidal_tiff

    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "ihc_demo.tiff"
    if not path.exists():
        section = skimage.data.immunohistochemistry()
        upsampled = skimage.transform.rescale(
            section, 2, channel_axis=2, order=3, anti_aliasing=False
        )
        rgb = (upsampled.clip(0, 1) * 255).round().astype(np.uint8)
        write_pyramidal_tiff(path, rgb, tile=256, levels=3, mpp=0.25)
    return path


@dataclass
class LabelledTiles(Dataset):
    images: torch.Tensor  # N x 3 x S x S in [0, 1]
    labels: torch.Tensor
    classes: tuple[str, ...] = IHC_CLASSES

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict:
        return {"image": self.images[i], "label": int(self.labels[i]), "meta": {}}


def ihc_labelled_tiles(tile: int = 32, stride: int = 16) -> tuple[LabelledTiles, LabelledTiles]:
    """Train (left half) and test (right half) tiles of the IHC image, labelled by stain.

    Label rule (colour deconvolution): background when under 30% of the tile is tissue;
    else DAB-positive when over 15% of its tissue pixels carry DAB; else haematoxylin.
    """
    import skimage.color
    import skimage.data

    rgb = skimage.data.immunohistochemistry()
    hed = skimage.color.rgb2hed(rgb)
    tissue = rgb.astype(np.float32).mean(2) < 200
    dab = hed[..., 2] > np.percentile(hed[..., 2], 85)
    image = torch.from_numpy(rgb).permute(2, 0, 1).float().div(255)
    width = rgb.shape[1]
    splits: dict[str, tuple[list, list]] = {"train": ([], []), "test": ([], [])}
    for y in range(0, rgb.shape[0] - tile + 1, stride):
        for x in range(0, width - tile + 1, stride):
            if x < width // 2 <= x + tile:  # straddles the split line: dropped, no leakage
                continue
            t = tissue[y : y + tile, x : x + tile].mean()
            d = (dab[y : y + tile, x : x + tile] & tissue[y : y + tile, x : x + tile]).sum() / max(
                1, tissue[y : y + tile, x : x + tile].sum()
            )
            label = 0 if t < 0.3 else (2 if d > 0.15 else 1)
            images, labels = splits["train" if x + tile <= width // 2 else "test"]
            images.append(image[:, y : y + tile, x : x + tile])
            labels.append(label)
    return tuple(  # type: ignore[return-value]
        LabelledTiles(torch.stack(im), torch.tensor(lab)) for im, lab in splits.values()
    )
