"""The embedded demo's downstream task (``make demo``): it must measure what pretraining learns.

Its earlier task was labelled by stain colour, which SimCLR's colour augmentation teaches
invariance to; these tests pin the properties that make the new one a fair measurement.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from medp2x.baselines import ColourHistogram
from medp2x.pipeline import P2XJob

SECTION = 512  # scikit-image's IHC section is 512 x 512


@pytest.fixture(scope="module")
def demo_tiles():
    """The labelled set exactly as ``make demo`` builds it (64 px, the tiny recipe's size)."""
    job = P2XJob(name="demo", make_dataset=lambda path, size: None, output_dir="unused")
    return job._labelled_data(demo=True, image_size=64)


def test_colour_alone_cannot_tell_the_classes_apart(demo_tiles):
    """Every tile has the same intensity histogram, so the colour-histogram reference is one
    constant vector (a probe on it can only predict one class): whatever an encoder scores
    above chance is morphology or texture."""
    train, test = demo_tiles
    images = torch.cat([train.images, test.images])
    hist = ColourHistogram()(images)
    assert torch.allclose(hist, hist[:1].expand_as(hist), atol=1e-6)
    assert images.shape[1:] == (3, 64, 64) and torch.equal(images[:, 0], images[:, 2])  # gray
    for split in (train, test):  # both tissues present in both splits
        counts = np.bincount(split.labels.numpy(), minlength=2)
        assert counts.min() >= 30, counts


def test_texture_alone_can_tell_the_classes_apart(demo_tiles):
    """The labels are learnable without colour: a linear model on the tiles' local binary
    pattern histograms (a classical texture descriptor) scores well above chance on the
    held-out half. A task nothing could learn would make every encoder look alike."""
    from skimage.feature import local_binary_pattern
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import balanced_accuracy_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    def lbp_histograms(tiles) -> np.ndarray:
        features = []
        for image in (tiles.images[:, 0].numpy() * 255).astype(np.uint8):
            codes = [local_binary_pattern(image, p, r, "uniform") for p, r in ((8, 2), (16, 8))]
            features.append(
                np.concatenate([np.bincount(c.astype(int).ravel(), minlength=18) for c in codes])
            )
        return np.array(features, dtype=np.float64) / 64**2

    train, test = demo_tiles
    probe = make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=5000))
    probe.fit(lbp_histograms(train), train.labels.numpy())
    predicted = probe.predict(lbp_histograms(test))
    assert balanced_accuracy_score(test.labels.numpy(), predicted) > 0.8


def test_test_tiles_are_held_out_and_independent(demo_tiles):
    """Train tiles lie in the left half, test tiles in the right half (the half the demo slide
    leaves out), and no two test tiles share a pixel: the bootstrap treats them as independent."""
    train, test = demo_tiles
    tile = test.tile
    assert int(train.corners[:, 1].max()) + tile <= SECTION // 2
    assert int(test.corners[:, 1].min()) >= SECTION // 2
    y, x = test.corners[:, 0], test.corners[:, 1]
    apart = ((y[:, None] - y[None]).abs() >= tile) | ((x[:, None] - x[None]).abs() >= tile)
    assert apart.fill_diagonal_(True).all()
    assert test[0]["meta"] == {"y": int(y[0]), "x": int(x[0])}


def test_labels_follow_the_tissue(demo_tiles):
    """Anchors read off the section: the small gland at the bottom centre is epithelium, the
    loose tissue along the right edge is stroma."""
    _, test = demo_tiles
    where = {
        tuple(c.tolist()): int(label) for c, label in zip(test.corners, test.labels, strict=True)
    }
    assert where[(384, 288)] == 0  # epithelium
    assert where[(96, 480)] == 1  # stroma
    assert test.classes == ("epithelium", "stroma")


def test_demo_slide_holds_only_the_training_half(tmp_path: Path):
    """The second stage pretrains on the slide, so the slide must not contain the test half."""
    import openslide

    from medp2x.demo import ihc_section, write_demo_slide

    path = write_demo_slide(tmp_path)
    slide = openslide.OpenSlide(str(path))
    width, height = slide.dimensions
    section = ihc_section()
    assert (height, width) == (section.shape[0], section.shape[1] // 2)
    pixels = np.asarray(slide.read_region((0, 0), 0, (width, height)).convert("RGB"))
    assert np.array_equal(pixels, section[:, : section.shape[1] // 2])


def test_demo_tiles_are_deterministic(demo_tiles):
    from medp2x.demo import ihc_tissue_tiles

    train, test = ihc_tissue_tiles(size=64)
    assert torch.equal(train.images, demo_tiles[0].images)
    assert torch.equal(test.labels, demo_tiles[1].labels)
