"""No test image is ever pretrained on: the test split belongs to the dataset (not to the
evaluation seed), every pretraining run records the content hashes of what it read, and
``medp2x evaluate`` refuses an encoder whose run saw a test image."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import Subset

from medp2x import cli
from medp2x.data import paper
from medp2x.data.folder import ImageFolderDataset
from medp2x.eval import run as evaluation
from medp2x.eval.leakage import check_test_overlap
from medp2x.networks import build_encoder


def make_eurosat(root: Path, per_class: int = 5, size: int = 12) -> Path:
    """A tiny EuroSAT-layout folder: the ten class folders, distinct random JPEG-free PNGs."""
    rng = np.random.default_rng(0)
    for name in paper.EUROSAT_CLASSES:
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / name / f"{name}_{i}.png")
    return root


def test_held_out_test_split_is_the_datasets_not_the_seeds(tmp_path, monkeypatch):
    # before: the held-out split of `medp2x evaluate --data folder` followed --seed, so with
    # seeds 1 and 2 most test images were among those pretraining (which excludes the
    # registry's fixed split) had seen
    data = make_eurosat(tmp_path / "eurosat")
    seen_tests = []
    real = evaluation.compare_encoders

    def spy(encoders, train, test, *args, **kwargs):
        seen_tests.append(sorted(str(test.dataset.items[i][0]) for i in test.indices))
        return real(encoders, train, test, *args, **kwargs)

    monkeypatch.setattr(evaluation, "compare_encoders", spy)
    for seed in (1, 2):
        evaluation.run_evaluation(
            data, {"Random": "random"}, tmp_path / f"out{seed}", protocol="knn", image_size=8,
            seed=seed, progress=False, arch="resnet18",
        )  # fmt: skip
    _, registry_test = paper.eval_data_factory("satellite", data_dir=data)()
    registry = sorted(str(registry_test.dataset.items[i][0]) for i in registry_test.indices)
    assert seen_tests[0] == seen_tests[1] == registry


def test_record_hashes_file_contents_never_paths(tmp_path):
    from medp2x.provenance import RECORD_NAME, record_seen_files, sample_keys

    data = make_eurosat(tmp_path / "data", per_class=2)
    dataset = ImageFolderDataset(data)
    path = record_seen_files(tmp_path / "run", Subset(dataset, [0, 1, 2]))
    assert path.name == RECORD_NAME
    record = json.loads(path.read_text())
    files = [dataset.items[i][0] for i in (0, 1, 2)]
    assert record["sha256"] == sorted(hashlib.sha256(f.read_bytes()).hexdigest() for f in files)
    assert record["samples"] == 3 and record["unidentified_samples"] == 0
    text = path.read_text()
    assert "AnnualCrop" not in text and str(tmp_path) not in text  # no names, no paths
    # a renamed copy is the same image: same key
    moved = tmp_path / "elsewhere" / "renamed.png"
    moved.parent.mkdir()
    shutil.copy(files[0], moved)
    copy_keys = sample_keys(ImageFolderDataset(moved.parent)).keys
    assert copy_keys == [hashlib.sha256(files[0].read_bytes()).hexdigest()]


def test_npz_images_are_hashed_one_by_one(tmp_path):
    from medp2x.data.npz import NpzDataset
    from medp2x.provenance import sample_keys

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (6, 8, 8), dtype=np.uint8)
    labels = np.array([0, 1, 0, 1, 0, 1])[:, None]
    np.savez(tmp_path / "a.npz", train_images=images, train_labels=labels,
             test_images=images[:2].copy(), test_labels=labels[:2])  # fmt: skip
    train, test = NpzDataset(tmp_path / "a.npz", "train"), NpzDataset(tmp_path / "a.npz", "test")
    train_keys, test_keys = sample_keys(train).keys, sample_keys(test).keys
    assert len(set(train_keys)) == 6 and test_keys == train_keys[:2]  # duplicated content found


def test_pretraining_run_records_what_it_saw(tmp_path):
    from medp2x.engine import PretrainConfig, pretrain
    from medp2x.provenance import sample_keys

    data = make_eurosat(tmp_path / "data", per_class=1, size=32)
    dataset = ImageFolderDataset(data)
    pretrain(
        PretrainConfig(
            dataset=dataset, output_dir=tmp_path / "run", arch="resnet18", image_size=32,
            batch_size=4, epochs=1, max_iterations=1, progress=False,
        )
    )  # fmt: skip
    record = json.loads((tmp_path / "run" / "seen_files.json").read_text())
    assert record["sha256"] == sorted(set(sample_keys(dataset).keys))


def _run_with_record(run: Path, dataset, first_stage: Path | None = None) -> Path:
    """An encoder file in a run folder with its seen-files record, as the engine leaves it."""
    from medp2x.checkpoints import save_encoder
    from medp2x.provenance import record_seen_files

    torch.manual_seed(0)
    encoder = build_encoder("resnet18")
    run.mkdir(parents=True, exist_ok=True)
    save_encoder(run / "encoder.pt", encoder.state_dict(), "resnet18", 3, None)
    record_seen_files(run, dataset, first_stage)
    return run / "encoder.pt"


def test_evaluate_refuses_an_encoder_whose_run_saw_test_images(tmp_path, capsys):
    data = make_eurosat(tmp_path / "data", per_class=5)
    leaky = _run_with_record(tmp_path / "leaky", ImageFolderDataset(data))  # saw everything
    argv = ["evaluate", "--data", str(data), "--encoder", str(leaky), "--encoder", "random",
            "--protocol", "knn", "--image-size", "8", "--no-progress"]  # fmt: skip
    assert cli.main([*argv, "--out", str(tmp_path / "refused")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "saw 10 of the 10 test images" in err[0]  # 1 per class held out
    assert not (tmp_path / "refused" / "results.md").exists()
    out = tmp_path / "allowed"
    assert cli.main([*argv, "--allow-test-overlap", "--out", str(out)]) == 0
    text = (out / "results.md").read_text()
    assert "encoder: saw 10 of 10 test images (scored anyway" in text
    assert "random: not pretrained" in text


def test_clean_run_and_inherited_first_stage(tmp_path):
    from medp2x.provenance import find_record, read_record

    data = make_eurosat(tmp_path / "data", per_class=5)
    pretraining = paper.dataset_factory("satellite")(data, 8)  # the registry's 80 %
    clean = _run_with_record(tmp_path / "clean", pretraining)
    train, test = paper.eval_data_factory("satellite", data_dir=data)()
    overlaps = check_test_overlap({"P2X": clean, "Random": "random"}, test)
    assert overlaps["P2X"].seen == 0 and overlaps["P2X"].test_images == 10
    # a second stage from a first stage that saw the test images inherits them
    first = _run_with_record(tmp_path / "stage1", ImageFolderDataset(data))
    second = _run_with_record(tmp_path / "p2x", pretraining, first_stage=first)
    assert read_record(find_record(second))["first_stage"]["hashes"] == 50
    with pytest.raises(ValueError, match="'P2X': its pretraining run saw 10 of the 10 test"):
        check_test_overlap({"P2X": second}, test)
