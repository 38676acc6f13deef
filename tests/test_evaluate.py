"""Downstream evaluation: label draws, protocols, comparison runner, figure, CLI (tiny settings)."""

import csv
import json
import math
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression
from torch import nn

from medp2x import cli
from medp2x.data.npz import NpzDataset
from medp2x.data.split import stratified_split
from medp2x.eval.compare import compare_encoders
from medp2x.eval.convergence import convergence_figure
from medp2x.eval.encoders import checkpoint_progress
from medp2x.eval.protocols.knn import knn_scores
from medp2x.eval.protocols.linear import fit_logistic, linear_probe
from medp2x.eval.report import format_table, write_results
from medp2x.eval.splits import low_label_draws, plan_draws
from medp2x.networks import NormalizedEncoder, build_encoder

SHARED = Path(__file__).resolve().parents[2] / "shared"


# ----------------------------------------------------------------------------- label draws

LABELS = np.array([0] * 50 + [1] * 30 + [2] * 5)


def test_draws_are_stratified_with_at_least_one_per_class():
    for subset in low_label_draws(LABELS, 0.1, draws=3, seed=0):
        # 10% of 50, 30, 5 -> 5, 3, round(0.5) = 0 raised to 1
        assert Counter(LABELS[subset].tolist()) == {0: 5, 1: 3, 2: 1}
        assert len(set(subset.tolist())) == len(subset)


def test_draws_are_reproducible_and_seed_dependent():
    a = low_label_draws(LABELS, 0.2, draws=3, seed=7)
    b = low_label_draws(LABELS, 0.2, draws=3, seed=7)
    c = low_label_draws(LABELS, 0.2, draws=3, seed=8)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c, strict=True))
    assert not np.array_equal(a[0], a[1])  # draws differ from each other


def test_disjoint_draws_share_no_sample_where_possible():
    draws = low_label_draws(LABELS, 0.2, draws=4, seed=3, disjoint=True)
    for i in range(4):
        assert Counter(LABELS[draws[i]].tolist()) == {0: 10, 1: 6, 2: 1}
        for j in range(i + 1, 4):
            assert not set(draws[i]) & set(draws[j])
    # 3 draws of 50% cannot be disjoint: the overlap is then as small as possible
    wrap = low_label_draws(LABELS, 0.5, draws=3, seed=3, disjoint=True)
    class0 = [set(d[LABELS[d] == 0]) for d in wrap]
    assert not class0[0] & class0[1]
    assert len(class0[2] & (class0[0] | class0[1])) == 25


def test_full_fraction_gives_every_sample_and_bad_fractions_are_refused():
    (subset,) = low_label_draws(LABELS, 1.0, draws=1)
    assert np.array_equal(subset, np.arange(len(LABELS)))
    with pytest.raises(ValueError, match="label fraction"):
        low_label_draws(LABELS, 0.0)


def test_stratified_split_holds_out_each_class():
    kept, held = stratified_split(LABELS, 0.2, seed=1)
    assert Counter(LABELS[held].tolist()) == {0: 10, 1: 6, 2: 1}
    assert sorted(np.concatenate([kept, held]).tolist()) == list(range(len(LABELS)))


# ----------------------------------------------------------------------------- protocols


def _clusters(n_per_class: int, classes: int = 3, dim: int = 16, seed: int = 0):
    """Well separated Gaussian clusters around orthogonal directions."""
    g = torch.Generator().manual_seed(seed)
    centers = 5.0 * torch.eye(dim)[:classes]
    y = torch.arange(classes).repeat_interleave(n_per_class)
    x = centers[y] + 0.3 * torch.randn(len(y), dim, generator=g)
    return x, y


def test_knn_votes_are_temperature_weighted_cosine_neighbours():
    train = torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.0, 2.0]])  # cosines to [1, 0]: 1, 0.8, 0
    scores = knn_scores(
        train, torch.tensor([0, 0, 1]), torch.tensor([[3.0, 0.0]]), 2, k=3, temperature=0.5
    )
    w0, w1 = math.exp(1 / 0.5) + math.exp(0.8 / 0.5), math.exp(0.0)
    assert scores[0].tolist() == pytest.approx([w0 / (w0 + w1), w1 / (w0 + w1)])


def test_knn_and_linear_probe_separate_separable_features():
    train, val, test = _clusters(20, seed=0), _clusters(10, seed=1), _clusters(10, seed=2)
    scores = knn_scores(*train, test[0], 3, k=5)
    assert (scores.argmax(1) == test[1]).float().mean().item() == 1.0
    from medp2x.eval.settings import EvalSettings

    metrics, info = linear_probe(train, val, test, 3, EvalSettings())
    assert metrics["accuracy"] == 1.0 and metrics["macro_f1"] == 1.0
    assert info["val_score"] == 1.0


def test_logistic_probe_matches_sklearn():
    # mean cross-entropy + wd/2 |W|^2 is sklearn's objective with C = 1 / (wd * n)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(120, 5, generator=g, dtype=torch.float64)
    y = (x[:, 0] + 0.5 * torch.randn(120, generator=g, dtype=torch.float64) > 0).long()
    y[x[:, 1] > 1.0] = 2
    wd = 0.05
    layer = fit_logistic(x, y, 3, wd, max_iter=500)
    ref = LogisticRegression(C=1 / (wd * len(x)), tol=1e-10, max_iter=5000).fit(
        x.numpy(), y.numpy()
    )
    ours = layer(x).softmax(1).detach().numpy()
    np.testing.assert_allclose(ours, ref.predict_proba(x.numpy()), atol=1e-4)


# ----------------------------------------------------------------------------- comparison run


class SyntheticImages(torch.utils.data.Dataset):
    """Class c = a bright horizontal band at height c on noise: learnable at 32 px in a few
    steps and unchanged by the left-right flips of fine-tuning."""

    def __init__(
        self, n_per_class: int, classes: int = 2, size: int = 32, channels: int = 3, seed=0
    ):
        g = torch.Generator().manual_seed(seed)
        self.labels = np.repeat(np.arange(classes), n_per_class)
        self.images = 0.2 * torch.rand(len(self.labels), channels, size, size, generator=g)
        h = size // classes
        for i, c in enumerate(self.labels):
            self.images[i, :, c * h : (c + 1) * h] += 0.7

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return {"image": self.images[i], "label": int(self.labels[i]), "meta": {}}


class TinyEncoder(nn.Module):
    feature_dim = 8

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(4)
        )
        self.fc = nn.Linear(128, 8)

    def forward(self, x):
        return self.fc(self.net(x).flatten(1))


def test_finetune_learns_and_leaves_the_callers_encoder_untouched():
    torch.manual_seed(0)
    encoder = TinyEncoder()
    before = {k: v.clone() for k, v in encoder.state_dict().items()}
    rows = compare_encoders(
        {"tiny": encoder},
        SyntheticImages(16, classes=4, seed=0),
        SyntheticImages(5, classes=4, seed=1),
        SyntheticImages(5, classes=4, seed=2),
        protocol="finetune",
        epochs=6,
        batch_size=16,
        lr=1e-2,
        progress=False,
        selection="val",
        augment=False,  # the class is a band's height, which random crops move
    )
    assert rows[0]["accuracy"] == 1.0
    assert rows[0]["selected"].startswith("epoch=") and rows[0]["val_score"] == 1.0
    assert rows[0]["n_select"] == 20 and "outside the label budget" in rows[0]["val_source"]
    for k, v in encoder.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_one_settings_object_or_keyword_changes_run_the_same_evaluation():
    from medp2x.eval.settings import EvalSettings

    def tiny() -> dict:
        torch.manual_seed(0)
        return {"tiny": TinyEncoder()}

    train, test = SyntheticImages(8, seed=0), SyntheticImages(4, seed=1)
    settings = EvalSettings(
        protocol=["knn", "linear"], draws=2, label_fraction=0.5, progress=False, bootstrap=0
    )
    by_object = compare_encoders(tiny(), train, test, settings=settings)
    by_keyword = compare_encoders(
        tiny(), train, test,
        protocol=["knn", "linear"], draws=2, label_fraction=0.5, progress=False, bootstrap=0,
    )  # fmt: skip
    assert len(by_object) == 4  # 2 protocols x 2 draws
    for a, b in zip(by_object, by_keyword, strict=True):
        assert (a["protocol"], a["draw"], a["n_train"]) == (b["protocol"], b["draw"], b["n_train"])
        assert a["accuracy"] == b["accuracy"] and a["selected"] == b["selected"]
    changed = compare_encoders(tiny(), train, test, settings=settings, draws=1)
    assert len(changed) == 2  # a keyword change on top of the object
    with pytest.raises(TypeError, match="label_fracton"):
        compare_encoders(tiny(), train, test, label_fracton=0.5)
    with pytest.raises(ValueError, match="unknown protocol"):
        EvalSettings(protocol="svm")


def test_default_finetune_trains_fixed_epochs_and_tests_the_final_model():
    torch.manual_seed(0)
    (row,) = compare_encoders(
        {"tiny": TinyEncoder()},
        SyntheticImages(8, seed=0),
        SyntheticImages(4, seed=1),
        SyntheticImages(4, seed=2),  # given, but the paper's protocol selects on nothing
        protocol="finetune",
        epochs=2,
        batch_size=8,
        progress=False,
    )
    assert row["selection"] == "none" and row["selected"] == "epoch=2/2 (fixed)"
    assert row["n_train"] == 16 and row["n_select"] == 0 and math.isnan(row["val_score"])


def test_tiny_comparison_writes_tables(tmp_path):
    torch.manual_seed(0)
    encoders = {"Tiny": TinyEncoder(), "random": "random"}  # a module and a resnet18 by name
    rows = compare_encoders(
        encoders,
        SyntheticImages(6, seed=0),
        SyntheticImages(4, seed=1),
        protocol=["finetune", "linear", "knn"],
        label_fraction=0.5,
        draws=2,
        epochs=1,
        batch_size=8,
        progress=False,
    )
    # half of each class (3 of 6) per draw, all of it trained on: no selection by default
    assert len(rows) == 2 * 3 * 2
    assert {r["n_train"] for r in rows} == {6} and {r["n_select"] for r in rows} == {0}
    assert rows[0]["val_source"].startswith("none")
    for r in rows:
        for m in ("accuracy", "balanced_accuracy", "macro_f1", "auroc"):
            assert 0.0 <= r[m] <= 1.0
    md, csv_path = write_results(rows, tmp_path)
    text = md.read_text()
    assert "| Tiny" in text and "± " in text and "## Per draw" in text
    assert "## Paired differences" in text and "Tiny − random" in text  # "random" is the reference
    assert (tmp_path / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with csv_path.open() as f:
        table = list(csv.DictReader(f))
    assert len(table) == 12
    assert {(r["encoder"], r["protocol"], r["draw"]) for r in table} == {
        (e, p, str(d)) for e in encoders for p in ("finetune", "linear", "knn") for d in (0, 1)
    }
    acc = [r["accuracy"] for r in rows if r["encoder"] == "Tiny" and r["protocol"] == "knn"]
    line = next(ln for ln in format_table(rows).splitlines() if "| Tiny" in ln and "knn" in ln)
    assert f"{100 * np.mean(acc):.1f} ± {100 * np.std(acc, ddof=1):.1f}" in line


# ----------------------------------------------------------------------------- label budget


class TrackedImages(SyntheticImages):
    """Records which samples were read: what a protocol learned or selected from (labels are
    read from ``.labels`` without touching samples)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.read = set()

    def __getitem__(self, i):
        self.read.add(int(i))
        return super().__getitem__(i)


def _assert_within_budget(train: TrackedImages, fraction: float):
    """The samples read are ``fraction`` of each class, give or take one image."""
    read = np.array(sorted(train.read))
    for c in np.unique(train.labels):
        n_class = int((train.labels == c).sum())
        assert abs(int((train.labels[read] == c).sum()) - fraction * n_class) <= 1, c


def test_a_ten_percent_draw_learns_and_selects_from_ten_percent_of_the_labels():
    # the union of what fine-tuning and the probe train and select on is the 10% draw; the
    # old protocol carved a validation set from the whole training set: 19% of the labels
    torch.manual_seed(0)
    train = TrackedImages(30, classes=2, size=16, seed=0)
    compare_encoders(
        {"tiny": TinyEncoder()},
        train,
        SyntheticImages(4, classes=2, size=16, seed=1),
        protocol=["finetune", "linear"],
        label_fraction=0.1,
        draws=1,
        epochs=1,
        batch_size=8,
        progress=False,
    )
    assert len(train.read) == 6
    _assert_within_budget(train, 0.1)


def test_selection_inside_the_draw_stays_within_the_draw():
    torch.manual_seed(0)
    train = TrackedImages(50, classes=2, size=16, seed=0)
    rows = compare_encoders(
        {"tiny": TinyEncoder()},
        train,
        SyntheticImages(4, classes=2, size=16, seed=1),
        protocol=["finetune", "linear"],
        label_fraction=0.1,
        draws=1,
        epochs=2,
        batch_size=8,
        progress=False,
        selection="draw",
    )
    _assert_within_budget(train, 0.1)
    # 5 labels per class: 1 selects (the epoch, the probe strength), 4 train
    assert {(r["n_train"], r["n_select"]) for r in rows} == {(8, 2)}
    assert rows[0]["selected"].startswith("epoch=") and "fixed" not in rows[0]["selected"]
    for plan in plan_draws(LABELS, 0.2, draws=3, seed=1, selection="draw"):
        draw = np.union1d(plan.fit, plan.select)
        assert not set(plan.fit) & set(plan.select)
        assert Counter(LABELS[draw].tolist()) == {0: 10, 1: 6, 2: 1}  # the 20% draw itself


# ----------------------------------------------------------------------------- image shape


class Recorder(nn.Module):
    """Keeps what it is shown; mean colour as features."""

    feature_dim = 3

    def __init__(self):
        super().__init__()
        self.seen = []

    def forward(self, x):
        self.seen.append(x.detach().clone())
        return x.mean((2, 3))


class Stripes(torch.utils.data.Dataset):
    """32 x 64 images: left quarter white, middle half gray, right quarter black."""

    labels = np.array([0, 1, 0, 1])

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        image = torch.zeros(3, 32, 64)
        image[..., :16], image[..., 16:48] = 1.0, 0.5
        return {"image": image, "label": int(self.labels[i]), "meta": {}}


def test_evaluation_shows_a_centre_crop_not_a_squashed_image():
    recorder = Recorder()
    compare_encoders(
        {"rec": recorder}, Stripes(), Stripes(), protocol="knn", image_size=16, progress=False
    )
    seen = torch.cat(recorder.seen)
    assert seen.shape[-2:] == (16, 16)
    # shorter side 32 -> 16 (the image becomes 16 x 32), then the centre 16 columns: the gray
    # half only. A squash to 16 x 16 would show the white and black quarters too.
    assert seen.min() > 0.4 and seen.max() < 0.6
    torch.testing.assert_close(seen[..., 2:-2], torch.full_like(seen[..., 2:-2], 0.5))


def test_finetuning_view_crops_each_image_to_the_size_whatever_its_shape():
    from medp2x.eval.images import TrainCollate, training_view

    torch.manual_seed(0)
    samples = [
        {"image": torch.rand(3, 20, 50), "label": 0},
        {"image": torch.rand(3, 40, 30), "label": 1},
    ]
    images, labels = TrainCollate(16)(samples)
    assert images.shape == (2, 3, 16, 16) and labels.tolist() == [0, 1]
    # a left-to-right ramp: crops keep its direction, or reverse it when flipped
    ramp = torch.linspace(0, 1, 12).repeat(3, 9, 1)
    rows = [training_view(ramp, 12, crop_scale=0.5)[0, 0] for _ in range(20)]
    assert {bool(r[0] < r[-1]) for r in rows} == {True, False}


# ----------------------------------------------------------------------------- intervals


def test_paired_bootstrap_known_answers():
    from medp2x.eval.paired import paired_bootstrap

    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, 300)
    a = rng.random((3, 300)) < 0.7
    same = paired_bootstrap(a, a, labels, n_boot=500)
    assert all((i.estimate, i.low, i.high) == (0.0, 0.0, 0.0) for i in same.values())
    assert not same["accuracy"].excludes_zero
    right, wrong = np.ones((3, 300), bool), np.zeros((3, 300), bool)
    full = paired_bootstrap(right, wrong, labels, n_boot=500)
    assert all((i.estimate, i.low, i.high) == (1.0, 1.0, 1.0) for i in full.values())
    # A right on 30 images where B is wrong, equal elsewhere: +10 points, interval around it
    b = a.copy()
    b[:, :30] = False
    a[:, :30] = True
    diff = paired_bootstrap(a, b, labels, n_boot=2000, seed=1)["accuracy"]
    assert diff.estimate == pytest.approx(0.1) and 0.0 < diff.low < 0.1 < diff.high < 0.2
    assert diff.excludes_zero
    # balanced accuracy: A right on all of class 0 only, B never right -> 1/3 per draw
    only0 = np.broadcast_to(labels == 0, (3, 300))
    assert paired_bootstrap(only0, wrong, labels)["balanced_accuracy"].estimate == pytest.approx(
        1 / 3
    )


def test_differences_are_paired_reproducible_and_in_the_csv(tmp_path):
    train, test = SyntheticImages(10, size=16, seed=0), SyntheticImages(10, size=16, seed=1)
    test.images = torch.rand(test.images.shape, generator=torch.Generator().manual_seed(0))

    def run(seed):  # noise test images: near-chance scores that differ between encoders
        torch.manual_seed(0)
        return compare_encoders(
            {"A": TinyEncoder(), "B": TinyEncoder()},
            train,
            test,
            protocol="knn",
            label_fraction=0.5,
            draws=2,
            seed=seed,
            progress=False,
            reference="B",
            bootstrap=300,
        )

    first, again, other = run(0), run(0), run(1)

    def numbers(rows):
        """Everything but the timing; NaN as text so that equal rows compare equal."""
        nan = lambda v: isinstance(v, float) and math.isnan(v)  # noqa: E731
        return [{k: "nan" if nan(v) else v for k, v in r.items() if k != "seconds"} for r in rows]

    assert numbers(first) == numbers(again)  # same seed, same numbers
    low = "accuracy_diff_vs_B_low"
    assert [r.get(low) for r in first] != [r.get(low) for r in other]
    rows_a = [r for r in first if r["encoder"] == "A" and r["protocol"] == "knn"]
    rows_b = [r for r in first if r["encoder"] == "B" and r["protocol"] == "knn"]
    expected = np.mean(
        [ra["accuracy"] - rb["accuracy"] for ra, rb in zip(rows_a, rows_b, strict=True)]
    )
    assert rows_a[0]["accuracy_diff_vs_B"] == pytest.approx(expected)
    assert rows_a[0]["accuracy_diff_vs_B_low"] <= expected <= rows_a[0]["accuracy_diff_vs_B_high"]
    assert "accuracy_diff_vs_B" not in rows_b[0]  # no difference of B against itself
    _, csv_path = write_results(first, tmp_path)
    with csv_path.open() as f:
        table = list(csv.DictReader(f))
    for col in (
        "accuracy_diff_vs_B",
        "accuracy_diff_vs_B_low",
        "accuracy_diff_vs_B_high",
        "accuracy_diff_vs_B_excludes_0",
        "balanced_accuracy_diff_vs_B",
        "accuracy_low",
    ):
        assert col in table[0], col
    text = (tmp_path / "results.md").read_text()
    assert "A − B" in text and "Intervals" in text and "seeds 0, 1" in text


def _save_engine_checkpoint(path: Path, encoder: nn.Module, iteration: int, epoch_length: int):
    """The layout the engine writes through Ignite's Checkpoint (see interfaces.md)."""
    model = {f"encoder.{k}": v for k, v in encoder.state_dict().items()}
    model["projector.0.weight"] = torch.zeros(2, 2)
    trainer = {"epoch_length": epoch_length, "iteration": iteration, "max_epochs": 10}
    torch.save({"model": model, "trainer": trainer, "meta": {"arch": "resnet18"}}, path)


def test_checkpoint_progress_reads_trainer_state_or_file_name(tmp_path):
    _save_engine_checkpoint(tmp_path / "checkpoint_30.pt", TinyEncoder(), 30, 10)
    assert checkpoint_progress(tmp_path / "checkpoint_30.pt") == {"iteration": 30, "epoch": 3.0}
    torch.save({"model": {}}, tmp_path / "checkpoint_1200.pt")
    assert checkpoint_progress(tmp_path / "checkpoint_1200.pt") == {
        "iteration": 1200,
        "epoch": None,
    }


def test_convergence_figure_plots_each_series(tmp_path):
    torch.manual_seed(0)
    for run in ("p1x", "p2x"):
        (tmp_path / run / "checkpoints").mkdir(parents=True)
        for epoch in (1, 2, 4):
            _save_engine_checkpoint(
                tmp_path / run / "checkpoints" / f"checkpoint_{5 * epoch}.pt",
                TinyEncoder(),
                5 * epoch,
                5,
            )

    def load(path):
        encoder = TinyEncoder()
        model = torch.load(path, weights_only=True)["model"]
        encoder.load_state_dict({k[8:]: v for k, v in model.items() if k.startswith("encoder.")})
        return encoder

    png, csv_path, rows = convergence_figure(
        {"P1X": tmp_path / "p1x", "P2X": tmp_path / "p2x"},
        SyntheticImages(6, seed=0),
        SyntheticImages(4, seed=1),
        tmp_path / "fig" / "convergence.png",
        protocol="knn",
        load=load,
        progress=False,
    )
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with csv_path.open() as f:
        points = list(csv.DictReader(f))
    assert [(p["series"], float(p["x"])) for p in points] == [
        (s, e) for s in ("P1X", "P2X") for e in (1.0, 2.0, 4.0)
    ]
    for p, r in zip(points, rows, strict=True):
        assert float(p["y"]) == pytest.approx(100 * r["accuracy"])


# ----------------------------------------------------------------------------- npz + CLI


def _write_npz(path: Path, n: int = 10, size: int = 28):
    """A MedMNIST-like gray two-class set: class 1 brighter."""
    rng = np.random.default_rng(0)
    arrays = {}
    for split, count in (("train", n), ("val", n // 2), ("test", n // 2)):
        labels = np.repeat([0, 1], count)
        images = rng.integers(0, 100, (2 * count, size, size)) + 120 * labels[:, None, None]
        arrays[f"{split}_images"] = images.astype(np.uint8)
        arrays[f"{split}_labels"] = labels[:, None].astype(np.uint8)
    np.savez(path, **arrays)


def test_npz_dataset_meets_the_sample_contract(tmp_path):
    _write_npz(tmp_path / "set.npz")
    ds = NpzDataset(tmp_path / "set.npz", "val", image_size=32)
    item = ds[7]
    assert item["image"].shape == (1, 32, 32) and item["image"].dtype == torch.float32
    assert 0.0 <= item["image"].min() and item["image"].max() <= 1.0
    assert item["label"] == 1 and len(ds) == 10 and ds.labels.tolist() == [0] * 5 + [1] * 5
    raw = np.load(tmp_path / "set.npz")["val_images"][7]
    assert NpzDataset(tmp_path / "set.npz", "val")[7]["image"][0].numpy() == pytest.approx(
        raw / 255
    )


def test_npz_dataset_refuses_bad_files(tmp_path):
    np.savez(
        tmp_path / "vol.npz",
        train_images=np.zeros((2, 8, 8, 8), np.uint8),
        train_labels=np.zeros((2, 1)),
    )
    with pytest.raises(ValueError, match="vol.npz.*not 2-D"):
        NpzDataset(tmp_path / "vol.npz")
    with pytest.raises(ValueError, match="vol.npz.*no test_images"):
        NpzDataset(tmp_path / "vol.npz", "test")


def test_cli_on_npz(tmp_path, capsys):
    _write_npz(tmp_path / "set.npz")
    out = tmp_path / "out"
    argv = [
        "evaluate",
        "--data",
        str(tmp_path / "set.npz"),
        "--encoder",
        "random",
        "--name",
        "Random",
        "--encoder",
        "colour_histogram",  # a low-level reference by name, as in the README
    ]
    argv += ["--protocol", "knn", "--protocol", "linear", "--label-fraction", "--image-size", "32"]
    argv += ["--out", str(out), "--no-progress"]
    assert cli.main(argv) == 0
    with (out / "results.csv").open() as f:
        table = list(csv.DictReader(f))
    # --label-fraction alone: 10% (1 per class of 10) x 3 draws, given val/test splits
    assert len(table) == 2 * 2 * 3
    assert {r["n_train"] for r in table} == {"2"} and {r["n_test"] for r in table} == {"10"}
    assert {r["encoder"] for r in table} == {"Random", "colour_histogram"}
    assert "| Random" in capsys.readouterr().out


def test_cli_reports_a_missing_encoder(tmp_path, capsys):
    _write_npz(tmp_path / "set.npz")
    argv = ["evaluate", "--data", str(tmp_path / "set.npz"), "--encoder", str(tmp_path / "no.pt")]
    assert cli.main([*argv, "--out", str(tmp_path / "o")]) == 2
    assert "no.pt" in capsys.readouterr().err


def test_cli_on_image_folder(tmp_path):
    pytest.importorskip("medp2x.data.folder")
    from PIL import Image

    rng = np.random.default_rng(0)
    for c, (name, base) in enumerate((("dark", 20), ("bright", 180))):
        (tmp_path / "data" / name).mkdir(parents=True)
        for i in range(8):
            pixels = rng.integers(0, 60, (24, 24, 3)) + base
            Image.fromarray(pixels.astype(np.uint8)).save(tmp_path / "data" / name / f"{c}_{i}.png")
    out = tmp_path / "out"
    argv = [
        "evaluate",
        "--data",
        str(tmp_path / "data"),
        "--encoder",
        "random",
        "--protocol",
        "knn",
    ]
    argv += ["--test-fraction", "0.25", "--image-size", "32", "--out", str(out), "--no-progress"]
    assert cli.main(argv) == 0
    with (out / "results.csv").open() as f:
        (row,) = list(csv.DictReader(f))
    # per class: 2 of 8 held out for test (the fixed split), all the other 6 trained on
    assert row["n_test"] == "4" and row["n_select"] == "0" and row["n_train"] == "12"


def test_path_encoder_loads_through_checkpoints(tmp_path):
    pytest.importorskip("medp2x.checkpoints")
    from medp2x.eval.encoders import resolve_encoder
    from medp2x.networks import IMAGENET_MEAN, IMAGENET_STD

    torch.manual_seed(0)
    reference = build_encoder("resnet18").eval()
    torch.save(reference.state_dict(), tmp_path / "enc.pth")
    loaded = resolve_encoder(tmp_path / "enc.pth", normalization="imagenet").eval()
    x = torch.rand(2, 3, 32, 32)
    expected = NormalizedEncoder(reference, IMAGENET_MEAN, IMAGENET_STD)(x)
    torch.testing.assert_close(loaded(x), expected)


@pytest.mark.skipif(not (SHARED / "data" / "medmnist").is_dir(), reason="../shared/data absent")
def test_real_pneumoniamnist_knn_beats_chance():
    path = SHARED / "data" / "medmnist" / "pneumoniamnist_official.npz"
    train, test = NpzDataset(path, "train"), NpzDataset(path, "test")
    rows = compare_encoders(
        {"random": "random"},
        torch.utils.data.Subset(train, list(range(0, len(train), 20))),
        torch.utils.data.Subset(test, list(range(0, len(test), 4))),
        protocol="knn",
        image_size=32,
        progress=False,
    )
    assert rows[0]["auroc"] > 0.6


def test_monai_bundle_runs_the_evaluation(tmp_path):
    from monai.bundle import ConfigParser

    _write_npz(tmp_path / "set.npz")
    config = {
        "evaluate": {
            "_target_": "medp2x.eval.run.run_evaluation",
            "data": str(tmp_path / "set.npz"),
            "encoders": {"Random": "random"},
            "out_dir": str(tmp_path / "bundle_out"),
            "protocol": "knn",
            "image_size": 32,
            "progress": False,
        }
    }
    parser = ConfigParser(config)
    rows = parser.get_parsed_content("evaluate")
    assert [r["encoder"] for r in rows] == ["Random"]
    assert (tmp_path / "bundle_out" / "results.md").is_file()


def test_load_run_encoder_reads_engine_checkpoints_with_run_settings(tmp_path):
    from medp2x.eval.encoders import resolve_encoder as load_run_encoder

    torch.manual_seed(0)
    reference = build_encoder("resnet18", in_channels=1).eval()
    (tmp_path / "checkpoints").mkdir()
    path = tmp_path / "checkpoints" / "checkpoint_10.pt"
    _save_engine_checkpoint(path, reference, 10, 5)
    ckpt = torch.load(path, weights_only=True)
    ckpt["trainer"]["rng_states"] = {"numpy": np.arange(4, dtype=np.uint32)}  # as the engine does
    del ckpt["meta"]  # the engine keeps its header in run_config.json
    torch.save(ckpt, path)
    header = {"arch": "resnet18", "in_channels": 1, "normalization": {"mean": [0.4], "std": [0.2]}}
    (tmp_path / "run_config.json").write_text(json.dumps({"meta": header}))
    loaded = load_run_encoder(path).eval()
    x = torch.rand(2, 1, 32, 32)
    torch.testing.assert_close(loaded(x), reference((x - 0.4) / 0.2))
    assert checkpoint_progress(path) == {"iteration": 10, "epoch": 2.0}
