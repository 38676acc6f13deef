"""Pretraining batches of images that keep their own sizes.

The views crop each image at its own resolution (a RandomResizedCrop of the image, as the
originals take it from the decoded photograph), so a batch cannot be made by squashing every
image to one square. Instead the images, each capped by ``source_size`` (``base.resize_to``
with ``"cap"``: aspect kept, only ever shrunk), are padded to the largest height and width of
the batch, and every row carries its own (h, w): ``views.sample_crop_boxes`` draws each row's
box inside that row's own image.

Padding repeats the last row and column. ``roi_align`` reads up to half a pixel past a box's
edge; at a tensor's border it repeats the edge pixel, and with this padding it reads the same
values inside a padded row, so the view of a padded row equals the view of the image alone.
A batch of same-shape images is a plain stack (no padding).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from medp2x.data.base import resize_to


@dataclass
class ImageBatch:
    """``pixels``: B x C x H x W float in [0, 1], padded to the largest image; ``sizes``:
    B x 2 int64 (h, w) of each image, kept on the CPU where the views draw their boxes."""

    pixels: torch.Tensor
    sizes: torch.Tensor

    def __len__(self) -> int:
        return self.pixels.shape[0]

    def to(self, device: torch.device | str, non_blocking: bool = False) -> ImageBatch:
        return ImageBatch(self.pixels.to(device, non_blocking=non_blocking), self.sizes)

    def pin_memory(self) -> ImageBatch:  # DataLoader(pin_memory=True) calls this
        return ImageBatch(self.pixels.pin_memory(), self.sizes)


def pad_images(images: Sequence[torch.Tensor]) -> ImageBatch:
    """C x h x w images (same C, any h and w) as one ``ImageBatch``, edge-padded."""
    if not images:
        raise ValueError("cannot collate an empty batch")
    if any(image.ndim != 3 for image in images):
        shapes = sorted({tuple(image.shape) for image in images})
        raise ValueError(f"expected C x H x W images, got shapes {shapes}")
    channels = {image.shape[0] for image in images}
    if len(channels) > 1:
        raise ValueError(f"images with different channel counts {sorted(channels)} in one batch")
    sizes = torch.tensor([tuple(image.shape[-2:]) for image in images], dtype=torch.int64)
    height, width = (int(v) for v in sizes.max(0).values)
    if bool((sizes == torch.tensor([height, width])).all()):
        return ImageBatch(torch.stack(list(images)), sizes)
    out = images[0].new_empty((len(images), channels.pop(), height, width))
    for row, image in zip(out, images, strict=True):
        h, w = image.shape[-2:]
        row[:, :h, :w] = image
        row[:, :h, w:] = image[:, :, w - 1 :]  # repeat the last column to the right
        row[:, h:, :] = row[:, h - 1 : h, :]  # and the last row (padded width included) below
    return ImageBatch(out, sizes)


class PretrainCollate:
    """``collate_fn`` of the pretraining loader: samples (reader dicts or C x H x W tensors)
    to an ``ImageBatch``, each image capped at ``source_size`` and given ``channels``.

    Readers asked for ``resize="cap"`` have already capped their images, so this only
    catches datasets that did not; a class (not a closure) so spawned workers can pickle it.
    """

    def __init__(self, source_size: int, channels: int | None):
        if not isinstance(source_size, int) or source_size < 1:
            raise ValueError(
                f"source_size must be a positive number of pixels, not {source_size!r}"
            )
        self.source_size, self.channels = source_size, channels

    def __call__(self, samples: Sequence[dict | torch.Tensor]) -> ImageBatch:
        from medp2x.networks import match_channels

        images = []
        for sample in samples:
            image = sample["image"] if isinstance(sample, dict) else sample
            if image.dtype == torch.uint8:
                image = image.float().div_(255.0)
            elif not image.is_floating_point():
                raise ValueError(
                    f"sample images must be float in [0, 1] or uint8, not {image.dtype}"
                )
            if image.dtype != torch.float32:
                image = image.float()
            image = resize_to(image, self.source_size, "cap")
            images.append(match_channels(image, self.channels))
        batch = pad_images(images)
        batch.pixels.clamp_(0.0, 1.0)
        return batch

    def __repr__(self) -> str:
        return f"PretrainCollate(source_size={self.source_size}, channels={self.channels})"
