"""How evaluation shows images to an encoder: their shape is kept, never squashed.

- **Evaluation view** (frozen features, selection, test): the shorter side is resized to
  ``size`` (bilinear, antialiased) and the centre ``size x size`` is cropped: torchvision's
  ``Resize(size) + CenterCrop(size)``. A square image is only resized. We do not use the
  ImageNet ``Resize(size / 0.875)`` variant: it trims 12.5 % of the short side, which on a
  chest X-ray cuts lung edges and on a small MedMNIST image is a tenth of the content.
- **Fine-tuning view**: ``RandomResizedCrop(size, scale=(crop_scale, 1), ratio=(3/4, 4/3))``
  and a left-right flip with probability 1/2 (torchvision's defaults, the fine-tuning recipe of
  SimCLR, MoCo and VISSL); crops keep the image's aspect statistics instead of a squash.

Both run in the DataLoader's collate function, per sample, because readers may return images
of different native sizes; the random crops draw from torch's global generator, which
``finetune`` seeds (and DataLoader workers seed from the loader's generator).
"""

from __future__ import annotations

import torch
from torchvision.transforms import RandomResizedCrop
from torchvision.transforms.v2 import functional as TF

RATIO = (3 / 4, 4 / 3)


def centre_view(image: torch.Tensor, size: int | None) -> torch.Tensor:
    """Shorter side to ``size``, then the centre ``size x size`` (``None``: as read)."""
    if size is None or tuple(image.shape[-2:]) == (size, size):
        return image
    if min(image.shape[-2:]) != size:
        image = TF.resize(image.float(), size, antialias=True)  # int size: the shorter side
    return TF.center_crop(image, [size, size]).clamp_(0.0, 1.0)


def training_view(
    image: torch.Tensor, size: int | None, crop_scale: float = 0.08, flip: bool = True
) -> torch.Tensor:
    """A random-resized crop to ``size`` (default: the shorter side) and a random flip."""
    size = size or min(image.shape[-2:])
    top, left, h, w = RandomResizedCrop.get_params(image, [crop_scale, 1.0], list(RATIO))
    image = TF.resized_crop(image.float(), top, left, h, w, [size, size], antialias=True)
    if flip and torch.rand(()) < 0.5:
        image = image.flip(-1)
    return image.clamp_(0.0, 1.0)


class EvalCollate:
    """Samples -> (images, labels) through the evaluation view. A class (not a closure) so
    DataLoader workers can pickle it."""

    def __init__(self, image_size: int | None = None):
        self.image_size = image_size

    def view(self, image: torch.Tensor) -> torch.Tensor:
        return centre_view(image, self.image_size)

    def __call__(self, samples: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
        images = [self.view(s["image"]) for s in samples]
        shapes = {tuple(i.shape) for i in images}
        if len(shapes) > 1:
            raise ValueError(
                f"images of different shapes {sorted(shapes)} in one batch: set image_size"
            )
        labels = torch.tensor([int(s["label"]) for s in samples], dtype=torch.long)
        return torch.stack(images), labels


class TrainCollate(EvalCollate):
    """Samples -> (images, labels) through the fine-tuning view."""

    def __init__(self, image_size: int | None = None, crop_scale: float = 0.08):
        if not 0.0 < crop_scale <= 1.0:
            raise ValueError(f"crop_scale must be in (0, 1], not {crop_scale}")
        super().__init__(image_size)
        self.crop_scale = crop_scale

    def view(self, image: torch.Tensor) -> torch.Tensor:
        return training_view(image, self.image_size, self.crop_scale)


def describe_views(image_size: int | None, crop_scale: float, finetune: bool) -> str:
    """One sentence for a table header."""
    if image_size is None:
        text = "images as read (no resize)"
    else:
        text = (
            f"evaluation view: shorter side resized to {image_size} px, centre "
            f"{image_size} x {image_size} crop (aspect kept)"
        )
    if finetune:
        size = f"{image_size} px" if image_size else "the shorter side"
        text += (
            f"; fine-tuning view: random-resized crop to {size} (scale {crop_scale:g}-1, "
            "ratio 3/4-4/3) + left-right flip"
        )
    return text
