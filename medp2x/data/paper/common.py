"""What every reader of the paper's datasets shares: the fixed held-out test split, file
listings of published layouts, and the labelled-image dataset they build.

Test splits follow the paper: "only the training split was used for pretraining". Where a
dataset has no official split (BUSI, EuroSAT, COVID-19 radiography, UTKFace) a stratified
``HELD_OUT`` fraction per class is held out with ``SPLIT_SEED``; pretraining never sees it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from torch.utils.data import Dataset, Subset

from medp2x.data.folder import IMAGE_EXTENSIONS, ImageFileDataset

logger = logging.getLogger("medp2x.data")


HELD_OUT = 0.2  # test fraction per class where a dataset has no official split


SPLIT_SEED = 0  # fixed, so pretraining and every evaluation agree on the held-out images


Splits = tuple[Dataset, Dataset]


def _image_files(root: Path, exclude: Callable[[Path], bool] | None = None) -> list[Path]:
    """Images under ``root`` (recursive, sorted, hidden entries skipped) minus ``exclude``."""
    files = (
        p
        for p in root.rglob("*")
        if p.is_file()
        and p.name.lower().endswith(IMAGE_EXTENSIONS)
        and not any(part.startswith(".") for part in p.relative_to(root).parts)
    )
    return sorted(p for p in files if exclude is None or not exclude(p))


def _class_items(
    root: Path, exclude: Callable[[Path], bool] | None = None, classes: Sequence[str] | None = None
) -> tuple[list[tuple[Path, int]], list[str]]:
    """``root/<class>/**/image`` as (path, label), labels indexing ``classes`` (default: the
    sorted names of the class folders holding images), so two splits share one mapping."""
    per_class = {
        d.name: _image_files(d, exclude)
        for d in sorted(root.iterdir())
        if d.is_dir() and not d.name.startswith(".")
    }
    per_class = {name: files for name, files in per_class.items() if files}
    classes = list(classes) if classes is not None else sorted(per_class)
    unknown = sorted(set(per_class) - set(classes))
    if unknown:
        raise ValueError(
            f"{root}: class folder(s) {', '.join(unknown)} not among {', '.join(classes)}"
        )
    if not per_class:
        raise FileNotFoundError(f"no images in class folders under {root}")
    lookup = {name: i for i, name in enumerate(classes)}
    items = [(f, lookup[name]) for name in sorted(per_class) for f in per_class[name]]
    return items, classes


def _first_existing(
    root: Path, candidates: Sequence[str], wanted: Callable[[Path], bool]
) -> Path | None:
    """The first of ``root/candidate`` that looks like the dataset (archives nest differently)."""
    for rel in candidates:
        path = root / rel
        if path.is_dir() and wanted(path):
            return path
    return None


def _has_class_folders(names: Sequence[str]) -> Callable[[Path], bool]:
    lowered = {n.lower() for n in names}
    return lambda path: lowered <= {d.name.lower() for d in path.iterdir() if d.is_dir()}


def _is_mask(path: Path) -> bool:
    """BUSI's ``benign (1)_mask.png`` / ``_mask_1.png`` and COVID-19 radiography's ``masks/``."""
    return "_mask" in path.stem.lower() or any(p.lower() == "masks" for p in path.parent.parts)


def limit(dataset: Dataset, max_samples: int | None) -> Dataset:
    """At most ``max_samples`` samples, evenly spaced so sorted class folders all stay in."""
    if max_samples is None or max_samples >= len(dataset):
        return dataset
    if max_samples < 1:
        raise ValueError(f"max_samples must be >= 1, not {max_samples}")
    keep = np.unique(np.linspace(0, len(dataset) - 1, int(max_samples)).round().astype(int))
    return Subset(dataset, keep.tolist())


def held_out_split(dataset: ImageFileDataset) -> Splits:
    """(train, test) with a stratified ``HELD_OUT`` of each class held out (``SPLIT_SEED``)."""
    from medp2x.data.split import stratified_split

    labels = np.asarray([label for _, label in dataset.items])
    kept, held = stratified_split(labels, HELD_OUT, SPLIT_SEED)
    return Subset(dataset, kept.tolist()), Subset(dataset, held.tolist())


KEEP_SHAPE = "cap"


def _labelled(items, classes, gray, image_size, on_error) -> ImageFileDataset:
    return ImageFileDataset(
        items,
        gray=gray,
        image_size=image_size,
        resize=KEEP_SHAPE,
        on_error=on_error,
        classes=classes,
    )


def _require(root: Path, found: Path | None, bench: str, spec: str) -> Path:
    if found is None:
        from medp2x.data.paper.registry import DATASETS  # the registry imports the readers

        b = DATASETS[bench]
        raise FileNotFoundError(b.missing(getattr(b, spec), root))
    return found


def read_medical_images(
    root: Path,
    image_size: int | None,
    *,
    gray: bool,
    on_error: str = "skip",
    exclude: Callable[[Path], bool] | None = None,
    **_,
) -> Dataset:
    """Unlabelled scans under ``root``: DICOM files when there are any, else NIfTI volumes
    (2-D slices), else PNG/JPEG/TIFF images. Users bring their own hospital data this way."""
    from medp2x.data.readers import READERS, open_reader

    names = [p.name for p in root.rglob("*") if p.is_file()]
    for kind in ("dicom", "nifti"):  # scans first: DICOM, else NIfTI volumes, else images
        if any(READERS[kind].claims(n) for n in names):
            channels = 1 if gray else 3
            return open_reader(
                kind, root, image_size=image_size, resize=KEEP_SHAPE, channels=channels,
                on_error=on_error,
            )  # fmt: skip
    files = _image_files(root, exclude)
    if not files:
        raise FileNotFoundError(f"no DICOM, NIfTI or image files under {root}")
    return ImageFileDataset(
        [(f, -1) for f in files],
        gray=gray,
        image_size=image_size,
        resize=KEEP_SHAPE,
        on_error=on_error,
    )
