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
- **Intensities in [0, 1]** the way medp2x's readers map them: integer image files are divided
  by their type's maximum (255 for 8 bit); a gray DICOM frame goes through the file's VOI LUT
  or window, else between the frame's 0.5 and 99.5 percentiles, and MONOCHROME1 is inverted
  (bone bright); colour DICOM by its bit depth; a NIfTI volume between its 1 and 99
  percentiles. Values are clipped.
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
YBR_FULL = ("YBR_FULL", "YBR_FULL_422")  # JPEG 2000 decoders return ICT/RCT data as RGB


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
        if kind == "dicom":  # the middle frame by the file's own display rules, as medp2x
            plane = render_dicom(source)
        else:
            plane = to_plane(to_unit_range(array, kind), kind, source or "<image>")
        rgb = to_three_channels(plane, self.channels, source or "<image>")
        return MetaTensor(rgb.contiguous(), meta={"filename_or_obj": source})


def to_unit_range(array: torch.Tensor, kind: str) -> torch.Tensor:
    """Values in [0, 1], float32, for an image file (integers by their type's maximum, floats
    clipped) or a whole NIfTI volume (between its 1 and 99 percentiles)."""
    if kind == "image":
        if array.is_floating_point():  # a float TIFF: assumed to be in [0, 1] already
            return array.float().clamp(0.0, 1.0)
        top = 1.0 if array.dtype == torch.bool else float(torch.iinfo(array.dtype).max)
        return (array.float() / top).clamp_(0.0, 1.0)
    values = array.double().numpy()
    finite = values[np.isfinite(values)]
    lo, hi = np.percentile(finite, PERCENTILES[kind]) if finite.size else (0.0, 0.0)
    return torch.from_numpy(_unit(values, lo, hi))


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


def render_dicom(source: str) -> torch.Tensor:
    """The middle frame of a DICOM file on [0, 1], C x H x W, rendered as medp2x's DICOM reader
    renders it: colour (and PALETTE COLOR through its LUT) by bit depth; gray through the
    modality LUT (rescale), then the file's VOI LUT or window when it has one, else between the
    frame's 0.5 and 99.5 percentiles, inverted for MONOCHROME1 (or a Presentation LUT Shape of
    INVERSE) so that bone is always bright. Decoded with pydicom here rather than taken from
    MONAI's reader, which rescales some files and not others. (Not reproduced: Pixel Padding
    Value masking and the per-frame groups of enhanced multi-frame files.)"""
    import pydicom

    try:
        from pydicom.pixels import apply_color_lut, apply_modality_lut  # pydicom >= 3
    except ImportError:  # pydicom 2 (MONAI Label's pin)
        from pydicom.pixel_data_handlers.util import apply_color_lut, apply_modality_lut
    header = pydicom.dcmread(source, force=True)
    frames = int(header.get("NumberOfFrames", 1) or 1)
    raw = header.pixel_array
    raw = raw[frames // 2] if frames > 1 else raw
    photometric = str(header.get("PhotometricInterpretation", "MONOCHROME2")).strip().upper()
    if raw.ndim == 3 and photometric in YBR_FULL and pydicom.__version__.startswith("2."):
        from pydicom.pixel_data_handlers.util import convert_color_space

        raw = convert_color_space(raw, photometric, "RGB")  # pydicom 3 does this in pixel_array
    if raw.ndim == 3:
        full_scale = 2 ** int(header.get("BitsStored", 8) or 8) - 1
        return torch.from_numpy(_unit(raw, 0.0, float(full_scale))).permute(2, 0, 1)
    if photometric == "PALETTE COLOR":
        rgb = apply_color_lut(raw, header)
        full_scale = 255 if rgb.dtype == np.uint8 else 65535
        return torch.from_numpy(_unit(rgb, 0.0, float(full_scale))).permute(2, 0, 1)
    values = np.asarray(apply_modality_lut(raw, header), dtype=np.float64)
    image = _voi(values, header)
    if image is None:
        finite = values[np.isfinite(values)]
        lo, hi = np.percentile(finite, PERCENTILES["dicom"]) if finite.size else (0.0, 0.0)
        image = _unit(values, lo, hi)
    shape = str(header.get("PresentationLUTShape", "")).strip().upper()
    if photometric == "MONOCHROME1" or (photometric == "MONOCHROME2" and shape == "INVERSE"):
        image = 1.0 - image
    return torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32)).unsqueeze(0)


def _voi(values: np.ndarray, header: Any) -> np.ndarray | None:
    """The file's VOI LUT (preferred) or first window on [0, 1]; None if it has neither."""
    try:
        from pydicom.pixels import apply_voi, apply_windowing  # pydicom >= 3
    except ImportError:  # pydicom 2 (MONAI Label's pin)
        from pydicom.pixel_data_handlers.util import apply_voi, apply_windowing
    try:
        if header.get("VOILUTSequence"):
            entries, first, _ = (int(v) for v in header.VOILUTSequence[0].LUTDescriptor)
            lut = apply_voi(np.arange(first, first + (entries or 65536)), header)
            out = apply_voi(np.rint(values).astype(np.int64), header)
            return _unit(out, float(lut.min()), float(lut.max()))
        if "WindowCenter" in header and "WindowWidth" in header:
            out = apply_windowing(values, header)
            lo, hi = apply_windowing(np.array([-np.inf, np.inf]), header)
            return _unit(out, float(lo), float(hi))
    except (ValueError, NotImplementedError, TypeError, IndexError, AttributeError):
        pass  # an unusable VOI: the percentile window instead
    return None


def _unit(values: np.ndarray, lo: float, hi: float) -> np.ndarray:
    if not hi > lo:
        return np.zeros(values.shape, dtype=np.float32)
    scaled = np.nan_to_num((values.astype(np.float64) - lo) / (hi - lo), nan=0.0)
    return np.clip(scaled, 0.0, 1.0).astype(np.float32)


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
