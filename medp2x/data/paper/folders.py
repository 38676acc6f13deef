"""The datasets published as class folders: COVID-19 radiography (Xray), brain-tumour MRI,
BUSI (ultrasound) and EuroSAT (satellite).
"""

from __future__ import annotations

import logging
from pathlib import Path

from torch.utils.data import Dataset

from medp2x.data.folder import ImageFolderDataset
from medp2x.data.paper.common import (
    KEEP_SHAPE,
    Splits,
    _class_items,
    _first_existing,
    _has_class_folders,
    _is_mask,
    _labelled,
    _require,
    held_out_split,
    read_medical_images,
)

logger = logging.getLogger("medp2x.data")


COVID_CLASSES = ("COVID", "Lung_Opacity", "Normal", "Viral Pneumonia")


def read_covid_radiography(
    root: Path, image_size: int | None, *, on_error: str = "skip", **_
) -> Splits:
    """COVID-19 Radiography Database: ``<class>/images/*.png`` (``masks/`` ignored)."""
    wanted = _has_class_folders(("COVID", "Normal", "Viral Pneumonia"))
    found = _require(
        root,
        _first_existing(root, (".", "COVID-19_Radiography_Dataset"), wanted),
        "xray",
        "downstream",
    )
    items, classes = _class_items(found, exclude=_is_mask)
    return held_out_split(_labelled(items, classes, True, image_size, on_error))


MRI_CLASSES = ("glioma_tumor", "meningioma_tumor", "no_tumor", "pituitary_tumor")


def _bhuvaji(root: Path) -> Path | None:
    wanted = lambda p: (p / "Training").is_dir() and (p / "Testing").is_dir()  # noqa: E731
    return _first_existing(root, (".", "brain-tumor-classification-mri", "archive"), wanted)


def read_mri_pretraining(
    root: Path, image_size: int | None, *, on_error: str = "skip", **_
) -> Dataset:
    """Bhuvaji ``Training/`` images; a folder of NIfTI or DICOM brain scans also works."""
    found = _bhuvaji(root)
    if found is None and _has_volumes(root):
        return read_medical_images(root, image_size, gray=True, on_error=on_error)
    found = _require(root, found, "mri", "pretraining")
    return ImageFolderDataset(
        found / "Training", gray=True, image_size=image_size, resize=KEEP_SHAPE, on_error=on_error
    )


def _has_volumes(root: Path) -> bool:
    from medp2x.data.readers import READERS

    scans = (READERS["nifti"], READERS["dicom"])
    return any(r.claims(p.name) for p in root.rglob("*") for r in scans)


def read_mri_downstream(
    root: Path, image_size: int | None, *, on_error: str = "skip", **_
) -> Splits:
    found = _require(root, _bhuvaji(root), "mri", "pretraining")
    train_items, classes = _class_items(found / "Training")
    test_items, _ = _class_items(found / "Testing", classes=classes)
    return (
        _labelled(train_items, classes, True, image_size, on_error),
        _labelled(test_items, classes, True, image_size, on_error),
    )


BUSI_CLASSES = ("benign", "malignant", "normal")


def _busi(root: Path, image_size: int | None, on_error: str) -> Splits:
    wanted = _has_class_folders(BUSI_CLASSES)
    found = _require(
        root, _first_existing(root, (".", "Dataset_BUSI_with_GT"), wanted), "us", "pretraining"
    )
    items, classes = _class_items(found, exclude=_is_mask)
    return held_out_split(_labelled(items, classes, True, image_size, on_error))


def read_busi_pretraining(
    root: Path, image_size: int | None, *, on_error: str = "skip", **_
) -> Dataset:
    return _busi(root, image_size, on_error)[0]


def read_busi_downstream(
    root: Path, image_size: int | None, *, on_error: str = "skip", **_
) -> Splits:
    return _busi(root, image_size, on_error)


EUROSAT_CLASSES = (
    "AnnualCrop", "Forest", "HerbaceousVegetation", "Highway", "Industrial", "Pasture",
    "PermanentCrop", "Residential", "River", "SeaLake",
)  # fmt: skip


def _eurosat(root: Path, image_size: int | None, on_error: str) -> Splits:
    wanted = _has_class_folders(EUROSAT_CLASSES)
    candidates = (".", "2750", "EuroSAT", "EuroSAT/2750", "EuroSAT_RGB")
    found = _require(root, _first_existing(root, candidates, wanted), "satellite", "pretraining")
    items, classes = _class_items(found)
    return held_out_split(_labelled(items, classes, False, image_size, on_error))


def read_eurosat_pretraining(
    root: Path, image_size: int | None, *, on_error: str = "skip", **_
) -> Dataset:
    return _eurosat(root, image_size, on_error)[0]


def read_eurosat_downstream(
    root: Path, image_size: int | None, *, on_error: str = "skip", **_
) -> Splits:
    return _eurosat(root, image_size, on_error)
