"""The paper's ten datasets: registry readers on files in each documented layout, the TFDS reader on
real ArrayRecord data and on ``tfds.testing.mock_data``, and every bundle run in its tiny profile."""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image
from torch.utils.data import Subset

from medp2x.data import paper
from medp2x.data.paper import DATASETS, dataset_factory, eval_data_factory
from medp2x.eval.splits import dataset_labels

REPO = Path(__file__).resolve().parents[1]
BUNDLES = REPO / "bundles"
PAPER_ORDER = [
    "histo",
    "xray",
    "mri",
    "us",
    "satellite",
    "sop",
    "food",
    "celeba",
    "cars",
    "aircraft",
]
TFDS_NAMES = ["sop", "food", "celeba", "cars"]
MOCK_EXAMPLES = 40
TINY = {
    "max_iterations": 2,
    "epochs": 1,
    "batch_size": 4,
    "image_size": 32,
    "eval_epochs": 1,
    "eval_protocol": "knn",
}


# ----------------------------------------------------------------------------- tiny files


def save_image(
    path: Path, size: int = 40, gray: bool = False, seed: int = 0, fmt: str | None = None
) -> np.ndarray:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (size, size) if gray else (size, size, 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, format=fmt)
    return pixels


def make_chestxray8(root: Path) -> Path:
    for i in range(8):
        # seeds apart from the downstream sets': identical pixels would be the same file to the
        # seen-files check (the bundle would rightly refuse to score on them)
        save_image(root / "images" / f"{i:08d}_000.png", gray=True, seed=1000 + i)
    return root


def make_covid_radiography(root: Path, per_class: int = 5) -> Path:
    for c, name in enumerate(paper.COVID_CLASSES):
        for i in range(per_class):
            save_image(root / name / "images" / f"{name}-{i}.png", gray=True, seed=10 * c + i)
            save_image(root / name / "masks" / f"{name}-{i}.png", gray=True, seed=99)
    return root


def make_bhuvaji(root: Path) -> Path:
    for c, name in enumerate(paper.MRI_CLASSES):
        for i in range(4):
            save_image(root / "Training" / name / f"image({i}).jpg", seed=c * 10 + i)
        if name != "no_tumor":  # a Testing folder missing one class keeps Training's labels
            for i in range(2):
                save_image(root / "Testing" / name / f"image({i}).jpg", seed=c * 10 + i + 5)
    return root


def make_busi(root: Path, per_class: int = 5) -> Path:
    for c, name in enumerate(paper.BUSI_CLASSES):
        for i in range(1, per_class + 1):
            save_image(root / name / f"{name} ({i}).png", gray=True, seed=c * 10 + i)
            save_image(root / name / f"{name} ({i})_mask.png", gray=True, seed=99)
        save_image(root / name / f"{name} (1)_mask_1.png", gray=True, seed=98)
    return root


def make_eurosat(root: Path, per_class: int = 5) -> Path:
    for c, name in enumerate(paper.EUROSAT_CLASSES):
        for i in range(per_class):
            save_image(root / "2750" / name / f"{name}_{i + 1}.jpg", size=32, seed=c * 10 + i)
    return root


AIRCRAFT = {
    "trainval": ["707-320", "A300B4", "F-16A/B"] * 4,
    "test": ["707-320", "A300B4", "F-16A/B"] * 2,
}


def make_fgvc_aircraft(root: Path) -> Path:
    data = root / "fgvc-aircraft-2013b" / "data"
    (data / "images").mkdir(parents=True)
    (data / "variants.txt").write_text("707-320\nA300B4\nF-16A/B\nDC-3\n")
    image_id = 1000000
    for split, variants in AIRCRAFT.items():
        lines = []
        for variant in variants:
            image_id += 1
            save_image(data / "images" / f"{image_id}.jpg", seed=image_id)
            lines.append(f"{image_id} {variant}")
        (data / f"images_variant_{split}.txt").write_text("\n".join(lines) + "\n")
    return root


def make_utkface(root: Path) -> Path:
    for i in range(20):
        age, gender, race = 5 + 4 * i, i % 2, i % 5
        save_image(
            root / "UTKFace" / f"{age}_{gender}_{race}_2017011617452{i:04d}.jpg.chip.jpg", seed=i
        )
    save_image(root / "UTKFace" / "39_1_20170116174525125.jpg.chip.jpg", seed=50)  # no race field
    return root / "UTKFace"


def make_pcam(root: Path, n: int = 8) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    import h5py

    root.mkdir(parents=True, exist_ok=True)
    arrays = {}
    for k, split in enumerate(("train", "test")):
        x = np.random.default_rng(k).integers(0, 256, (n, 96, 96, 3), dtype=np.uint8)
        y = (np.arange(n) % 2).astype(np.uint8).reshape(n, 1, 1, 1)
        with h5py.File(root / f"camelyonpatch_level_2_split_{split}_x.h5", "w") as f:
            f.create_dataset("x", data=x, compression="gzip")
        with h5py.File(root / f"camelyonpatch_level_2_split_{split}_y.h5", "w") as f:
            f.create_dataset("y", data=y)
        arrays[split] = (x, y)
    return arrays


def make_slide(root: Path) -> Path:
    from medp2x.demo import write_demo_slide

    write_demo_slide(root)
    return root


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, dict[str, str]]:
    """Per benchmark, the data overrides its bundles get (TFDS ones: an empty data dir, mocked)."""
    base = tmp_path_factory.mktemp("benchmarks")
    tfds_dir = base / "tfds"
    tfds_dir.mkdir()
    make_pcam(base / "pcam")
    return {
        "histo": {
            "data_dir": str(make_slide(base / "slides")),
            "downstream_dir": str(base / "pcam"),
        },
        "xray": {
            "data_dir": str(make_chestxray8(base / "chestxray8")),
            "downstream_dir": str(
                make_covid_radiography(base / "covid" / "COVID-19_Radiography_Dataset").parent
            ),
        },
        "mri": {"data_dir": str(make_bhuvaji(base / "mri"))},
        "us": {"data_dir": str(make_busi(base / "busi" / "Dataset_BUSI_with_GT").parent)},
        "satellite": {"data_dir": str(make_eurosat(base / "eurosat"))},
        "aircraft": {"data_dir": str(make_fgvc_aircraft(base / "aircraft"))},
        "celeba": {"data_dir": str(tfds_dir), "downstream_dir": str(make_utkface(base / "utk"))},
        **{name: {"data_dir": str(tfds_dir)} for name in ("sop", "food", "cars")},
    }


@pytest.fixture(scope="module")
def ssl_checkpoint(tmp_path_factory) -> Path:
    """A first stage as users download it: a plain torchvision resnet18 state dict without fc."""
    torch.manual_seed(0)
    state = {
        k: v
        for k, v in torchvision.models.resnet18().state_dict().items()
        if not k.startswith("fc.")
    }
    path = tmp_path_factory.mktemp("stage1") / "resnet18_ssl.pth"
    torch.save(state, path)
    return path


@pytest.fixture
def mock_tfds():
    import tensorflow_datasets as tfds

    with tfds.testing.mock_data(
        num_examples=MOCK_EXAMPLES, policy=tfds.testing.MockPolicy.USE_CODE
    ):
        yield


# ----------------------------------------------------------------------------- registry


def test_registry_names_the_papers_ten_benchmarks_with_both_bundles():
    assert list(DATASETS) == PAPER_ORDER
    for name, bench in DATASETS.items():
        assert bench.modality in ("rgb", "gray")
        assert (
            bench.pretraining.obtain and bench.pretraining.layout and bench.downstream_data.obtain
        )
        p1x, p2x = (json.loads((BUNDLES / f"{s}_{name}.json").read_text()) for s in ("p1x", "p2x"))
        assert (p1x["schedule"], p2x["schedule"]) == ("p1x", "p2x")
        differing = (p1x.keys() ^ p2x.keys()) | {
            k for k in p1x.keys() & p2x.keys() if p1x[k] != p2x[k]
        }
        assert differing <= {"schedule", "train"}, (name, differing)
        # P1X = P2X without the weight-surgery handler (its first stage is the schedule's)
        p2x["train"]["handlers"][0]["_disabled_"] = True
        assert p1x["train"] == p2x["train"], name
        if name != "histo":  # Histo's bundles default to the demo slide
            assert p2x["data_dir"] == bench.default_data_dir
            assert p2x["benchmark"] == name
    assert {b.name for b in DATASETS.values() if b.modality == "gray"} == {"xray", "mri", "us"}
    assert {b.name for b in DATASETS.values() if b.pretraining.reader == "tfds"} == set(TFDS_NAMES)


def test_every_bundle_defines_what_its_job_references():
    for path in sorted(BUNDLES.glob("p[12]x_*.json")):
        bundle = json.loads(path.read_text())
        wanted = {
            value[1:].split("#")[0]
            for value in bundle["job"].values()
            if isinstance(value, str) and value.startswith("@")
        }
        missing = wanted - set(bundle)
        assert not missing, f"{path.name} lacks {sorted(missing)} (its job refers to them)"


def test_every_bundle_exposes_the_one_override_knobs():
    for path in sorted(BUNDLES.glob("p[12]x_*.json")):
        bundle = json.loads(path.read_text())
        for key in (
            "method",
            "profile",
            "batch_size",
            "image_size",
            "epochs",
            "data_dir",
            "output_dir",
        ):
            assert key in bundle, f"{path.name} lacks the top-level override {key!r}"


def test_unknown_benchmark_and_option_are_clear_errors():
    with pytest.raises(ValueError, match="choose from histo, xray"):
        paper.get("imagenet")
    with pytest.raises(ValueError, match="unknown option"):
        dataset_factory("food", resolution=128)


# ----------------------------------------------------------------------------- medical layouts


def test_busi_drops_masks_and_pretraining_never_sees_the_test_split(tmp_path):
    root = make_busi(tmp_path / "Dataset_BUSI_with_GT")
    pretraining = dataset_factory("us")(tmp_path, 32)
    train, test = eval_data_factory("us", data_dir=tmp_path)()
    files = lambda ds: {Path(ds.dataset.items[i][0]).name for i in ds.indices}  # noqa: E731
    assert not any("_mask" in f for f in files(train) | files(test))
    assert len(train) + len(test) == 15 and len(test) == 3  # 20% of 5 per class
    assert files(pretraining) == files(train) and not files(pretraining) & files(test)
    assert sorted(dataset_labels(test)) == [0, 1, 2]
    sample = pretraining[0]
    assert sample["image"].shape == (1, 32, 32) and sample["image"].dtype == torch.float32
    assert root.is_dir()


def test_covid_radiography_reads_four_classes_without_masks(tmp_path):
    make_covid_radiography(tmp_path / "COVID-19_Radiography_Dataset")
    train, test = eval_data_factory("xray", downstream_dir=tmp_path)()
    assert train.dataset.classes == list(paper.COVID_CLASSES)
    paths = [train.dataset.items[i][0] for i in range(len(train.dataset))]
    assert len(paths) == 20 and not any("masks" in p.parts for p in paths)
    assert sorted(dataset_labels(test)) == [0, 1, 2, 3]


def test_mri_testing_split_keeps_trainings_class_indices(tmp_path):
    make_bhuvaji(tmp_path)
    train, test = eval_data_factory("mri", data_dir=tmp_path)()
    assert train.classes == test.classes == list(paper.MRI_CLASSES)
    by_name = {Path(p).parent.name: label for p, label in test.items}
    assert by_name == {"glioma_tumor": 0, "meningioma_tumor": 1, "pituitary_tumor": 3}
    assert len(dataset_factory("mri")(tmp_path, None)) == 16  # Training only


def test_chestxray8_pretraining_reads_unlabelled_grayscale(tmp_path):
    make_chestxray8(tmp_path)
    data = dataset_factory("xray", max_samples=5)(tmp_path, 24)
    assert len(data) == 5
    sample = data[0]
    assert sample["label"] == -1 and sample["image"].shape == (1, 24, 24)


def test_benchmark_pretraining_images_keep_their_shape_capped_at_the_source_size(tmp_path):
    """Pretraining crops come from the image itself (issue #14 item 2): a 90 x 45 radiograph
    read with a source size of 30 keeps its 2:1 aspect (30 x 60) instead of a 30 x 30 squash,
    and EuroSAT's 32 px images are never enlarged to a 64 px source."""
    pixels = np.random.default_rng(0).integers(0, 256, (45, 90), dtype=np.uint8)
    (tmp_path / "xray" / "images").mkdir(parents=True)
    Image.fromarray(pixels).save(tmp_path / "xray" / "images" / "00000001_000.png")
    xray = dataset_factory("xray")(tmp_path / "xray", 30)
    assert tuple(xray[0]["image"].shape) == (1, 30, 60)
    satellite = dataset_factory("satellite")(make_eurosat(tmp_path / "eurosat"), 64)
    assert tuple(satellite[0]["image"].shape) == (3, 32, 32)


def write_dicom(path: Path, pixels: np.ndarray) -> Path:
    """A minimal 16-bit MONOCHROME2 DX file, as an X-ray archive exports it."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = (
        "1.2.840.10008.5.1.4.1.1.1.1",
        generate_uid(),
    )
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = (
        meta.MediaStorageSOPClassUID,
        meta.MediaStorageSOPInstanceUID,
    )
    ds.Modality, (ds.Rows, ds.Columns) = "DX", pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = pixels.astype(np.uint16).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def test_hospital_dicom_and_nifti_folders_use_the_project_readers(tmp_path):
    import nibabel as nib

    from medp2x.data.dicom import DicomDataset
    from medp2x.data.nifti import NiftiSliceDataset

    ramp = (np.arange(32 * 48).reshape(32, 48) * 4095 // (32 * 48 - 1)).astype(np.uint16)
    write_dicom(tmp_path / "xray" / "patient1" / "cr.dcm", ramp)
    xrays = dataset_factory("xray")(tmp_path / "xray", 24)
    assert isinstance(xrays, DicomDataset) and xrays[0]["image"].shape == (
        1,
        24,
        36,
    )  # 32 x 48 kept 2:3
    volume = np.zeros((24, 24, 6), np.float32)
    volume[4:20, 4:20, :] = np.random.default_rng(0).uniform(100, 200, (16, 16, 6))
    (tmp_path / "mri").mkdir()
    nib.save(nib.Nifti1Image(volume, np.eye(4)), tmp_path / "mri" / "t1.nii.gz")
    slices = dataset_factory("mri")(tmp_path / "mri", 24)
    assert isinstance(slices, NiftiSliceDataset) and len(slices) == 6
    assert slices[0]["image"].shape == (1, 24, 24)


def test_eurosat_sample_folder_in_its_published_layout(tmp_path):
    make_eurosat(tmp_path)
    train, test = eval_data_factory("satellite", data_dir=tmp_path)()
    assert train.dataset.classes == list(paper.EUROSAT_CLASSES)
    assert len(test) == 10 and len(train) == 40
    few = dataset_factory("satellite", max_samples=10)(tmp_path, None)
    assert sorted(dataset_labels(few)) == list(range(10))  # evenly spaced: every class stays


def test_aircraft_labels_follow_the_variant_list(tmp_path):
    make_fgvc_aircraft(tmp_path)
    train, test = eval_data_factory("aircraft", data_dir=tmp_path)()
    assert train.classes == sorted(["707-320", "A300B4", "F-16A/B", "DC-3"])
    expected = [train.classes.index(v) for v in AIRCRAFT["test"]]
    assert [label for _, label in test.items] == expected
    assert len(dataset_factory("aircraft")(tmp_path, 32)) == len(AIRCRAFT["trainval"])


def test_utkface_labels_come_from_file_names(tmp_path):
    assert paper.natural.utkface_label(Path("26_1_3_2017.jpg.chip.jpg"), "ethnicity") == 3
    assert paper.natural.utkface_label(Path("26_1_3_2017.jpg.chip.jpg"), "gender") == 1
    ages = [
        paper.natural.utkface_label(Path(f"{a}_0_0_x.jpg"), "age") for a in (1, 9, 10, 59, 60, 101)
    ]
    assert ages == [0, 0, 1, 5, 6, 6]
    assert (
        paper.natural.utkface_label(Path("39_1_20170116174525125.jpg.chip.jpg"), "ethnicity")
        is None
    )
    folder = make_utkface(tmp_path)
    train, test = eval_data_factory("celeba", downstream_dir=folder, target="gender")()
    assert len(train) + len(test) == 20  # the file without a race field is dropped
    labels = np.concatenate([dataset_labels(train), dataset_labels(test)])
    assert sorted(set(labels.tolist())) == [0, 1] and train.dataset.classes == ["male", "female"]


def test_pcam_h5_pixels_and_labels_match_the_files(tmp_path):
    arrays = make_pcam(tmp_path)
    train, test = eval_data_factory("histo", downstream_dir=tmp_path)()
    x, y = arrays["test"]
    assert len(test) == len(x)
    np.testing.assert_array_equal(test.labels, y.reshape(-1))
    sample = test[3]
    np.testing.assert_allclose(sample["image"].permute(1, 2, 0).numpy(), x[3] / 255.0, atol=1e-6)
    assert sample["label"] == int(y[3].item())


def test_missing_data_names_source_and_override(tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        dataset_factory("xray")(tmp_path / "nowhere", 32)
    assert "nihcc.app.box.com" in str(err.value) and "--data_dir" in str(err.value)
    with pytest.raises(FileNotFoundError, match=r"kaggle.*--downstream_dir"):
        eval_data_factory("xray", downstream_dir=tmp_path)()
    assert eval_data_factory("xray", data_dir=tmp_path) is None  # no downstream_dir: no evaluation
    assert "--data_dir" in dataset_factory("food").missing_data_hint


# ----------------------------------------------------------------------------- TFDS


def prepare_tiny_tfds(data_dir: Path) -> dict[str, list[tuple[np.ndarray, int]]]:
    """A real prepared dataset in ArrayRecord, written by TFDS itself (no TensorFlow needed
    when images are given encoded): what ``tfds.data_source`` reads in production."""
    import tensorflow_datasets as tfds

    examples = {
        split: [
            (np.random.default_rng([k, i]).integers(0, 256, (20 + i, 30, 3), dtype=np.uint8), i % 3)
            for i in range(n)
        ]
        for k, (split, n) in enumerate((("train", 6), ("test", 4)))
    }

    class TinyImages(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            features = {
                "image": tfds.features.Image(shape=(None, None, 3)),
                "label": tfds.features.ClassLabel(num_classes=3),
            }
            return tfds.core.DatasetInfo(
                builder=self, features=tfds.features.FeaturesDict(features)
            )

        def _split_generators(self, dl_manager):
            return {split: self._generate_examples(split) for split in examples}

        def _generate_examples(self, split):
            for i, (pixels, label) in enumerate(examples[split]):
                png = io.BytesIO()
                Image.fromarray(pixels).save(png, format="PNG")
                png.seek(0)
                yield i, {"image": png, "label": label}

    TinyImages(data_dir=str(data_dir), file_format="array_record").download_and_prepare()
    return examples


def test_tfds_reader_decodes_prepared_array_records_without_tensorflow(tmp_path):
    from medp2x.data.tfds import TFDSDataset

    examples = prepare_tiny_tfds(tmp_path)
    assert "tensorflow" not in sys.modules or sys.modules["tensorflow"] is None
    test = TFDSDataset("tiny_images", "test", tmp_path)
    assert len(test) == 4
    by_height = {pixels.shape[0]: (pixels, label) for pixels, label in examples["test"]}
    for i in range(len(test)):  # TFDS shuffles records when it prepares them
        sample = test[i]
        pixels, label = by_height.pop(sample["image"].shape[1])
        assert sample["label"] == label
        np.testing.assert_allclose(
            sample["image"].permute(1, 2, 0).numpy(), pixels / 255.0, atol=1e-6
        )
    assert not by_height
    small = TFDSDataset(
        "tiny_images", "train", tmp_path, label_key=None, image_size=16, max_samples=2
    )
    assert len(small) == 2 and small[1]["label"] == -1 and small[1]["image"].shape == (3, 16, 16)
    with pytest.raises(IndexError):
        small[2]


def test_tfds_missing_dataset_says_how_to_prepare_it(tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        dataset_factory("food")(tmp_path, 32)
    message = str(err.value)
    assert f"food101 is not prepared in {tmp_path}" in message
    assert "file_format='array_record'" in message and "--data_dir" in message
    assert not any(tmp_path.iterdir())  # nothing was downloaded or created


@pytest.mark.parametrize("name", TFDS_NAMES)
def test_tfds_benchmarks_read_mocked_splits(name, tmp_path, mock_tfds):
    bench = DATASETS[name]
    pretraining = dataset_factory(name, max_samples=5)(tmp_path, 24)
    assert len(pretraining) == 5
    sample = pretraining[0]
    assert sample["image"].shape == (3, 24, 24) and sample["label"] == -1
    factory = eval_data_factory(name, downstream_dir=None, data_dir=tmp_path)
    if bench.same_set:
        train, test = factory()
        labels = dataset_labels(test)
        assert len(test) == MOCK_EXAMPLES and labels.min() >= 0 and labels.max() < bench.num_classes
    else:
        assert factory is None  # CelebA's downstream task is UTKFace


# ----------------------------------------------------------------------------- bundles


def run_bundle(bundle: str, **overrides) -> None:
    from monai.bundle import run

    run(config_file=str(BUNDLES / bundle), **overrides)


def results(out: Path) -> list[dict]:
    return list(csv.DictReader((out / "evaluation" / "results.csv").read_text().splitlines()))


EXPECTED_TEST_SIZE = {
    "histo": 8, "xray": 4, "mri": 6, "us": 3, "satellite": 10, "aircraft": 6,
    "sop": MOCK_EXAMPLES, "food": MOCK_EXAMPLES, "cars": MOCK_EXAMPLES, "celeba": 5,
}  # fmt: skip


@pytest.mark.parametrize("schedule", ["p1x", "p2x"])
@pytest.mark.parametrize("name", PAPER_ORDER)
def test_bundle_runs_tiny(name, schedule, data, ssl_checkpoint, tmp_path, monkeypatch):
    import tensorflow_datasets as tfds

    monkeypatch.chdir(REPO)  # bundles paste configs/ by relative path, as users run them
    out = tmp_path / "run"
    overrides = {**TINY, **data[name], "output_dir": str(out)}
    if schedule == "p2x":
        overrides["ssl_checkpoint"] = str(ssl_checkpoint)
    with tfds.testing.mock_data(
        num_examples=MOCK_EXAMPLES, policy=tfds.testing.MockPolicy.USE_CODE
    ):
        run_bundle(f"{schedule}_{name}.json", **overrides)
    assert (out / schedule / "encoder.pt").is_file()
    rows = results(out)
    encoders = {row["encoder"] for row in rows}
    assert encoders == (
        {"Random", "P1X"} if schedule == "p1x" else {"Random", "First stage", "P2X"}
    )
    assert {int(row["n_test"]) for row in rows} == {EXPECTED_TEST_SIZE[name]}


def test_evaluate_bundle_compares_encoders_on_a_benchmark(
    data, ssl_checkpoint, tmp_path, monkeypatch
):
    monkeypatch.chdir(REPO)
    out = tmp_path / "eval"
    run_bundle(
        "evaluate.json", benchmark="us", encoder={"SSL": str(ssl_checkpoint)}, output_dir=str(out),
        data_dir=data["us"]["data_dir"], arch="resnet18", image_size=32, epochs=1, protocol="knn",
    )  # fmt: skip
    rows = list(csv.DictReader((out / "results.csv").read_text().splitlines()))
    assert {row["encoder"] for row in rows} == {"SSL", "Random"}
    assert {int(row["n_test"]) for row in rows} == {3}
    assert {row["test_overlap"] for row in rows} == {
        "unknown (no seen_files.json beside the weights)",
        "not pretrained",
    }
    assert "accuracy_diff_vs_Random_low" in rows[0]  # SSL - Random, paired interval
    text = (out / "results.md").read_text()
    assert "US" in text and "SSL − Random" in text and "--benchmark us" in text
    assert "shorter side resized to 32 px" in text and "(seed 0); pretraining uses the rest" in text
    assert (out / "results.png").read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(
        SystemExit, match=r"evaluate xray: error: .*COVID-19 Radiography.*--downstream_dir"
    ):
        run_bundle(
            "evaluate.json", benchmark="xray", encoder=str(ssl_checkpoint), output_dir=str(out)
        )


def test_evaluate_bundle_draws_the_convergence_figure_of_runs(data, tmp_path, monkeypatch):
    """Figs. 2-3: every kept checkpoint of a run evaluated on the benchmark's own test split,
    which the registry's pretraining reader never gave the run (its record says 0 seen)."""
    from medp2x.engine import PretrainConfig, pretrain

    monkeypatch.chdir(REPO)
    run = tmp_path / "p1x"
    pretrain(
        PretrainConfig(
            dataset=dataset_factory("satellite")(data["satellite"]["data_dir"], 32),
            output_dir=run, arch="resnet18", image_size=32, batch_size=4, epochs=1,
            max_iterations=2, checkpoint_every=1, n_saved=None, progress=False,
        )
    )  # fmt: skip
    out = tmp_path / "fig"
    run_bundle(
        "evaluate.json", benchmark="satellite", data_dir=data["satellite"]["data_dir"],
        series={"P1X": str(run)}, x="iteration", protocol="knn", image_size=32,
        output_dir=str(out),
    )  # fmt: skip
    points = list(csv.DictReader((out / "convergence.csv").read_text().splitlines()))
    assert [float(p["x"]) for p in points] == [1.0, 2.0]
    text = (out / "convergence_results.md").read_text()
    assert "P1X @ iteration 1: saw 0 of 10 test images" in text
    assert "--series \"{'P1X': " in text  # the command that reproduces it
    assert (out / "convergence.png").read_bytes()[:4] == b"\x89PNG"


def test_bundle_without_prepared_tfds_data_is_one_clear_error(tmp_path):
    cmd = [
        sys.executable, "-m", "monai.bundle", "run", "--config_file", "bundles/p1x_cars.json",
        "--data_dir", str(tmp_path), "--output_dir", str(tmp_path / "out"),
    ]  # fmt: skip
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert f"p1x_cars: error: cars196 is not prepared in {tmp_path}" in result.stderr
    assert "--data_dir" in result.stderr and "Traceback" not in result.stderr


def test_shared_eurosat_sample_reads_as_the_satellite_benchmark(shared_data):
    folder = shared_data / "eurosat_rgb"
    if not folder.is_dir():
        pytest.skip(f"{folder} not found")
    train, test = eval_data_factory("satellite", data_dir=folder)()
    assert len(train) + len(test) == 3000 and len(test) == 600
    assert isinstance(train, Subset) and train.dataset.classes == list(paper.EUROSAT_CLASSES)
    sample = train[0]
    assert sample["image"].shape == (3, 64, 64)
