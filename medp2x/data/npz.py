"""MedMNIST-style ``.npz`` files: ``{split}_images`` and ``{split}_labels`` arrays per split.

MedMNIST ships each benchmark as one such file (train/val/test inside), so one path gives the
three splits of a downstream evaluation. Only 2-D single-label sets are read: the 3-D sets
(``*mnist3d``) and the multi-label ChestMNIST are refused with a clear message rather than
silently misread.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from medp2x.data.base import UnreadableFileError, existing_path

SPLITS = ("train", "val", "test")


class NpzDataset(Dataset):
    """One split of a MedMNIST-style ``.npz`` as samples ``{"image", "label", "meta"}``.

    Arrays are held in memory as uint8 (MedMNIST files are a few MB); images become float32
    C x H x W in [0, 1] on access, resized to ``image_size`` (square) when given.
    """

    def __init__(self, path: str | Path, split: str = "train", image_size: int | None = None):
        if split not in SPLITS:
            raise ValueError(f"split must be one of {', '.join(SPLITS)}, not {split!r}")
        self.path = existing_path(path, "npz file")
        self.split, self.image_size = split, image_size
        images, labels = _read_split(self.path, split)
        self.images = _channels_first(self.path, images)
        self.labels = _single_labels(self.path, labels, len(self.images))
        self.scale = float(np.iinfo(images.dtype).max) if images.dtype.kind in "ui" else 1.0

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict:
        image = torch.from_numpy(self.images[index].astype(np.float32) / self.scale)
        if self.image_size is not None and tuple(image.shape[-2:]) != (self.image_size,) * 2:
            image = resize_image(image, self.image_size)
        meta = {"source": self.path.name, "split": self.split, "index": int(index)}
        return {"image": image, "label": int(self.labels[index]), "meta": meta}

    @property
    def num_classes(self) -> int:
        return int(self.labels.max()) + 1


def available_splits(path: str | Path) -> list[str]:
    """The splits a ``.npz`` file holds (those with both images and labels)."""
    with _open_npz(existing_path(path, "npz file")) as data:
        keys = set(data.files)
    return [s for s in SPLITS if f"{s}_images" in keys and f"{s}_labels" in keys]


def resize_image(image: torch.Tensor, size: int) -> torch.Tensor:
    """Bilinear resize of one C x H x W image to size x size (antialiased when shrinking)."""
    out = F.interpolate(image[None], size=(size, size), mode="bilinear", antialias=True)
    return out[0].clamp_(0.0, 1.0)


def _open_npz(path: Path):
    try:
        return np.load(path, allow_pickle=False)  # never unpickle: object arrays are refused
    except (OSError, ValueError, zipfile.BadZipFile) as err:
        raise UnreadableFileError(path, f"not a readable .npz file ({err})") from err


def _read_split(path: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    with _open_npz(path) as data:
        missing = [k for k in (f"{split}_images", f"{split}_labels") if k not in data.files]
        if missing:
            raise UnreadableFileError(
                path, f"no {' or '.join(missing)} array (holds: {', '.join(sorted(data.files))})"
            )
        try:
            return data[f"{split}_images"], data[f"{split}_labels"]
        except ValueError as err:  # object arrays need pickle, which is refused
            raise UnreadableFileError(path, f"cannot read the {split} arrays ({err})") from err


def _channels_first(path: Path, images: np.ndarray) -> np.ndarray:
    """N x H x W (gray) or N x H x W x C (C in 1, 3) -> N x C x H x W."""
    if images.ndim == 3:
        return images[:, None]
    if images.ndim == 4 and images.shape[-1] in (1, 3):
        return np.ascontiguousarray(images.transpose(0, 3, 1, 2))
    raise UnreadableFileError(
        path,
        f"images of shape {images.shape} are not 2-D (N x H x W [x 1|3]); 3-D sets unsupported",
    )


def _single_labels(path: Path, labels: np.ndarray, n: int) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim == 2 and labels.shape[1] != 1:
        raise UnreadableFileError(path, f"labels of shape {labels.shape} are multi-label")
    labels = labels.reshape(-1).astype(np.int64)
    if len(labels) != n:
        raise UnreadableFileError(path, f"{len(labels)} labels for {n} images")
    if labels.size and labels.min() < 0:
        raise UnreadableFileError(path, "negative class labels")
    return labels
