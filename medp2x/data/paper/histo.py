"""Histo: H&E whole-slide images for pretraining (tissue tiles), PatchCamelyon downstream."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from torch.utils.data import Dataset

from medp2x.data.base import UnreadableFileError
from medp2x.data.folder import to_tensor
from medp2x.data.paper.common import Splits
from medp2x.data.paper.natural import _tfds_pair

logger = logging.getLogger("medp2x.data")


def read_slides(
    root: Path,
    image_size: int | None,
    *,
    on_error: str = "skip",
    tile_size: int | None = None,
    mpp: float | None = None,
    min_tissue: float = 0.5,
    cache_dir: str | Path | None = None,
    **_,
) -> Dataset:
    """Tissue tiles of the whole-slide images under ``root`` (any OpenSlide format)."""
    from medp2x.data.wsi import WSITileDataset

    return WSITileDataset(
        root,
        tile_size=tile_size or image_size or 256,
        mpp=mpp,
        min_tissue=min_tissue,
        cache_dir=cache_dir,
        on_error=on_error,
    )


PCAM_FILE = "camelyonpatch_level_2_split_{split}_{xy}.h5"


class PCamH5Dataset(Dataset):
    """One PatchCamelyon split from its official HDF5 files (96 x 96 RGB, label 1 = tumour
    in the central 32 x 32 px). Labels are read at once (N bytes); images lazily, with the
    file opened in each DataLoader worker since h5py handles must not cross a fork."""

    def __init__(self, root: Path, split: str, image_size: int | None = None):
        try:
            import h5py
        except ImportError as err:
            raise ImportError("reading PCam's .h5 files needs h5py: pip install h5py") from err
        self.x_path = root / PCAM_FILE.format(split=split, xy="x")
        y_path = root / PCAM_FILE.format(split=split, xy="y")
        for path in (self.x_path, y_path):
            if not path.is_file():
                gz = path.with_name(path.name + ".gz")
                hint = f" (found {gz.name}: gunzip it first)" if gz.is_file() else ""
                raise FileNotFoundError(f"PCam file {path} is missing{hint}")
        self.labels = _read_h5(h5py, y_path, "y").reshape(-1).astype(np.int64)
        with h5py.File(self.x_path, "r") as handle:
            if "x" not in handle or len(handle["x"]) != len(self.labels):
                raise UnreadableFileError(
                    self.x_path, f"expected dataset 'x' with {len(self.labels)} images"
                )
        self.image_size = image_size
        self._file = None

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict:
        if self._file is None:
            import h5py

            self._file = h5py.File(self.x_path, "r")
        image = to_tensor(np.asarray(self._file["x"][index]), gray=False)
        if self.image_size is not None and tuple(image.shape[-2:]) != (self.image_size,) * 2:
            from medp2x.data.npz import resize_image

            image = resize_image(image, self.image_size)
        meta = {"path": str(self.x_path), "index": int(index)}
        return {"image": image, "label": int(self.labels[index]), "meta": meta}

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_file": None}


def _read_h5(h5py, path: Path, key: str) -> np.ndarray:
    try:
        with h5py.File(path, "r") as handle:
            return np.asarray(handle[key])
    except (OSError, KeyError) as err:
        raise UnreadableFileError(
            path, f"not a PCam HDF5 file with dataset {key!r} ({err})"
        ) from err


def read_pcam(
    root: Path, image_size: int | None, *, on_error: str = "skip", max_samples=None, **_
) -> Splits:
    """PCam train/test from the .h5 files in ``root``, else from TFDS ``patch_camelyon`` there."""
    if (root / PCAM_FILE.format(split="train", xy="x")).is_file():
        return PCamH5Dataset(root, "train", image_size), PCamH5Dataset(root, "test", image_size)
    return _tfds_pair(
        "patch_camelyon",
        "label",
        ("train", "test"),
        root,
        image_size,
        False,
        max_samples,
        "downstream_dir",
    )
