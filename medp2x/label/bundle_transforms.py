"""Input and label policy of a P2X classification bundle.

``medp2x export-bundle`` copies this file into the bundle as ``scripts/p2x_classification.py``,
so it may import only numpy, torch and MONAI: the bundle runs where medp2x is not installed (a
MONAI Label server, ``python -m monai.bundle run``). ``python -m monai.bundle run`` and MONAI
Label both put the bundle's folder on ``sys.path``, which makes ``scripts.*`` importable.

What an encoder pretrained by medp2x saw, and so what the bundle shows it:

- **One 2D image per file.** A NIfTI volume gives its middle axial slice (the volume is put in
  the closest canonical RAS+ orientation and the slice is shown anterior-up, as medp2x's NIfTI
  reader shows slices); a multi-frame DICOM (cine, ultrasound clip) gives its middle frame; a
  2D DICOM, PNG, JPEG, TIFF or BMP is used as is.
- **Intensities in [0, 1]** the way medp2x's readers map them: 8-bit data (any format) and
  integer image files are divided by their type's maximum (255 for 8 bit); other DICOM and
  NIfTI values, which have no fixed range, are mapped linearly between two percentiles of the
  whole file (DICOM 0.5 / 99.5, NIfTI 1 / 99: the readers' defaults) and clipped.
- **Channels**: ``gray`` bundles turn colour into ITU-R 601 luma, ``rgb`` bundles keep colour;
  both then give the network three channels (gray repeated), as an ImageNet stem expects. An
  alpha channel is dropped.
"""

from __future__ import annotations

import json
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor, NibabelReader, PILReader, PydicomReader
from monai.transforms import MapTransform

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
DICOM_SUFFIXES = (".dcm", ".dicom")
NIFTI_SUFFIXES = (".nii", ".nii.gz")
SUPPORTED_SUFFIXES = IMAGE_SUFFIXES + DICOM_SUFFIXES + NIFTI_SUFFIXES
PERCENTILES = {"dicom": (0.5, 99.5), "nifti": (1.0, 99.0)}
LUMA = (0.299, 0.587, 0.114)  # ITU-R 601, as torchvision's rgb_to_grayscale


def readers() -> list:
    """MONAI readers that return arrays in (row, column) order, as medp2x's readers do.

    MONAI's defaults transpose 2D images (``reverse_indexing``/``swap_ij``, for ITK
    compatibility); a pretrained encoder has only ever seen images the right way up."""
    return [
        NibabelReader(as_closest_canonical=True),
        PydicomReader(swap_ij=False),
        PILReader(reverse_indexing=False),
    ]


def file_kind(path: str | Path) -> str:
    """``image``, ``dicom`` or ``nifti`` from the file name; ``ValueError`` otherwise."""
    name = str(path).lower()
    if name.endswith(NIFTI_SUFFIXES):
        return "nifti"
    if name.endswith(DICOM_SUFFIXES):
        return "dicom"
    if name.endswith(IMAGE_SUFFIXES):
        return "image"
    raise ValueError(f"{path}: unsupported image file (supported: {', '.join(SUPPORTED_SUFFIXES)})")


class P2XImaged(MapTransform):
    """An image as loaded by ``LoadImaged(keys, reader=readers(), dtype=None)`` (no channel
    dimension added: each reader's own layout) becomes the float32 3 x H x W tensor in
    [0, 1] the encoder was pretrained on (policy in the module docstring)."""

    def __init__(self, keys: KeysCollection, channels: str = "rgb", allow_missing_keys=False):
        super().__init__(keys, allow_missing_keys)
        if channels not in ("gray", "rgb"):
            raise ValueError(f"channels must be 'gray' or 'rgb', not {channels!r}")
        self.channels = channels

    def __call__(self, data: Mapping[Hashable, Any]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.convert(d[key])
        return d

    def convert(self, image: torch.Tensor) -> MetaTensor:
        meta = dict(getattr(image, "meta", {}) or {})
        source = str(meta.get("filename_or_obj", "") or "")
        kind = file_kind(source) if source else "image"
        array = image.as_tensor() if isinstance(image, MetaTensor) else torch.as_tensor(image)
        unit = to_unit_range(array, kind)
        plane = to_plane(unit, kind, source or "<image>")
        rgb = to_three_channels(plane, self.channels, source or "<image>")
        return MetaTensor(rgb.contiguous(), meta={"filename_or_obj": source})


def to_unit_range(array: torch.Tensor, kind: str) -> torch.Tensor:
    """Values in [0, 1], float32, over the whole file: 8-bit data and integer image files by
    their type's maximum; other DICOM and NIfTI data between the file's percentiles (a constant
    image gives zeros); float image files clipped."""
    if array.dtype == torch.uint8 or (kind == "image" and not array.is_floating_point()):
        top = 1.0 if array.dtype == torch.bool else float(torch.iinfo(array.dtype).max)
        return (array.float() / top).clamp_(0.0, 1.0)
    values = array.double()
    if kind == "image":  # a float TIFF: assumed to be in [0, 1] already
        return values.float().clamp_(0.0, 1.0)
    finite = values[torch.isfinite(values)]
    if finite.numel() == 0:
        return torch.zeros_like(values, dtype=torch.float32)
    lo, hi = np.percentile(finite.numpy(), PERCENTILES[kind])
    if not hi > lo:
        return torch.zeros_like(values, dtype=torch.float32)
    scaled = ((values - lo) / (hi - lo)).nan_to_num_(0.0)
    return scaled.clamp_(0.0, 1.0).float()


def to_plane(array: torch.Tensor, kind: str, source: str) -> torch.Tensor:
    """C x H x W from each reader's layout, keeping one plane of a volume or clip.

    - image files (Pillow, row-major): H x W or H x W x C;
    - DICOM (pydicom's layout): H x W, H x W x 3, frames x H x W, frames x H x W x 3:
      the middle frame;
    - NIfTI (canonical RAS+): X x Y, X x Y x Z, X x Y x Z x volumes...: the first volume's
      middle axial slice, shown anterior-up (rows from anterior to posterior)."""
    if kind == "nifti":
        volume = array[(...,) + (0,) * (array.ndim - 3)] if array.ndim > 3 else array
        plane = volume[..., volume.shape[-1] // 2] if volume.ndim == 3 else volume
        return plane.transpose(0, 1).flip(0).unsqueeze(0)  # medp2x's display_orientation
    colour = array.ndim == 3 and array.shape[-1] in (3, 4)
    if (kind == "dicom" and array.ndim == 3 and not colour) or array.ndim == 4:
        array = array[array.shape[0] // 2]  # the middle frame
    if array.ndim == 2:
        return array.unsqueeze(0)
    if array.ndim == 3 and array.shape[-1] in (1, 2, 3, 4):
        return array.permute(2, 0, 1)
    raise ValueError(
        f"{source}: cannot read a 2D image from an array of shape {tuple(array.shape)}"
    )


def to_three_channels(image: torch.Tensor, channels: str, source: str) -> torch.Tensor:
    """Three channels for the ImageNet stem: gray repeated, colour kept (``rgb``) or turned
    into luma first (``gray``); an alpha channel dropped."""
    have = image.shape[0]
    if have in (2, 4):  # gray + alpha, RGBA
        image, have = image[: have - 1], have - 1
    if have not in (1, 3):
        raise ValueError(f"{source}: {have} channels; expected gray or RGB")
    if have == 3 and channels == "gray":
        weights = torch.tensor(LUMA, dtype=image.dtype).view(3, 1, 1)
        image = (image * weights).sum(0, keepdim=True)
    return image.expand(3, *image.shape[1:]) if image.shape[0] == 1 else image


# ---------------------------------------------------------------------------------- labels


class ClassLabeld(MapTransform):
    """A class label given as an index, a class name, or a label file holding either (the
    way MONAI Label stores annotations: one file per image), as an int64 scalar tensor.

    A label file is plain text (``pneumonia``) or JSON (``{"label": "pneumonia"}``)."""

    def __init__(self, keys: KeysCollection, classes: Sequence[str], allow_missing_keys=False):
        super().__init__(keys, allow_missing_keys)
        self.classes = [str(c) for c in classes]

    def __call__(self, data: Mapping[Hashable, Any]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = torch.tensor(self.index(d[key]), dtype=torch.long)
        return d

    def index(self, label: Any, source: str | None = None) -> int:
        if isinstance(label, torch.Tensor | np.ndarray | np.generic):
            label = label.item() if np.size(label) == 1 else label.tolist()
        if isinstance(label, float) and label.is_integer():
            label = int(label)
        if isinstance(label, bool):
            raise ValueError(f"{source or 'label'}: a boolean is not a class label")
        if isinstance(label, int | np.integer):
            if not 0 <= int(label) < len(self.classes):
                raise ValueError(
                    f"{source or 'label'}: class index {label} outside 0..{len(self.classes) - 1}"
                )
            return int(label)
        if isinstance(label, str):
            text = label.strip()
            if text in self.classes:
                return self.classes.index(text)
            if text.lstrip("-").isdigit():
                return self.index(int(text), source)
            if source is None and Path(text).is_file():
                return self.index(read_label_file(text), text)
            where = source or "label"
            raise ValueError(
                f"{where}: {text!r} is not one of the bundle's classes ({', '.join(self.classes)})"
                + ("" if source else " nor a label file")
            )
        raise ValueError(
            f"{source or 'label'}: cannot read a class label from {type(label).__name__}"
        )


def read_label_file(path: str | Path) -> Any:
    """The label in a label file: a JSON object's ``label`` (or ``class``), else the text."""
    text = Path(path).read_text(encoding="utf-8").strip()
    if text.startswith("{"):
        try:
            content = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: not valid JSON ({err.msg}, line {err.lineno})") from None
        for key in ("label", "class"):
            if key in content:
                return content[key]
        raise ValueError(f"{path}: JSON label file without a 'label' entry")
    return text


# ---------------------------------------------------------------------------------- datalists


def image_files(path: str | Path) -> list[dict]:
    """``[{"image": file}]`` for one image file or every supported file under a folder
    (recursively, sorted): the inference input."""
    path = Path(path)
    if path.is_file():
        return [{"image": str(path)}]
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such image file or folder (input_dir)")
    files = sorted(
        p for p in path.rglob("*") if p.is_file() and p.name.lower().endswith(SUPPORTED_SUFFIXES)
    )
    if not files:
        raise ValueError(f"{path}: no image files ({', '.join(SUPPORTED_SUFFIXES)})")
    return [{"image": str(p)} for p in files]


def labelled_files(path: str | Path, classes: Sequence[str]) -> list[dict]:
    """``[{"image": file, "label": label}]`` for fine-tuning, from

    - a JSON datalist: a list of ``{"image", "label"}`` records or MONAI's
      ``{"training": [...]}`` (relative paths from the JSON's folder);
    - a MONAI Label studies folder: images, and ``labels/final/<image name>.<ext>`` label files;
    - a folder with one sub-folder of images per class, named after the class.
    """
    path = Path(path)
    if path.is_file():
        return _json_datalist(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such datalist file or folder (dataset_dir)")
    final = path / "labels" / "final"
    if final.is_dir():
        return _datastore_datalist(path, final)
    found = [c for c in classes if (path / c).is_dir()]
    if not found:
        raise ValueError(
            f"{path}: neither a MONAI Label studies folder (labels/final/) nor a folder with "
            f"one sub-folder per class ({', '.join(classes)})"
        )
    records = [
        {"image": item["image"], "label": name}
        for name in found
        for item in image_files(path / name)
    ]
    return records


def _json_datalist(path: Path) -> list[dict]:
    content = json.loads(path.read_text(encoding="utf-8"))
    records = content.get("training") if isinstance(content, dict) else content
    if not isinstance(records, list) or not all(
        isinstance(r, dict) and "image" in r and "label" in r for r in records
    ):
        raise ValueError(f"{path}: expected a list of {{'image', 'label'}} records")
    root = path.parent
    out = []
    for record in records:
        image = Path(record["image"])
        label = record["label"]
        if isinstance(label, str) and not Path(label).is_absolute() and (root / label).is_file():
            label = str(root / label)
        out.append({"image": str(image if image.is_absolute() else root / image), "label": label})
    return out


def _datastore_datalist(root: Path, final: Path) -> list[dict]:
    labels = {_stem(p): p for p in final.iterdir() if p.is_file()}
    records = [
        {"image": str(p), "label": str(labels[_stem(p)])}
        for p in sorted(root.iterdir())
        if p.is_file() and p.name.lower().endswith(SUPPORTED_SUFFIXES) and _stem(p) in labels
    ]
    if not records:
        raise ValueError(f"{root}: no image has a label in {final}")
    return records


def _stem(path: Path) -> str:
    name = path.name
    for suffix in sorted(SUPPORTED_SUFFIXES + (".txt", ".json"), key=len, reverse=True):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return path.stem
