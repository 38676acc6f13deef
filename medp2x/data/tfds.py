"""Prepared TensorFlow Datasets splits as samples, read without TensorFlow.

``tfds.data_source`` gives random access to a split prepared in the ArrayRecord format and
decodes images with Pillow/OpenCV, so TensorFlow is only needed where the data are *prepared*
(a machine with internet), never where they are trained on. Nothing here downloads: an
unprepared dataset is one clear error saying how to prepare it and which setting to change.

Records come back as dicts of numpy values (``image`` H x W x C uint8, labels as numpy or
Python ints); ``TFDSDataset`` turns them into the project's sample contract.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from medp2x.data.base import check_resize, resize_to
from medp2x.data.folder import to_tensor

logger = logging.getLogger("medp2x.data")

DEFAULT_DATA_DIR = "~/tensorflow_datasets"  # TFDS's own default


def prepare_command(name: str, data_dir: str | Path) -> str:
    """How to prepare ``name`` for random access, as a user would type it."""
    return (
        f"python -c \"import tensorflow_datasets as tfds; tfds.builder('{name}', "
        f"data_dir='{data_dir}', file_format='array_record').download_and_prepare()\" "
        f"(or `tfds build {name.split('/')[0]} --data_dir {data_dir} --file_format array_record`, "
        "which needs TensorFlow)"
    )


def open_data_source(
    name: str, split: str, data_dir: str | Path | None, override: str = "data_dir"
):
    """``tfds.data_source`` for a split already prepared in ``data_dir``; never downloads.

    Errors name the dataset, the folder, how to prepare it, and the setting to change.
    """
    try:
        import tensorflow_datasets as tfds
    except ImportError as err:  # an optional dependency: say how to get it
        raise ImportError(
            f"reading the TFDS dataset {name!r} needs tensorflow-datasets and array-record: "
            "pip install 'medp2x[tfds]'"
        ) from err
    folder = str(Path(data_dir or DEFAULT_DATA_DIR).expanduser())
    try:
        return tfds.data_source(name, split=split, data_dir=folder, try_gcs=False, download=False)
    except tfds.core.registered.DatasetNotFoundError:
        raise ValueError(f"{name!r} is not in the installed TFDS catalogue") from None
    except NotImplementedError:  # prepared in another format (TFRecord, tfds' default)
        if _prepared(tfds, name, folder):
            raise FileNotFoundError(
                f"{name} is prepared in {folder} as TFRecord, but reading it without TensorFlow "
                f"needs ArrayRecord: prepare it again with {prepare_command(name, folder)} into "
                f"another folder, or set --{override}"
            ) from None
        raise FileNotFoundError(
            f"{name} is not prepared in {folder}: on a machine with internet run "
            f"{prepare_command(name, folder)}, copy the folder here, or set --{override}"
        ) from None


def _prepared(tfds, name: str, folder: str) -> bool:
    try:
        return tfds.builder(name, data_dir=folder, try_gcs=False).is_prepared()
    except Exception:  # noqa: BLE001 - an unreadable dataset_info.json is "not prepared" here
        return False


class TFDSDataset(Dataset):
    """One split of a prepared TFDS image dataset as ``{"image", "label", "meta"}`` samples.

    ``label_key`` names the record field used as the class (``None``: unlabelled, -1).
    ``max_samples`` keeps the first records only; TFDS shuffles records when it prepares a
    dataset, so they are a random subset. Labels are read sample by sample (a label-only
    decoder needs TensorFlow), so ``medp2x.eval`` reads them once per split.
    ``image_size`` and ``resize`` size the images (``base.resize_to``; ``"cap"`` for
    pretraining keeps each photograph's own aspect and resolution up to that shorter side).
    """

    def __init__(
        self,
        name: str,
        split: str = "train",
        data_dir: str | Path | None = None,
        label_key: str | None = "label",
        image_key: str = "image",
        gray: bool = False,
        image_size: int | None = None,
        max_samples: int | None = None,
        override: str = "data_dir",
        resize: str = "square",
    ):
        self.name, self.split = name, split
        self.label_key, self.image_key = label_key, image_key
        self.gray, self.image_size, self.resize = gray, image_size, check_resize(resize)
        self.source = open_data_source(name, split, data_dir, override)
        total = len(self.source)
        self.length = total if max_samples is None else min(total, int(max_samples))
        if self.length == 0:
            raise ValueError(f"{name} split {split!r} in {data_dir} holds no records")

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < self.length:
            raise IndexError(f"index {index} out of range for {self.length} samples")
        record = self.source[index]
        if self.image_key not in record:
            raise KeyError(
                f"{self.name}: records have no {self.image_key!r} field (fields: {', '.join(record)})"
            )
        image = resize_to(
            image_tensor(record[self.image_key], self.gray), self.image_size, self.resize
        )
        label = -1 if self.label_key is None else int(np.asarray(record[self.label_key]))
        meta = {"dataset": self.name, "split": self.split, "index": index}
        return {"image": image, "label": label, "meta": meta}


def image_tensor(pixels, gray: bool) -> torch.Tensor:
    """A decoded TFDS image (H x W x C numpy, C = 1 or 3) as float32 C x H x W in [0, 1]."""
    pixels = np.asarray(pixels)
    if pixels.ndim == 3 and pixels.shape[-1] == 1:
        pixels = pixels[..., 0]
    if pixels.ndim == 3 and pixels.shape[-1] == 4:
        pixels = pixels[..., :3]
    if pixels.ndim not in (2, 3) or (pixels.ndim == 3 and pixels.shape[-1] != 3):
        raise ValueError(f"unsupported TFDS image shape {pixels.shape} (expected H x W x 1|3)")
    return to_tensor(pixels, gray)
