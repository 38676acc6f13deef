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
) -> Callable[[Path, int], Dataset]:
    """The pretraining reader of ``benchmark`` (``medp2x.data.benchmarks.dataset_factory``),
    its options given as one dict so a bundle can override them as one key."""
    from medp2x.data.benchmarks import dataset_factory

    return dataset_factory(benchmark, max_samples=max_samples, on_error=on_error, **(options or {}))


def benchmark_eval_data(
    benchmark: str,
    downstream_dir: str | None = None,
    data_dir: str | None = None,
    max_samples: int | None = None,
    on_error: str = "skip",
    options: Mapping[str, Any] | None = None,
) -> Callable | None:
    """The benchmark's labelled train/test reader, or None where no labelled data are given
    (the job then uses ``eval_dir`` or skips the evaluation)."""
    from medp2x.data.benchmarks import eval_data_factory

    return eval_data_factory(
        benchmark, downstream_dir, data_dir, max_samples=max_samples, on_error=on_error,
        **(options or {}),
    )  # fmt: skip


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
