"""Low-level references: exact histogram bins and pixel averages, and they plug into the
evaluation like any encoder (by name in resolve_encoder and the CLI)."""

from __future__ import annotations

import pytest
import torch

from medp2x.baselines import ColourHistogram, TinyImage, build_baseline
from medp2x.commands.evaluate import _named_encoders
from medp2x.eval.compare import compare_encoders
from medp2x.eval.encoders import resolve_encoder


def test_colour_histogram_bins_are_exact_and_unit_norm():
    image = torch.zeros(1, 3, 8, 8)
    image[:, 0, :, :4] = 1.0  # left half pure red (bin r=3, g=0, b=0 -> 48)
    image[:, 2, :, 4:] = 0.3  # right half dark blue (bin r=0, g=0, b=1 -> 1)
    gray = torch.full((1, 1, 8, 8), 0.6)  # R = G = B = 0.6 -> bin (2, 2, 2) -> 42
    hist = ColourHistogram()(torch.cat([image, gray.expand(-1, 3, -1, -1)]))
    assert hist.shape == (2, 64)
    assert hist[0].nonzero().flatten().tolist() == [1, 48]
    assert hist[0, [1, 48]].tolist() == pytest.approx([0.5**0.5, 0.5**0.5])
    assert torch.equal(ColourHistogram()(gray), hist[1:])
    assert hist[1, 42] == 1.0 and hist.norm(dim=1).tolist() == pytest.approx([1.0, 1.0])


def test_tiny_image_is_the_block_average():
    image = torch.arange(64.0).view(1, 1, 8, 8)
    tiny = TinyImage(side=4, channels=1)(image)
    expected = image.view(1, 1, 4, 2, 4, 2).mean((3, 5)).flatten(1)
    assert torch.equal(tiny, expected) and TinyImage().feature_dim == 48


class ColourClasses(torch.utils.data.Dataset):
    """Four classes that differ only by colour, with random texture."""

    colours = torch.tensor([[0.9, 0.1, 0.1], [0.1, 0.9, 0.1], [0.1, 0.1, 0.9], [0.9, 0.9, 0.1]])

    def __init__(self, n: int, seed: int):
        g = torch.Generator().manual_seed(seed)
        self.labels = torch.arange(n) % 4
        noise = 0.1 * torch.rand(n, 3, 16, 16, generator=g)
        self.images = (self.colours[self.labels].view(n, 3, 1, 1) + noise).clamp(0, 1)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict:
        return {"image": self.images[i], "label": int(self.labels[i])}


def test_baselines_are_encoders_by_name():
    assert isinstance(resolve_encoder("colour_histogram"), ColourHistogram)
    assert isinstance(resolve_encoder("tiny_image"), TinyImage)
    assert _named_encoders(["colour_histogram", "random"], []) == {
        "colour_histogram": "colour_histogram",
        "random": "random",
    }
    with pytest.raises(ValueError, match="choose one of colour_histogram, tiny_image"):
        build_baseline("sift")
    rows = compare_encoders(
        {"histogram": "colour_histogram"},
        ColourClasses(40, 0),
        ColourClasses(20, 1),
        protocol="knn",
        image_size=16,
    )
    assert rows[0]["accuracy"] == 1.0
