"""The main job as users run it: ``python -m monai.bundle run --config_file bundles/...``."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from conftest import user_data

REPO = Path(__file__).resolve().parents[1]


def run_bundle(
    *overrides: str, bundle: str = "bundles/p2x_histo.json"
) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", bundle, *overrides]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_demo_bundle_runs_every_stage_and_resumes(tmp_path):
    out = tmp_path / "demo"
    args = (
        "--output_dir",
        str(out),
        "--epochs",
        "2",
        "--max_iterations",
        "4",
        "--eval_epochs",
        "3",
    )
    first = run_bundle(*args)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    text = first.stdout
    assert "cannot be downloaded" in text  # the demo says where its first stage comes from
    assert "surgery" in text.lower()
    for stage in ("[1/4]", "[2-3/4]", "[4/4]"):
        assert stage in text
    assert (out / "stage1" / "encoder.pt").is_file()
    assert (out / "p2x" / "encoder.pt").is_file()
    assert (out / "p2x" / "surgery_report.csv").is_file()
    assert (out / "evaluation" / "results.md").is_file()
    assert "P2X" in (out / "evaluation" / "results.md").read_text()
    assert "loss" in text and "downstream" in text
    # Started again with the same command: resumes, and surgery is not re-applied.
    again = run_bundle(*args)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "Resuming from" in again.stdout
    assert "not applied on this run" in again.stdout
    # max_iterations holds on resume too: the first stage is not trained on to its last epoch.
    assert (
        "first stage: 4 iterations" in first.stdout and "first stage: 4 iterations" in again.stdout
    )


def test_missing_data_dir_is_one_clear_error(tmp_path):
    missing = tmp_path / "no_such_slides"
    result = run_bundle("--data_dir", str(missing), "--output_dir", str(tmp_path / "out"))
    assert result.returncode != 0
    assert f"data_dir '{missing}' does not exist" in result.stderr
    assert "Traceback" not in result.stderr


def test_missing_ssl_checkpoint_is_one_clear_error(tmp_path):
    missing = tmp_path / "simclr_r50.pth"
    result = run_bundle(
        "--data_dir",
        str(tmp_path),
        "--ssl_checkpoint",
        str(missing),
        "--output_dir",
        str(tmp_path / "o"),
    )
    assert result.returncode != 0
    assert f"ssl_checkpoint '{missing}' does not exist" in result.stderr
    assert "Traceback" not in result.stderr


def test_bundle_runs_on_user_data_with_overrides_only(tmp_path):
    """The README's real-data command: slides folder, a first-stage checkpoint, a labelled folder."""
    slides, ckpt, labelled = user_data(tmp_path)
    out = tmp_path / "run"
    result = run_bundle(
        "--data_dir", str(slides), "--ssl_checkpoint", str(ckpt), "--eval_dir", str(labelled),
        "--output_dir", str(out), "--arch", "resnet18", "--image_size", "32", "--batch_size", "4",
        "--epochs", "1", "--max_iterations", "3", "--eval_epochs", "2",
        "--checkpoint_every", "1", "--keep_checkpoints", "0",
        "--source_size", "48",  # 48 px tiles (15 with tissue: 3 batches), 32 px crops of them
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "cannot be downloaded" not in result.stdout  # no demo stand-in on real data
    assert (out / "p2x" / "encoder.pt").is_file()
    kept = sorted(p.name for p in (out / "p2x" / "checkpoints").glob("*.pt"))
    assert kept == ["checkpoint_1.pt", "checkpoint_2.pt", "checkpoint_3.pt"]  # all kept
    results = (out / "evaluation" / "results.csv").read_text()
    assert "P2X" in results and "First stage" in results and "Random" in results


# ----------------------------------------------------------------------------- MONAI-native bundle

BUNDLES = REPO / "bundles"
CONFIGS = BUNDLES / "configs"


def parse(*files: Path, **overrides):
    """The config as ``monai.bundle run --config_file "[...]" --key value`` parses it."""
    from monai.bundle import ConfigParser

    parser = ConfigParser(ConfigParser.load_config_files([str(f) for f in files]))
    parser.update(overrides)
    parser.parse()
    return parser


def test_metadata_has_the_fields_the_bundle_specification_requires():
    import json

    import medp2x

    meta = json.loads((CONFIGS / "metadata.json").read_text())
    assert meta["schema"].endswith("/meta_schema_20240725.json")  # one schema version
    required = {
        "version", "changelog", "monai_version", "pytorch_version", "numpy_version",
        "required_packages_version", "name", "task", "description", "authors", "copyright",
        "network_data_format",
    }  # fmt: skip
    assert required <= meta.keys()
    assert "optional_packages_version" not in meta  # the 2022 schema's field: not mixed in
    assert meta["version"] in meta["changelog"]
    assert meta["required_packages_version"]["medp2x"] == medp2x.__version__
    fields = {
        "type", "format", "num_channels", "spatial_shape", "dtype", "value_range",
        "is_patch_data", "channel_def",
    }  # fmt: skip
    for part in ("inputs", "outputs"):
        for name, tensor in meta["network_data_format"][part].items():
            assert fields <= tensor.keys(), (part, name)
    # the encoder named in the metadata is the default network_def's
    network = parse(CONFIGS / "train.json").get_parsed_content("network_def")
    assert network.feature_dim == meta["network_data_format"]["outputs"]["pred"]["num_channels"]
    image = meta["network_data_format"]["inputs"]["image"]
    assert network.conv1.in_channels == image["num_channels"]
    # the single-file bundles find the same metadata and logging config beside them
    for name in ("metadata.json", "logging.conf", "evaluate.json"):
        assert (BUNDLES / name).resolve() == (CONFIGS / name).resolve()


def test_single_file_bundles_are_the_merged_overlays_and_overlays_are_short():
    import json

    from medp2x.bundle import single_file_bundles

    expected = single_file_bundles()
    assert len(expected) == 20
    for path, config in expected.items():
        assert json.loads(path.read_text()) == config, (
            f"{path.name} is out of date: run python -m medp2x.bundle"
        )
    for overlay in sorted((CONFIGS / "benchmarks").glob("*.json")) + [CONFIGS / "p1x.json"]:
        assert len(overlay.read_text().splitlines()) < 15, overlay.name
    for layout in ("train.json", "evaluate.json", "inference.json", "multi_gpu_train.json"):
        assert (CONFIGS / layout).is_file()
    assert (BUNDLES / "docs" / "README.md").is_file() and (BUNDLES / "LICENSE").is_file()


def test_p1x_is_p2x_without_the_surgery_handler_and_overrides_reach_nested_components():
    from medp2x.handlers import CheckpointSaver, WeightSurgery

    p2x = parse(CONFIGS / "train.json", CONFIGS / "benchmarks" / "us.json")
    p1x = parse(CONFIGS / "train.json", CONFIGS / "p1x.json", CONFIGS / "benchmarks" / "us.json")
    handlers = p2x.get_parsed_content("train#handlers")
    assert isinstance(handlers[0], WeightSurgery) and handlers[0].scale == "per_filter"
    assert [type(h) for h in p1x.get_parsed_content("train#handlers")] == [
        type(h) for h in handlers[1:]
    ]
    assert p1x.get_parsed_content("job").schedule == "p1x"
    assert p2x.get_parsed_content("network_def").conv1.in_channels == 1  # US is gray
    nested = parse(
        CONFIGS / "train.json",
        **{
            "train#handlers#0#scale": "per_layer",
            "train#handlers#1#every": 7,
            "method_options": {"temperature": 0.2},
            "arch": "resnet50",
        },
    )
    job = nested.get_parsed_content("job")
    assert job.handlers[0].scale == "per_layer" and job._surgery_settings() == ("per_layer", "copy")
    assert isinstance(job.handlers[1], CheckpointSaver) and job.handlers[1].every == 7
    assert job.method_options == {"temperature": 0.2}
    assert job.network_def.feature_dim == 2048  # --arch reaches network_def and the recipe
    histo = parse(BUNDLES / "p2x_histo.json", tile_size=128).get_parsed_content("dataset")
    assert histo.factory.options["tile_size"] == 128  # Histo's reader options stay top-level


def test_ckpt_export_gives_the_features_of_the_encoder_file(tmp_path):
    import torch
    from monai.bundle import ckpt_export

    from medp2x.checkpoints import load_encoder, save_encoder
    from medp2x.networks import IMAGENET_MEAN, IMAGENET_STD, build_encoder

    torch.manual_seed(1)
    encoder = build_encoder("resnet18")
    normalization = {"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)}
    path = save_encoder(tmp_path / "encoder.pt", encoder.state_dict(), "resnet18", 3, normalization)
    ts = tmp_path / "encoder.ts"
    ckpt_export(
        "network_def", filepath=str(ts), ckpt_file=str(path), key_in_ckpt="state_dict",
        config_file=str(BUNDLES / "p2x_histo.json"), meta_file=str(CONFIGS / "metadata.json"),
    )  # fmt: skip
    exported = torch.jit.load(str(ts), map_location="cpu").eval()
    reference, _ = load_encoder(path)
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(exported(x), reference.eval()(x))


def write_dicom(path: Path, pixels) -> Path:
    """A minimal 16-bit MONOCHROME2 ultrasound frame, as a hospital archive exports it."""
    from test_data_dicom import write_dicom as write_dx

    path.parent.mkdir(parents=True, exist_ok=True)
    return write_dx(path, pixels, Modality="US", SOPClassUID="1.2.840.10008.5.1.4.1.1.6.1")


def dicom_folder(root: Path, n: int = 12) -> Path:
    import numpy as np

    rng = np.random.default_rng(0)
    for i in range(n):
        write_dicom(root / f"study{i // 4}" / f"frame{i}.dcm", rng.integers(0, 4096, (40, 48)))
    return root


def test_hospital_dicom_folder_with_another_windowing_is_an_overlay(tmp_path):
    """docs/bundles.md, customisation 1: the reader replaced by a DICOM reader with percentile
    windowing, from an overlay file only."""
    import json

    import torch

    from medp2x.data.dicom import DicomDataset

    overlay = tmp_path / "my_dicom.json"
    overlay.write_text(json.dumps(HOSPITAL_DICOM_OVERLAY))
    job = parse(
        CONFIGS / "train.json", CONFIGS / "benchmarks" / "us.json", overlay
    ).get_parsed_content("job")
    scans = dicom_folder(tmp_path / "scans")
    dataset = job.make_dataset(scans, 32)
    assert isinstance(dataset, DicomDataset) and len(dataset) == 12
    image = dataset[0]["image"]
    assert image.shape[0] == 1 and min(image.shape[1:]) == 32  # capped on the shorter side
    options = dict(channels=1, resize="cap", image_size=32)
    wanted = DicomDataset(scans, window="percentile", percentiles=(1, 99), **options)[0]["image"]
    minmax = DicomDataset(scans, window="minmax", **options)[0]["image"]
    torch.testing.assert_close(image, wanted)
    assert not torch.allclose(image, minmax)


HOSPITAL_DICOM_OVERLAY = {
    "dataset": {
        "_target_": "medp2x.bundle.FolderReader",
        "reader": {
            "_target_": "medp2x.data.dicom.DicomDataset",
            "_mode_": "callable",
            "window": "percentile",
            "percentiles": [1, 99],
            "channels": 1,
            "resize": "cap",
            "on_error": "skip",
        },
    }
}

USER_HANDLER = '''
from pathlib import Path
from ignite.engine import Events


class CountSteps:
    """A hospital's own handler: counts the steps and writes the count at the end."""

    def __init__(self, path):
        self.path, self.steps = Path(path), 0

    def attach(self, engine):
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.step)
        engine.add_event_handler(Events.COMPLETED | Events.TERMINATE, self.write)

    def step(self, engine):
        self.steps += 1

    def write(self, engine):
        self.path.write_text(str(self.steps))
'''


@pytest.mark.slow
def test_bundle_runs_from_another_folder_with_nested_overrides_and_a_user_handler(tmp_path):
    """From any working directory: the single-file bundle by absolute path, a handler setting
    changed in the list, method options as a dict, a different encoder, and a user-defined
    handler added with one override."""
    import json
    import os

    import numpy as np
    import torch

    from medp2x.data.wsi import write_pyramidal_tiff
    from medp2x.networks import build_encoder

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "my_handlers.py").write_text(USER_HANDLER)
    rng = np.random.default_rng(0)
    tissue = np.full((256, 256, 3), 235, np.uint8)
    tissue[32:224, 32:224] = rng.integers(60, 200, (192, 192, 3), dtype=np.uint8)
    write_pyramidal_tiff(tmp_path / "slides" / "case1.tiff", tissue, tile=64, levels=2, mpp=0.5)
    ckpt = tmp_path / "ssl.pth"
    torch.save(build_encoder("resnet34").state_dict(), ckpt)
    count = tmp_path / "steps.txt"
    cmd = [
        sys.executable, "-m", "monai.bundle", "run",
        "--config_file", str(BUNDLES / "p2x_histo.json"),
        "--data_dir", str(tmp_path / "slides"), "--ssl_checkpoint", str(ckpt),
        "--output_dir", "run", "--arch", "resnet34", "--image_size", "32", "--source_size", "48",
        "--batch_size", "4", "--epochs", "1", "--max_iterations", "2", "--amp", "false",
        "--train#handlers#0#scale", "per_layer",
        "--method_options", "{'temperature': 0.2}",
        "--train#extra_handlers", f"[{{'_target_': 'my_handlers.CountSteps', 'path': '{count}'}}]",
    ]  # fmt: skip
    # the user's folder first, then the code under test (not whatever copy is installed)
    path = os.pathsep.join(filter(None, [str(elsewhere), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": path}
    result = subprocess.run(
        cmd, cwd=elsewhere, capture_output=True, text=True, timeout=600, env=env
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = elsewhere / "run" / "p2x"
    record = json.loads((out / "run_config.json").read_text())
    assert record["meta"]["arch"] == "resnet34" and record["recipe"]["temperature"] == 0.2
    assert (record["scale"], record["filters"]) == ("per_layer", "copy")
    classes = [h["class"].rsplit(".", 1)[-1] for h in record["handlers"]]
    assert classes[0] == "WeightSurgery" and classes[-1] == "CountSteps"
    assert record["handlers"][0]["scale"] == "per_layer"
    assert "layer" in (out / "surgery_report.csv").read_text()
    assert count.read_text() == "2"  # the user's handler ran on every step
    assert "[4/4] no eval_dir given: skipping the downstream evaluation" in result.stdout


def test_private_dicom_folder_pretrains_and_skips_the_benchmark_evaluation(tmp_path, capsys):
    """A hospital's ultrasound DICOM folder is not laid out as BUSI: the US bundle (here in the
    model-zoo form, train.json + p1x.json + benchmarks/us.json) pretrains on it, says so, and
    skips the BUSI evaluation in one line; the run ends normally (exit 0)."""
    from monai.bundle import run

    scans = dicom_folder(tmp_path / "us_scans")
    out = tmp_path / "run"
    overlays = [CONFIGS / "train.json", CONFIGS / "p1x.json", CONFIGS / "benchmarks" / "us.json"]
    run(
        config_file=[str(f) for f in overlays], data_dir=str(scans), output_dir=str(out),
        image_size=32, source_size=40, batch_size=4, epochs=1, max_iterations=2, amp=False,
    )  # fmt: skip
    text = capsys.readouterr().out
    assert (out / "p1x" / "encoder.pt").is_file()
    assert (
        f"[data] {scans} is not laid out as the us benchmark: pretraining on the 12 samples" in text
    )
    skipped = [line for line in text.splitlines() if line.startswith("[4/4]")]
    assert (
        len(skipped) == 1
        and "BUSI" in skipped[0]
        and "skipping the downstream evaluation" in skipped[0]
    )
    assert not (out / "evaluation").exists()


def test_inference_bundle_writes_features_without_paths(tmp_path):
    """configs/inference.json: the features of a folder from an encoder file, equal to the
    encoder's own on the evaluation view; the output names no file."""
    import numpy as np
    import torch
    from monai.bundle import run

    from medp2x.checkpoints import save_encoder
    from medp2x.eval.encoders import resolve_encoder
    from medp2x.eval.features import extract_features
    from medp2x.eval.settings import EvalSettings
    from medp2x.networks import build_encoder

    torch.manual_seed(0)
    encoder = build_encoder("resnet18", in_channels=1)
    weights = save_encoder(
        tmp_path / "encoder.pt", encoder.state_dict(), "resnet18", 1, {"mean": [0.5], "std": [0.25]}
    )
    scans = dicom_folder(tmp_path / "scans", n=5)
    out = tmp_path / "features"
    run(
        config_file=str(CONFIGS / "inference.json"), benchmark="us", encoder=str(weights),
        data_dir=str(scans), output_dir=str(out), image_size=32, batch_size=2,
    )  # fmt: skip
    saved = np.load(out / "features.npz")
    assert saved["features"].shape == (5, 512) and len(set(saved["sha256"])) == 5
    assert set(saved.files) == {"features", "sha256"}
    from medp2x.bundle import benchmark_reader

    dataset = benchmark_reader("us")(scans, 32)
    settings = EvalSettings(image_size=32, batch_size=5, progress=False)
    expected, _ = extract_features(resolve_encoder(str(weights)), dataset, settings)
    np.testing.assert_allclose(saved["features"], expected.numpy(), rtol=1e-4, atol=1e-5)


def test_every_modality_reads_a_private_folder_and_only_its_evaluation_needs_the_layout(tmp_path):
    """MRI NIfTI volumes and a folder of RGB photographs: the benchmark readers fall back to the
    modality's files; the same-set evaluation is skipped with its reason, unless a
    downstream_dir is given, which must hold the layout; an empty folder keeps the benchmark's
    message."""
    import nibabel as nib
    import numpy as np
    from PIL import Image

    from medp2x.bundle import benchmark_eval_data, benchmark_reader

    rng = np.random.default_rng(0)
    volumes = tmp_path / "mri"
    volumes.mkdir()
    for i in range(2):
        volume = rng.random((24, 20, 3)).astype(np.float32)
        nib.save(nib.Nifti1Image(volume, np.eye(4)), volumes / f"case{i}.nii.gz")
    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (20, 30, 3), dtype=np.uint8)).save(photos / f"{i}.png")
    cases = {"mri": (volumes, 1), "satellite": (photos, 3), "aircraft": (photos, 3)}
    for name, (folder, channels) in cases.items():
        dataset = benchmark_reader(name)(folder, 16)
        assert len(dataset) > 0 and dataset[0]["image"].shape[0] == channels, name
        evaluation = benchmark_eval_data(name, data_dir=str(folder))
        assert evaluation() == (None, None) and "not found" in evaluation.skipped, name
        with pytest.raises(FileNotFoundError):
            benchmark_eval_data(name, downstream_dir=str(folder))()
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="EuroSAT"):
        benchmark_reader("satellite")(empty, 16)
