"""benchmarks/parity.py and its helpers: both sides start from the same weights, lightly's
split-BN MoCo backbone is read back as the network it trained, the timed window is the same
arithmetic for both, and the verdicts are the issue's bars."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))  # the scripts import each other by name

import parity  # noqa: E402
import parity_train  # noqa: E402

from medp2x.networks import IMAGENET_MEAN, IMAGENET_STD, build_encoder  # noqa: E402


def test_images_per_second_leave_out_warm_up_and_start_up():
    # iterations end at t = 10 (start-up before), 11, 12 (warm-up), then every 0.5 s
    times = [10.0, 11.0, 12.0, 12.5, 13.0, 13.5, 14.0]
    out = parity_train.throughput(times, batch_size=8)
    assert out["timed_iterations"] == 4
    assert out["img_per_s"] == pytest.approx(8 * 4 / 2.0)
    assert out["img_per_s_median"] == pytest.approx(16.0)


def test_cpu_clock_reads_the_cpu_between_two_stamps():
    clock = parity_train.CpuClock(period=1e9)  # no thread samples: only the two below
    clock.samples = [(0.0, 0.0), (10.0, 20.0)]  # 2 CPU seconds per wall second
    assert clock.cpu_between(2.0, 4.0) == pytest.approx(4.0)
    clock.stop()


def test_lightly_backbone_starts_from_medp2x_initial_weights():
    pytest.importorskip("lightly")
    import parity_lightly

    torch.manual_seed(3)
    ours = build_encoder("resnet18").state_dict()
    torch.manual_seed(3)
    theirs = parity_lightly.resnet18_backbone().state_dict()
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_split_batchnorm_backbone_is_saved_as_the_torchvision_network_it_evaluates_as():
    pytest.importorskip("lightly")
    from functools import partial

    import parity_lightly
    from lightly.models.batchnorm import SplitBatchNorm

    torch.manual_seed(0)
    split = parity_lightly.resnet18_backbone(partial(SplitBatchNorm, num_splits=4)).train()
    with torch.no_grad():
        for _ in range(3):  # per-split running statistics that differ between splits
            split(torch.rand(8, 3, 32, 32) * torch.arange(1.0, 9.0).view(8, 1, 1, 1))
    state = parity_lightly.plain_backbone_state(split)
    plain = build_encoder("resnet18")
    plain.load_state_dict(state)  # strict: torchvision's keys and shapes
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(plain.eval()(x), split.eval()(x), atol=1e-5)


def rows(method, medp2x, lightly, se=0.01, speed=(100.0, 100.0)):
    return [
        {"method": method, "implementation": impl, "protocol": "linear", "accuracy": acc,
         "se": se, "img_per_s": ips}
        for impl, acc, ips in (("medp2x", medp2x, speed[0]), ("lightly", lightly, speed[1]))
    ]  # fmt: skip


def test_parity_allows_two_standard_errors_of_the_difference_and_no_slowdown():
    se_diff = 0.01 * 2**0.5
    close = rows("simclr", 0.80 - 1.9 * se_diff, 0.80, speed=(100.0, 100.0))
    far = rows("byol", 0.80 - 2.1 * se_diff, 0.80, speed=(99.0, 100.0))
    verdicts = {v["method"]: v for v in parity.parity_verdicts(close + far, ["simclr", "byol"])}
    assert verdicts["simclr"]["accuracy_ok"] and verdicts["simclr"]["speed_ok"]
    assert not verdicts["byol"]["accuracy_ok"] and not verdicts["byol"]["speed_ok"]


def test_learning_is_measured_against_the_best_random_init():
    table = rows("simclr", 0.75, 0.70) + [
        {"method": "random_init", "implementation": "random", "protocol": "linear",
         "accuracy": acc, "se": 0.01}
        for acc in (0.65, 0.71, 0.68)
    ]  # fmt: skip
    learning = {r["implementation"]: r for r in parity.learning_verdicts(table)}
    assert learning["medp2x"]["margin"] == pytest.approx(0.04)
    assert learning["medp2x"]["learns"] and not learning["lightly"]["learns"]


def test_score_cache_rescores_only_what_changed(tmp_path):
    """A --reuse run re-scores nothing it has scored: same file and probe -> cached; a
    rewritten encoder file or another probe setting -> computed again."""
    encoder = tmp_path / "encoder.pt"
    encoder.write_bytes(b"weights")
    calls = []

    def compute(value):
        calls.append(value)
        return {"linear": value}

    cache = parity.ScoreCache(tmp_path / "scores.json", {"eval_size": 64})
    assert cache.score({"file": str(encoder)}, lambda: compute(0.5)) == {"linear": 0.5}
    reopened = parity.ScoreCache(tmp_path / "scores.json", {"eval_size": 64})
    assert reopened.score({"file": str(encoder)}, lambda: compute(0.9)) == {"linear": 0.5}
    encoder.write_bytes(b"other weights")
    assert reopened.score({"file": str(encoder)}, lambda: compute(0.7)) == {"linear": 0.7}
    other_probe = parity.ScoreCache(tmp_path / "scores.json", {"eval_size": 32})
    assert other_probe.score({"reference": "random", "seed": 0}, lambda: compute(0.1))
    assert calls == [0.5, 0.7, 0.1]


def test_view_options_go_to_the_augmentations_and_the_rest_to_the_recipe():
    assert parity.is_view_option("simclr.view.hue=0.1")
    assert parity.is_view_option("view.brightness=0.4")
    assert not parity.is_view_option("simclr.base_lr=0.12")
    assert not parity.is_view_option("views={}")


def test_lightly_loop_can_take_medp2x_views_of_the_same_recipe():
    """The augmentation ablation (``--lightly-views medp2x``): lightly's loop gets exactly
    medp2x's tiny-recipe views (blur off), ImageNet-normalised as medp2x's engine does."""
    pytest.importorskip("lightly")
    import parity_lightly

    from medp2x.methods import recipe_for
    from medp2x.views import build_views

    images = torch.randint(0, 256, (4, 3, 64, 64), dtype=torch.uint8)
    make = parity_lightly.medp2x_views("simclr", 32, 16, 0, seed=5, device="cpu")
    views = make(images)
    spec = recipe_for("simclr", "tiny", image_size=32).views
    augment = build_views("simclr", "rgb", spec, "cpu", overrides={"blur_p": 0.0})
    expected = augment(images, torch.Generator().manual_seed(6))
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    assert [v.shape for v in views] == [(4, 3, 32, 32)] * 2
    for got, want in zip(views, expected, strict=True):
        torch.testing.assert_close(got, (want - mean) / std)


def test_peer_rows_take_lightly_rows_of_the_same_settings_only(tmp_path):
    """``--peer-csv``: a medp2x-only re-run is compared with lightly's earlier rows of the same
    budget, seed, batch, crop size and dtype, never with other settings or medp2x's old rows."""
    s = parity.Settings(
        budget="long", iterations=1872, schedule_iterations=1872, batch_size=64, crop_size=32,
        source_size=64, small_size=16, n_small=2, amp=False, workers=2, threads=1, seed=1,
        curve_points=6, images=10000,
    )  # fmt: skip
    base = {"budget": "long", "method": "simclr", "implementation": "lightly",
            "protocol": "linear", "accuracy": 0.741, "se": 0.011, "iterations": 1872,
            "batch_size": 64, "crop_size": 32, "dtype": "fp32", "img_per_s": 175.0, "seed": 1}  # fmt: skip
    rows = [
        base,
        {**base, "seed": 0, "accuracy": 0.724},
        {**base, "implementation": "medp2x", "accuracy": 0.703},
        {**base, "method": "byol"},
        {**base, "crop_size": 64},
    ]
    parity.write_csv(rows, tmp_path / "parity_long.csv")
    parity.write_csv([{**base, "iterations": 312}], tmp_path / "parity_long_curve.csv")
    got = parity.peer_rows([str(tmp_path / "parity_long.csv")], s, ["simclr"], curve=False)
    assert [(r["accuracy"], r["seed"], r["img_per_s"]) for r in got] == [(0.741, 1, 175.0)]
    assert got[0]["spread"] is None  # empty cells come back as None, not ""
    medp2x = {**base, "implementation": "medp2x", "accuracy": 0.711, "img_per_s": 361.0}
    (v,) = parity.parity_verdicts([medp2x, *got], ["simclr"])
    assert (
        v["accuracy_ok"] and v["speed_ratio"] is None and v["speed_ok"] is None
    )  # not timed together
    curve = parity.peer_rows([str(tmp_path / "parity_long.csv")], s, ["simclr"], curve=True)
    assert [r["iterations"] for r in curve] == [312]


def test_every_benchmarked_method_has_a_lightly_side_and_a_medp2x_recipe():
    """The default ``--methods`` must all run on both sides (a method added to medp2x alone,
    as DINO was, once made the default run fail at its lightly half)."""
    pytest.importorskip("lightly")
    import parity_lightly

    from medp2x.methods import METHODS as MEDP2X_METHODS

    assert set(parity.METHODS) == set(parity_lightly.METHODS) <= set(MEDP2X_METHODS)


@pytest.mark.parametrize("views", ["lightly", "medp2x"])
def test_lightly_loop_trains_with_either_views(tmp_path, views):
    """``--lightly-views``: two steps of lightly's SimCLR loop on a folder of images, with its
    own transforms and with medp2x's views, each ending in a finite loss and an encoder file."""
    pytest.importorskip("lightly")
    import numpy as np
    import parity_lightly
    from PIL import Image

    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(8):
        Image.fromarray(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    out = tmp_path / "run"
    run = parity_lightly.train(
        "simclr", str(folder), out, iterations=2, schedule_iterations=2, batch_size=4,
        crop_size=16, small_size=8, n_small=0, seed=0, amp=False, workers=0,
        checkpoint_every=0, progress=False, views=views,
    )  # fmt: skip
    assert len(run["diagnostics"]) == 2
    assert all(math.isfinite(d["loss"]) for d in run["diagnostics"])
    assert (out / "encoder.pt").exists()
    with pytest.raises(ValueError, match="views must be"):
        parity_lightly.train(
            "simclr", str(folder), out, iterations=1, schedule_iterations=1, batch_size=4,
            crop_size=16, small_size=8, n_small=0, seed=0, amp=False, workers=0,
            checkpoint_every=0, progress=False, views="kornia",
        )  # fmt: skip
