"""The natural-scene datasets: TensorFlow Datasets (SOP, Food-101, CelebA-HQ, Cars196), UTKFace
(CelebA's downstream task) and FGVC-Aircraft from its own files.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from torch.utils.data import Dataset

from medp2x.data.base import UnreadableFileError
from medp2x.data.paper.common import (
    KEEP_SHAPE,
    Splits,
    _first_existing,
    _image_files,
    _labelled,
    _require,
    held_out_split,
)

logger = logging.getLogger("medp2x.data")


def _tfds_pair(name, label_key, splits, root, image_size, gray, max_samples, override) -> Splits:
    from medp2x.data.tfds import TFDSDataset

    return tuple(
        TFDSDataset(
            name,
            split,
            root,
            label_key,
            gray=gray,
            image_size=image_size,
            resize=KEEP_SHAPE,
            max_samples=max_samples,
            override=override,
        )
        for split in splits
    )


def read_tfds_pretraining(
    root: Path, image_size: int | None, *, name: str, split: str = "train", max_samples=None, **_
) -> Dataset:
    from medp2x.data.tfds import TFDSDataset

    return TFDSDataset(
        name, split, root, label_key=None, image_size=image_size, max_samples=max_samples
    )


def read_tfds_downstream(
    root: Path,
    image_size: int | None,
    *,
    name: str,
    label_key: str,
    splits=("train", "test"),
    max_samples=None,
    **_,
) -> Splits:
    return _tfds_pair(name, label_key, splits, root, image_size, False, max_samples, "data_dir")


UTKFACE_CLASSES = {  # label index -> name, as the UTKFace page defines them
    "gender": ("male", "female"),
    "ethnicity": ("White", "Black", "Asian", "Indian", "Others"),
    "age": ("0-9", "10-19", "20-29", "30-39", "40-49", "50-59", "60+"),
}


UTKFACE_AGE_BINS = (10, 20, 30, 40, 50, 60)  # lower edges of the age classes after the first


def utkface_label(path: Path, target: str) -> int | None:
    """Label from UTKFace's ``<age>_<gender>_<race>_<date>.jpg.chip.jpg``; None when the name
    does not carry it (a few published files lack a field)."""
    parts = path.name.split("_")
    try:
        age, gender, race = int(parts[0]), int(parts[1]), int(parts[2])
    except (ValueError, IndexError):
        return None
    if target == "gender":
        return gender if gender in (0, 1) else None
    if target == "ethnicity":
        return race if 0 <= race <= 4 else None
    return int(np.searchsorted(UTKFACE_AGE_BINS, age, side="right"))


def read_utkface(
    root: Path, image_size: int | None, *, target: str = "ethnicity", on_error: str = "skip", **_
) -> Splits:
    """UTKFace aligned and cropped faces; ``target``: gender (2), ethnicity (5) or age (7 bins)."""
    if target not in UTKFACE_CLASSES:
        raise ValueError(
            f"UTKFace target must be one of {', '.join(UTKFACE_CLASSES)}, not {target!r}"
        )
    files = _image_files(root)
    if not files:
        _require(root, None, "celeba", "downstream")  # raises: what is missing and where to get it
    labelled = [(f, utkface_label(f, target)) for f in files]
    unnamed = [f for f, label in labelled if label is None]
    if unnamed:
        logger.warning(
            "UTKFace: %d file(s) without a %s in their name skipped, e.g. %s",
            len(unnamed),
            target,
            unnamed[0],
        )
    items = [(f, label) for f, label in labelled if label is not None]
    classes = list(UTKFACE_CLASSES[target])
    return held_out_split(_labelled(items, classes, False, image_size, on_error))


def _aircraft_root(root: Path) -> Path:
    wanted = lambda p: (p / "images").is_dir() and (p / "images_variant_trainval.txt").is_file()  # noqa: E731
    candidates = (".", "data", "fgvc-aircraft-2013b/data")
    return _require(root, _first_existing(root, candidates, wanted), "aircraft", "pretraining")


def aircraft_items(
    data: Path, split: str, level: str = "variant"
) -> tuple[list[tuple[Path, int]], list[str]]:
    """(image, label) from ``images_<level>_<split>.txt`` (``<id> <name>`` lines); labels
    index the sorted ``<level>s.txt`` names (100 variants), or the names seen in trainval."""

    def read(name: str) -> list[tuple[str, str]]:
        path = data / f"images_{level}_{name}.txt"
        if not path.is_file():
            raise FileNotFoundError(f"FGVC-Aircraft annotation {path} is missing")
        rows = [
            line.strip().split(" ", 1) for line in path.read_text().splitlines() if line.strip()
        ]
        bad = [r for r in rows if len(r) != 2]
        if bad:
            raise UnreadableFileError(
                path, f"expected '<image id> <{level}>' lines, got {bad[0]!r}"
            )
        return rows

    names_file = data / f"{level}s.txt"
    if names_file.is_file():
        classes = sorted(
            line.strip() for line in names_file.read_text().splitlines() if line.strip()
        )
    else:
        classes = sorted({name for _, name in read("trainval")})
    lookup = {name: i for i, name in enumerate(classes)}
    items = []
    for image_id, name in read(split):
        if name not in lookup:
            raise UnreadableFileError(
                data / f"images_{level}_{split}.txt", f"unknown {level} {name!r}"
            )
        items.append((data / "images" / f"{image_id}.jpg", lookup[name]))
    return items, classes


def read_aircraft_pretraining(
    root: Path, image_size: int | None, *, on_error: str = "skip", **_
) -> Dataset:
    items, classes = aircraft_items(_aircraft_root(root), "trainval")
    return _labelled(items, classes, False, image_size, on_error)


def read_aircraft_downstream(
    root: Path, image_size: int | None, *, on_error: str = "skip", **_
) -> Splits:
    data = _aircraft_root(root)
    return tuple(
        _labelled(*aircraft_items(data, split), False, image_size, on_error)
        for split in ("trainval", "test")
    )
