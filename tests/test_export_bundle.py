"""``medp2x export-bundle``: the MONAI classification bundle MONAI Label serves (issue #18).

The server itself is exercised by ``make test-label`` (scripts/test_label.py); here: the
bundle's layout and metadata, that its network computes the encoder's features, that its
preprocessing equals medp2x's evaluation view, its DICOM/NIfTI plane policy against medp2x's
own readers, labels, and standalone inference and fine-tuning through ``monai.bundle.run``.
"""

from __future__ import annotations

import csv
import json
import sys
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from medp2x.checkpoints import save_encoder
from medp2x.cli import main as cli_main
from medp2x.label.export import export_bundle
from medp2x.networks import IMAGENET_MEAN, IMAGENET_STD, build_encoder

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
CLASSES = ("normal", "pneumonia")
SIZE = 32
# The fields the MONAI bundle metadata schema (meta_schema_20240725.json) requires.
REQUIRED_METADATA = (
    "schema", "version", "monai_version", "pytorch_version", "numpy_version",
    "required_packages_version", "task", "description", "authors", "copyright",
    "network_data_format",
)  # fmt: skip
REQUIRED_TENSOR = ("type", "format", "num_channels", "spatial_shape", "dtype", "value_range")


@pytest.fixture(scope="module")
def encoder_file(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    encoder = build_encoder("resnet18", 3)
    with torch.no_grad():  # a trained-looking encoder: BN statistics away from 0 / 1
        for m in encoder.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 2.0)
    path = tmp_path_factory.mktemp("enc") / "encoder.pt"
    save_encoder(
        path, encoder.state_dict(), "resnet18", 3, {"mean": IMAGENET_MEAN, "std": IMAGENET_STD}
    )
    return path


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    """Eight 40 x 48 gray PNGs, four per class folder (non-square: exercises the centre crop)."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for k, name in enumerate(CLASSES):
        (root / name).mkdir()
        for i in range(4):
            pixels = rng.integers(0, 256, (40, 48), dtype=np.uint8) // (1 + k)
            Image.fromarray(pixels).save(root / name / f"{name}_{i}.png")
    return root


@pytest.fixture(scope="module")
def bundle(tmp_path_factory, encoder_file) -> Path:
    """One export for the tests that only read the bundle."""
    out = tmp_path_factory.mktemp("bundle") / "chest_classification"
    return export_bundle(encoder_file, ",".join(CLASSES), out, image_size=SIZE)


@contextmanager
def bundle_on_path(path: Path):
    """Import the bundle's ``scripts`` as MONAI does (bundle folder on sys.path), and forget
    it afterwards so that another bundle's ``scripts`` is imported afresh."""
    sys.path.insert(0, str(path))
    try:
        yield path
    finally:
        sys.path.remove(str(path))
        for name in [m for m in sys.modules if m == "scripts" or m.startswith("scripts.")]:
            del sys.modules[name]


@pytest.fixture(scope="module")
def bundle_imports(bundle):
    with bundle_on_path(bundle):
        yield bundle


def parsed(bundle: Path, config: str, key: str, **overrides):
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(bundle / "configs" / config)
    parser.update({"bundle_root": str(bundle), **overrides})
    return parser.get_parsed_content(key)


# --------------------------------------------------------------------------- layout, metadata


def test_layout_and_metadata(bundle):
    for part in ("configs/metadata.json", "configs/inference.json", "configs/train.json",
                 "configs/logging.conf",
        "configs/multi_gpu_train.json", "models/model.pt", "scripts/__init__.py",
                 "scripts/p2x_classification.py", "docs/README.md"):  # fmt: skip
        assert (bundle / part).is_file(), part
    meta = json.loads((bundle / "configs" / "metadata.json").read_text())
    assert all(key in meta for key in REQUIRED_METADATA)
    io = meta["network_data_format"]
    # MONAI Label reads the first input and output: "image" in, "pred" out naming the classes.
    assert next(iter(io["inputs"])) == "image" and next(iter(io["outputs"])) == "pred"
    assert io["outputs"]["pred"]["channel_def"] == {"0": "normal", "1": "pneumonia"}
    assert io["inputs"]["image"]["spatial_shape"] == [SIZE, SIZE]  # 2D for MONAI Label
    for tensor in (io["inputs"]["image"], io["outputs"]["pred"]):
        assert all(key in tensor for key in REQUIRED_TENSOR)
    assert meta["numpy_version"] == np.__version__


def test_configs_have_what_monai_label_uses(bundle):
    infer = json.loads((bundle / "configs" / "inference.json").read_text())
    for key in (
        "network_def",
        "preprocessing",
        "inferer",
        "postprocessing",
        "device",
        "bundle_root",
    ):
        assert key in infer, key
    train = json.loads((bundle / "configs" / "train.json").read_text())
    assert "network" in train  # MONAI Label's checkpoint loader refers to @network
    assert isinstance(train["train"]["handlers"], list)  # MONAI Label inserts into it
    assert train["train"]["dataset"]["data"] and "data" in train["validate"]["dataset"]
    assert train["train"]["trainer"]["max_epochs"] == "@max_epochs"


# ------------------------------------------------------------------------------- the network


def penultimate(net: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    net.eval()
    fc, net.fc = net.fc, torch.nn.Identity()
    try:
        with torch.no_grad():
            return net(x)
    finally:
        net.fc = fc


def test_network_is_the_encoder_with_a_zero_head(bundle, encoder_file):
    from medp2x.checkpoints import load_encoder

    net = parsed(bundle, "inference.json", "network_def")
    net.load_state_dict(torch.load(bundle / "models" / "model.pt", weights_only=True))
    encoder, _ = load_encoder(encoder_file)
    x = torch.randn(2, 3, SIZE, SIZE)
    encoder.eval()
    with torch.no_grad():
        torch.testing.assert_close(penultimate(net, x), encoder(x))
        assert torch.equal(net.eval()(x), torch.zeros(2, len(CLASSES)))  # uniform until trained


def test_gray_stem_becomes_an_equivalent_rgb_stem(tmp_path):
    """A 1-channel (gray_stem='sum') encoder is exported as a 3-channel stem fed the gray
    image three times: same features, same normalisation (the gray pair repeated)."""
    torch.manual_seed(1)
    gray = build_encoder("resnet18", 1)
    path = tmp_path / "gray.pt"
    save_encoder(path, gray.state_dict(), "resnet18", 1, {"mean": [0.45], "std": [0.22]})
    out = export_bundle(path, "a,b", tmp_path / "gray_classification", image_size=SIZE)
    net = parsed(out, "inference.json", "network_def")
    net.load_state_dict(torch.load(out / "models" / "model.pt", weights_only=True))
    x = torch.rand(2, 1, SIZE, SIZE)
    gray.eval()
    with torch.no_grad():
        torch.testing.assert_close(
            penultimate(net, x.expand(-1, 3, -1, -1)), gray(x), atol=1e-5, rtol=1e-4
        )
    meta = json.loads((out / "configs" / "metadata.json").read_text())
    assert meta["network_data_format"]["inputs"]["image"]["modality"] == "gray"
    normalize = json.loads((out / "configs" / "inference.json").read_text())["normalize"]
    assert normalize["subtrahend"] == [0.45] * 3 and normalize["divisor"] == [0.22] * 3


# -------------------------------------------------------------------------- the preprocessing


def test_preprocessing_equals_medp2x_evaluation_view(bundle_imports, images):
    """PNG -> [0, 1] -> shorter side to 32, centre crop -> ImageNet mean/std: the same numbers
    medp2x's evaluation feeds the encoder (its folder reader, centre_view, Normalize)."""
    from medp2x.eval.images import centre_view
    from medp2x.networks import Normalize

    path = images / "normal" / "normal_0.png"
    preprocessing = parsed(bundle_imports, "inference.json", "preprocessing")
    got = preprocessing({"image": str(path)})["image"]
    pixels = torch.from_numpy(np.asarray(Image.open(path), dtype=np.float32) / 255.0)
    view = centre_view(pixels.expand(3, -1, -1), SIZE)
    expected = Normalize(IMAGENET_MEAN, IMAGENET_STD)(view.unsqueeze(0))[0]
    assert tuple(got.shape) == (3, SIZE, SIZE)
    torch.testing.assert_close(torch.as_tensor(got), expected, atol=1e-5, rtol=0)


def plane_of(bundle: Path, path: Path) -> torch.Tensor:
    from monai.transforms import LoadImaged
    from scripts.p2x_classification import P2XImaged, readers  # the bundle's copy

    load = LoadImaged("image", reader=readers(), dtype=None, image_only=True)
    return P2XImaged("image", channels="gray")(load({"image": str(path)}))["image"][0]


@pytest.mark.skipif(not SHARED.is_dir(), reason="shared sample data (../shared/data) absent")
def test_nifti_gives_the_middle_axial_slice_as_medp2x_shows_it(bundle_imports):
    from medp2x.data.intensity import percentile_window, scale_to_unit
    from medp2x.data.nifti import display_orientation, read_canonical_volume

    path = SHARED / "nifti_brain" / "dipy" / "S0_10slices.nii.gz"
    volume = read_canonical_volume(path)
    lo, hi = percentile_window(volume, (1.0, 99.0))  # the whole volume's window
    expected = scale_to_unit(display_orientation(volume[:, :, volume.shape[2] // 2]), lo, hi)
    got = plane_of(bundle_imports, path).numpy()
    np.testing.assert_allclose(got, expected, atol=1e-6)  # same slice, orientation, window


DICOM_CASES = (
    "MR/DICOMSamples_MR_heart_16f.dcm",  # 16 gray frames: the middle one
    "xray_CR/CR-ModalitySequenceLUT.dcm",  # MONOCHROME1 (inverted), modality LUT sequence
    "US_single/pydicomdata_OBXXXX1A.dcm",  # PALETTE COLOR
    "US_single/pydicomdata_US1_UNCR.dcm",  # RGB
    "MR/MR2_UNCR.dcm",  # rescale slope and a window in rescaled units
)


@pytest.mark.skipif(not SHARED.is_dir(), reason="shared sample data (../shared/data) absent")
@pytest.mark.parametrize("name", DICOM_CASES)
def test_dicom_is_rendered_as_medp2x_renders_it(bundle_imports, name):
    """The bundle's DICOM plane equals medp2x's reader on the middle frame: VOI, inversion,
    palette, colour and rescale included (MONAI's reader alone rescales some files only)."""
    from monai.transforms import LoadImaged
    from scripts.p2x_classification import P2XImaged, readers

    from medp2x.data.dicom import read_dicom_frame, read_dicom_info

    path = SHARED / "dicom_samples" / name
    loaded = LoadImaged("image", reader=readers(), dtype=None, image_only=True)(
        {"image": str(path)}
    )
    got = P2XImaged("image", channels="rgb")(loaded)["image"].numpy()
    expected = read_dicom_frame(path, frame=read_dicom_info(path).frames // 2)
    expected = expected.transpose(2, 0, 1) if expected.ndim == 3 else expected[None].repeat(3, 0)
    np.testing.assert_allclose(got, expected, atol=1e-6)


# ------------------------------------------------------------------------------------ labels


def test_class_labels_from_indices_names_and_files(bundle_imports, tmp_path):
    from scripts.p2x_classification import ClassLabeld

    labels = ClassLabeld("label", classes=CLASSES)
    (tmp_path / "a.txt").write_text("pneumonia\n")
    (tmp_path / "b.json").write_text(json.dumps({"label": "normal"}))
    (tmp_path / "c.txt").write_text("fracture")
    for given, index in ((1, 1), ("normal", 0), ("1", 1), (str(tmp_path / "a.txt"), 1),
                         (str(tmp_path / "b.json"), 0), (torch.tensor(1), 1)):  # fmt: skip
        assert labels({"label": given})["label"].item() == index
    with pytest.raises(ValueError, match=r"c\.txt: 'fracture' is not one of"):
        labels({"label": str(tmp_path / "c.txt")})
    with pytest.raises(ValueError, match="outside 0..1"):
        labels({"label": 2})


def test_labelled_files_from_class_folders_and_a_studies_folder(bundle_imports, images, tmp_path):
    from scripts.p2x_classification import labelled_files

    records = labelled_files(images, CLASSES)
    assert sorted(Path(r["image"]).name for r in records) == sorted(
        p.name for p in images.rglob("*.png")
    )
    assert {r["label"] for r in records} == set(CLASSES)
    studies = tmp_path / "studies"  # MONAI Label's layout: labels/final/<image id>.txt
    (studies / "labels" / "final").mkdir(parents=True)
    for name in ("x1", "x2", "x3"):
        Image.fromarray(np.zeros((8, 8), np.uint8)).save(studies / f"{name}.png")
    (studies / "labels" / "final" / "x1.txt").write_text("normal")
    (studies / "labels" / "final" / "x3.txt").write_text("pneumonia")
    records = labelled_files(studies, CLASSES)
    assert [(Path(r["image"]).name, Path(r["label"]).name) for r in records] == [
        ("x1.png", "x1.txt"),
        ("x3.png", "x3.txt"),
    ]


# ----------------------------------------------------------------------------- standalone run


def test_standalone_inference_and_fine_tuning(encoder_file, images, tmp_path):
    """``monai.bundle run`` of inference.json (uniform scores before training), of train.json
    (1 epoch, replaces models/model.pt), then inference again (scores moved)."""

    bundle = export_bundle(
        encoder_file, ",".join(CLASSES), tmp_path / "b_classification", image_size=SIZE
    )
    with bundle_on_path(bundle):
        standalone_runs(bundle, images, tmp_path)


def standalone_runs(bundle: Path, images: Path, tmp_path: Path) -> None:
    from monai.bundle import run

    config = str(bundle / "configs" / "inference.json")
    run(
        config_file=config,
        bundle_root=str(bundle),
        input_dir=str(images),
        output_dir=str(tmp_path / "p0"),
    )
    before = read_predictions(tmp_path / "p0" / "predictions.csv")
    assert len(before) == 8 and np.allclose(list(before.values()), 0.5)

    model = bundle / "models" / "model.pt"
    old = torch.load(model, weights_only=True)
    run(
        config_file=str(bundle / "configs" / "train.json"),
        bundle_root=str(bundle),
        dataset_dir=str(images),
        max_epochs=1,
        batch_size=4,
    )
    new = torch.load(model, weights_only=True)
    assert new["fc.weight"].abs().sum() > 0  # the head learned
    assert not torch.equal(new["layer4.1.conv2.weight"], old["layer4.1.conv2.weight"])  # fine-tuned

    run(
        config_file=config,
        bundle_root=str(bundle),
        input_dir=str(images),
        output_dir=str(tmp_path / "p1"),
    )
    after = read_predictions(tmp_path / "p1" / "predictions.csv")
    assert after.keys() == before.keys()
    assert not np.allclose(list(after.values()), 0.5)


def read_predictions(path: Path) -> dict[str, list[float]]:
    with open(path) as f:
        rows = list(csv.reader(f))
    out = {}
    for row in rows:
        probs = [float(v) for v in row[1:]]
        assert len(probs) == len(CLASSES) and abs(sum(probs) - 1) < 1e-5
        out[Path(row[0]).name] = probs
    return out


# --------------------------------------------------------------------------------- the command


def test_command_line_and_its_errors(encoder_file, tmp_path, capsys):
    out = tmp_path / "abc_classification"
    args = [
        "export-bundle",
        "--encoder",
        str(encoder_file),
        "--classes",
        "a,b,c",
        "--out",
        str(out),
    ]
    assert cli_main(args) == 2  # no run_config.json: the crop size must be given
    assert "pass --image-size" in capsys.readouterr().err
    assert cli_main([*args, "--image-size", "48"]) == 0
    meta = json.loads((out / "configs" / "metadata.json").read_text())
    assert meta["network_data_format"]["outputs"]["pred"]["num_channels"] == 3
    assert cli_main([*args, "--image-size", "48"]) == 2  # never overwrites silently
    assert "--force" in capsys.readouterr().err
    assert cli_main([*args, "--image-size", "48", "--force", "--classes", "a"]) == 2
    assert "two or more" in capsys.readouterr().err


def test_image_size_and_channels_come_from_the_pretraining_run(tmp_path, encoder_file):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "encoder.pt").write_bytes(encoder_file.read_bytes())
    (run_dir / "run_config.json").write_text(json.dumps({"image_size": 40, "modality": "gray"}))
    out = export_bundle(run_dir / "encoder.pt", "a,b", tmp_path / "x_classification")
    infer = json.loads((out / "configs" / "inference.json").read_text())
    assert infer["image_size"] == 40 and infer["channels"] == "gray"
