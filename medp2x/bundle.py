"""What the MONAI bundles (``bundles/``) declare that needs a Python name, and how the
single-file bundles are made from the model-zoo layout.

The bundle is ``bundles/`` in MONAI's model-zoo layout: ``configs/train.json`` declares one P2X
run (reader, network, SSL method, views, optimiser, trainer, handler list), ``configs/p1x.json``
turns it into P1X, ``configs/benchmarks/<name>.json`` picks a benchmark. The files
``bundles/{p1x,p2x}_<name>.json`` are those overlays merged by MONAI's own merge
(``ConfigParser.load_config_files``), written out so that one ``--config_file`` runs from any
working directory (MONAI reads ``%file`` macros relative to the working directory, so a file
that pulled ``configs/train.json`` in that way would run from one folder only). They are
generated, never edited: ``python -m medp2x.bundle`` rewrites them; a test checks they match.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from torch.utils.data import Dataset

BUNDLE_ROOT = Path(__file__).resolve().parents[1] / "bundles"
SCHEDULES = ("p1x", "p2x")


# ----------------------------------------------------------------------------- declared data


def benchmark_reader(
    benchmark: str,
    max_samples: int | None = None,
    on_error: str = "skip",
    options: Mapping[str, Any] | None = None,
) -> BenchmarkReader:
    """The pretraining reader of ``benchmark`` (``medp2x.data.benchmarks.dataset_factory``),
    its options given as one dict so a bundle can override them as one key."""
    from medp2x.data.benchmarks import dataset_factory, get

    factory = dataset_factory(benchmark, max_samples, on_error, **(options or {}))
    return BenchmarkReader(factory, get(benchmark).modality, max_samples, on_error)


class BenchmarkReader:
    """A benchmark's pretraining reader that also takes a private folder of the modality.

    A hospital's own scans are not laid out as the benchmark: where the benchmark's reader finds
    no layout, every file of the modality under the folder is read instead (slides for Histo,
    which reads any folder already; DICOM, else NIfTI slices, else images, like ``medp2x scan``),
    with one line saying so. The benchmark's layout stays required for its own downstream
    evaluation (``benchmark_eval_data``), and a folder with no such file keeps the benchmark's
    message (where its data comes from)."""

    def __init__(self, factory: Callable, modality: str, max_samples: int | None, on_error: str):
        self.factory, self.modality = factory, modality
        self.max_samples, self.on_error = max_samples, on_error
        self.missing_data_hint = getattr(factory, "missing_data_hint", None)

    def __call__(self, data_dir: str | Path, image_size: int) -> Dataset:
        from medp2x.data.benchmarks import limit, read_medical_images

        try:
            return self.factory(data_dir, image_size)
        except FileNotFoundError as layout_error:
            root = Path(data_dir).expanduser()
            if not root.is_dir():
                raise
            try:
                dataset = read_medical_images(
                    root, image_size, gray=self.modality == "gray", on_error=self.on_error
                )
            except FileNotFoundError:
                raise layout_error from None
            print(
                f"[data] {root} is not laid out as the {self.factory.bench.name} benchmark: "
                f"pretraining on the {len(dataset)} samples of the files under it "
                "(the benchmark's evaluation needs its layout)"
            )
            return limit(dataset, self.max_samples)


def benchmark_eval_data(
    benchmark: str,
    downstream_dir: str | None = None,
    data_dir: str | None = None,
    max_samples: int | None = None,
    on_error: str = "skip",
    options: Mapping[str, Any] | None = None,
) -> BenchmarkEvalData | None:
    """The benchmark's labelled train/test reader, or None where no labelled data are given
    (the job then uses ``eval_dir`` or skips the evaluation)."""
    from medp2x.data.benchmarks import eval_data_factory

    factory = eval_data_factory(
        benchmark, downstream_dir, data_dir, max_samples=max_samples, on_error=on_error,
        **(options or {}),
    )  # fmt: skip
    return None if factory is None else BenchmarkEvalData(factory, downstream_dir is not None)


class BenchmarkEvalData:
    """``make_eval_data() -> (train, test)``; ``(None, None)`` with the reason in ``skipped``
    when the labelled set would be read from ``data_dir`` (same-set benchmarks) and that folder
    is not laid out as the benchmark: a private folder pretrains, and the evaluation is skipped
    in one line. A ``downstream_dir`` given explicitly must hold the layout (an error)."""

    def __init__(self, factory: Callable, explicit: bool):
        self.factory, self.explicit = factory, explicit
        self.skipped: str | None = None

    def __call__(self) -> tuple[Dataset | None, Dataset | None]:
        try:
            return self.factory()
        except FileNotFoundError as err:
            if self.explicit:
                raise
            self.skipped = f"no labelled benchmark data ({err})"
            return None, None


class FolderReader:
    """A reader class made into the job's ``make_dataset(data_dir, source_size)``: ``reader``
    is called as ``reader(data_dir, image_size=source_size)``. In a bundle, ``reader`` is a
    ``_mode_: partial`` component with the reader's own options, e.g. a DICOM folder with
    another windowing::

        "dataset": {"_target_": "medp2x.bundle.FolderReader",
                    "reader": {"_target_": "medp2x.data.dicom.DicomDataset", "_mode_": "partial",
                               "window": "percentile", "percentiles": [1, 99], "resize": "cap",
                               "channels": 1, "on_error": "skip"}}
    """

    def __init__(self, reader: Callable[..., Dataset]):
        if not callable(reader):
            raise TypeError(f"dataset#reader must be a reader class or partial, got {reader!r}")
        self.reader = reader

    def __call__(self, data_dir: str | Path, source_size: int) -> Dataset:
        return self.reader(Path(data_dir).expanduser(), image_size=source_size)


# ----------------------------------------------------------------------------- inference


def extract_features(
    encoder: str | Path,
    make_dataset: Callable[[Path, int], Dataset],
    data_dir: str | Path,
    output_dir: str | Path,
    image_size: int = 224,
    batch_size: int = 32,
    num_workers: int = 0,
    normalization: str = "auto",
    device: str | None = None,
) -> Path:
    """Features of every sample under ``data_dir`` from an encoder file (``encoder.pt`` of a
    run, or any checkpoint medp2x reads), written to ``<output_dir>/features.npz``: ``features``
    (N x D float32, in the reader's order) and ``sha256`` of each sample's pixels. No path, file
    name or header is written: those can carry patient identifiers. Each image is resized on its
    shorter side to ``image_size`` and centre-cropped (the evaluation view), and normalised as
    the encoder file says."""
    import numpy as np
    import torch

    from medp2x.data.base import existing_path
    from medp2x.evaluate import EvalSettings, resolve_encoder
    from medp2x.evaluate import extract_features as features_of

    encoder_path = existing_path(encoder, "encoder")
    root = existing_path(data_dir, "data_dir")
    dataset = make_dataset(root, image_size)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    settings = EvalSettings(
        image_size=image_size, batch_size=batch_size, num_workers=num_workers, device=device
    )
    network = resolve_encoder(str(encoder_path), normalization=normalization)
    feats, _ = features_of(network, dataset, settings, desc="features")
    digests = [_pixel_digest(dataset[i]["image"]) for i in range(len(dataset))]
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "features.npz"
    np.savez(path, features=feats.cpu().numpy().astype(np.float32), sha256=np.array(digests))
    print(f"features: {feats.shape[0]} x {feats.shape[1]} from {encoder_path} -> {path}")
    return path


def _pixel_digest(image: Any) -> str:
    import hashlib

    import numpy as np

    array = np.ascontiguousarray(np.asarray(image, dtype=np.float32))
    return hashlib.sha256(array.tobytes()).hexdigest()


# ----------------------------------------------------------------------------- single files


def overlays(benchmark: str, schedule: str, root: Path = BUNDLE_ROOT) -> list[Path]:
    """The model-zoo files that make ``<schedule>_<benchmark>.json``, in merge order."""
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    configs = root / "configs"
    files = [configs / "train.json"]
    if schedule == "p1x":
        files.append(configs / "p1x.json")
    files.append(configs / "benchmarks" / f"{benchmark}.json")
    return files


def merged(files: list[Path]) -> dict:
    """The files merged exactly as ``monai.bundle run --config_file "[...]"`` merges them."""
    from monai.bundle import ConfigParser

    return ConfigParser.load_config_files([str(f) for f in files])


def single_file_bundles(root: Path = BUNDLE_ROOT) -> dict[Path, dict]:
    """Every ``bundles/{p1x,p2x}_<benchmark>.json`` as it must read."""
    benchmarks = sorted(p.stem for p in (root / "configs" / "benchmarks").glob("*.json"))
    return {
        root / f"{schedule}_{name}.json": merged(overlays(name, schedule, root))
        for name in benchmarks
        for schedule in SCHEDULES
    }


def write_single_file_bundles(root: Path = BUNDLE_ROOT) -> list[Path]:
    written = []
    for path, config in single_file_bundles(root).items():
        path.write_text(json.dumps(config, indent=2) + "\n")
        written.append(path)
    return written


if __name__ == "__main__":
    for path in write_single_file_bundles(Path(sys.argv[1]) if len(sys.argv) > 1 else BUNDLE_ROOT):
        print(f"wrote {path}")
