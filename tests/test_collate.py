"""Pretraining batches (issue #14, item 2): views crop from each image at its own resolution,
capped by ``source_size``, never from a copy squashed to the crop size."""

from __future__ import annotations

import pytest
import torch
import torchvision.transforms.v2.functional as TF
from torch.utils.data import Dataset

from medp2x.data.collate import ImageBatch, PretrainCollate, pad_images
from medp2x.engine import PretrainConfig, pretrain
from medp2x.methods import recipe_for
from medp2x.views import default_source_size, source_size_for


def test_samples_of_different_shapes_are_padded_and_keep_their_sizes():
    g = torch.Generator().manual_seed(0)
    samples = [
        {"image": torch.rand(3, 20, 30, generator=g)},
        {"image": torch.rand(1, 40, 16, generator=g)},  # gray: repeated to three channels
        {"image": torch.rand(3, 300, 150, generator=g)},  # larger than the cap: 64 x 32
    ]
    batch = PretrainCollate(source_size=32, channels=3)(samples)
    assert isinstance(batch, ImageBatch) and len(batch) == 3
    assert batch.sizes.tolist() == [[20, 30], [40, 16], [64, 32]]
    assert batch.pixels.shape == (3, 3, 64, 32) and batch.sizes.dtype == torch.int64
    assert torch.equal(batch.pixels[0, :, :20, :30], samples[0]["image"])
    assert torch.equal(batch.pixels[1, :, :40, :16], samples[1]["image"].expand(3, -1, -1))
    capped = TF.resize(samples[2]["image"], [32], antialias=True).clamp(0, 1)
    assert torch.allclose(batch.pixels[2], capped, atol=1e-6)
    # padding repeats the last row and column (what roi_align reads at a tensor's border)
    assert torch.equal(
        batch.pixels[0, :, 20:, :30], batch.pixels[0, :, 19:20, :30].expand(-1, 44, -1)
    )
    assert torch.equal(batch.pixels[0, :, :, 30:], batch.pixels[0, :, :, 29:30].expand(-1, -1, 2))
    same = pad_images([s["image"] for s in samples[:1]] * 2)
    assert same.pixels.shape == (2, 3, 20, 30) and same.sizes.tolist() == [[20, 30]] * 2
    moved = batch.to("cpu", non_blocking=True)
    assert moved.sizes.device.type == "cpu" and torch.equal(moved.pixels, batch.pixels)


def test_default_source_size_is_a_multiple_of_the_crop_per_profile():
    assert default_source_size(64, "tiny") == 128
    assert default_source_size(224, "full") == 512  # the published 224 px recipes
    assert default_source_size(96, "full") == 224  # the paper's 96 px appendix runs
    recipe = recipe_for("simclr", "tiny")
    assert source_size_for(recipe) == 2 * recipe.views.large_size
    assert source_size_for(recipe, 300) == 300
    with pytest.raises(ValueError, match="source_size must be a positive"):
        source_size_for(recipe, 0)


class Checkerboards(Dataset):
    """A 1-pixel checkerboard, 64 x 96 (H x W): shrinking it to a 32 px crop size first turns
    it into flat grey; a crop of the image itself still shows the pattern."""

    def __init__(self, n: int = 8):
        yy, xx = torch.meshgrid(torch.arange(64), torch.arange(96), indexing="ij")
        self.image = ((yy + xx) % 2).float().expand(3, -1, -1)
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        return {"image": self.image, "label": -1, "meta": {}}


def test_small_crops_come_from_the_image_pixels_not_a_copy_squashed_to_the_crop_size(
    tmp_path, monkeypatch
):
    import medp2x.views as views

    seen: list[torch.Tensor] = []
    original = views.BatchAugment.__call__

    def record(self, images, generator=None):
        out = original(self, images, generator)
        seen.extend(out)
        return out

    monkeypatch.setattr(views.BatchAugment, "__call__", record)
    no_photometric = dict(flip_p=0.0, jitter_p=0.0, gray_p=0.0, blur_p=0.0, solarize_p=0.0)
    config = PretrainConfig(
        dataset=Checkerboards(),
        output_dir=tmp_path / "run",
        arch="resnet18",
        image_size=32,  # tiny profile: source_size defaults to 64, the images' shorter side
        batch_size=4,
        epochs=1,
        max_iterations=1,
        progress=False,
        method_options={"views": {"large_scale": [0.08, 0.08]}},
        view_options=no_photometric,
    )
    pretrain(config)
    contrast = torch.stack([v[:, :, 2:-2, 2:-2].std((1, 2, 3)) for v in seen])
    # a 0.08-area crop is ~20 px of the 64 px image enlarged 1.6x: the checkerboard stays
    assert contrast.min() > 0.15, contrast
