"""Image folders and CSV manifests (JPEG, PNG, TIFF, BMP), gray or RGB, 8 or 16 bit.

Two layouts are read by ``ImageFolderDataset``: class-per-folder (``root/<class>/**/img``,
labels are the indices of the sorted class-folder names) and a flat unlabelled folder
(``root/**/img`` with no class folders, label -1). ``CSVManifestDataset`` reads a CSV with a
``path`` column and an optional ``label`` column.

Decoding is lazy (a folder may hold 10^5 images). In ``on_error="skip"`` mode an unreadable
image cannot be dropped from the index once a sampler has drawn it, so ``__getitem__`` records
it in ``self.skipped`` and returns the next readable image instead (its own label, and
``meta["skipped"]`` counting the files passed over). The epoch keeps its length; the
replacement appears twice. Skips found in DataLoader worker processes are logged by the worker;
``medp2x scan`` lists them all before a run.
"""

from __future__ import annotations

import csv
import logging
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError
from torch.utils.data import Dataset

from medp2x.data.base import (
    SkipLog,
    SkipUnreadable,
    UnreadableFileError,
    capped_shape,
    check_on_error,
    check_pixel_budget,
    check_resize,
    existing_path,
    handle_bad_file,
    resize_to,
    walk_tree,
)
from medp2x.data.readers import IMAGE_SUFFIXES

logger = logging.getLogger("medp2x.data")

IMAGE_EXTENSIONS = IMAGE_SUFFIXES  # the folder reader's suffixes (medp2x.data.readers)
LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)  # ITU-R BT.601, as PIL's "L"


class ImageFileDataset(SkipUnreadable, Dataset):
    """Samples from a list of (image file, label): the decoding shared by folders and CSVs.

    ``image_size`` and ``resize`` size the images (``base.resize_to``): ``"cap"`` for
    pretraining keeps each image's aspect and resolution up to a shorter side of
    ``image_size`` (JPEGs are then decoded at the smallest DCT scale that still covers it).
    """

    def __init__(
        self,
        items: Sequence[tuple[Path, int]],
        gray: bool = False,
        image_size: int | None = None,
        on_error: str = "raise",
        classes: list[str] | None = None,
        resize: str = "square",
    ):
        self.items = list(items)
        self.gray, self.image_size, self.resize = gray, image_size, check_resize(resize)
        self.on_error = check_on_error(on_error)
        self.classes = classes
        self.skipped = SkipLog()

    def __len__(self) -> int:
        return len(self.items)

    def load(self, index: int) -> dict:
        """Sample ``index`` without the skip policy: raises ``UnreadableFileError``."""
        path, label = self.items[index]
        cap = self.image_size if self.resize == "cap" else None
        pixels, (height, width) = read_source(path, cap)
        image = resize_to(to_tensor(pixels, self.gray), self.image_size, self.resize)
        meta = {
            "path": str(path), "dtype": str(pixels.dtype), "height": int(height),
            "width": int(width), "skipped": 0,
        }  # fmt: skip
        return {"image": image, "label": int(label), "meta": meta}

    @property
    def files(self) -> list[Path]:
        return [path for path, _ in self.items]

    @property
    def num_classes(self) -> int:
        return len(self.classes) if self.classes else 0


class ImageFolderDataset(ImageFileDataset):
    """A class-per-folder tree (``root/<class>/...``) or a flat unlabelled folder.

    Class folders are the sub-folders of ``root`` that hold images (at any depth); ``classes``
    lists their sorted names and labels index it. Images directly in ``root`` beside class
    folders are ignored with a warning. Without class folders every image under ``root`` is a
    sample with label -1. Hidden files and folders (".name") are ignored.
    """

    def __init__(
        self,
        root: str | Path,
        gray: bool = False,
        image_size: int | None = None,
        on_error: str = "raise",
        extensions: Sequence[str] = IMAGE_EXTENSIONS,
        resize: str = "square",
    ):
        self.root = existing_path(root, "image folder")
        if not self.root.is_dir():
            raise ValueError(f"image folder {str(self.root)!r} is not a folder")
        exts = tuple(e.lower() if e.startswith(".") else f".{e.lower()}" for e in extensions)
        class_dirs = [d for d in sorted(self.root.iterdir()) if d.is_dir() and _visible(d)]
        problems: list[tuple[str, str]] = []  # dangling links, link loops, unlistable folders
        per_class = {d.name: _images_under(d, exts, problems) for d in class_dirs}
        per_class = {name: files for name, files in per_class.items() if files}
        top_level = [f for f in sorted(self.root.iterdir()) if _is_image(f, exts)]
        problems += [
            (str(f), "dangling symbolic link (its target does not exist)")
            for f in sorted(self.root.iterdir())
            if f.is_symlink() and not f.exists() and f.name.lower().endswith(exts)
        ]
        if per_class:
            if top_level:
                logger.warning(
                    "%s: %d image(s) beside class folders ignored", self.root, len(top_level)
                )
            classes = sorted(per_class)
            items = [(f, label) for label, c in enumerate(classes) for f in per_class[c]]
        else:
            classes, items = None, [(f, -1) for f in top_level]
        if not items:
            raise ValueError(f"no {'/'.join(exts)} images under {self.root}")
        skipped = SkipLog()
        for path, reason in problems:
            handle_bad_file(path, reason, check_on_error(on_error), skipped)
        super().__init__(items, gray, image_size, on_error, classes, resize)
        self.skipped = skipped


class CSVManifestDataset(ImageFileDataset):
    """Images listed in a CSV with a header: ``path`` (required) and ``label`` (optional).

    Relative paths are taken from ``root`` (default: the CSV's folder). Integer labels are
    kept; any other labels are mapped to the indices of their sorted names (``classes``). An
    empty label is -1 (unlabelled). Listed files that do not exist are bad files at once.
    """

    def __init__(
        self,
        csv_path: str | Path,
        root: str | Path | None = None,
        gray: bool = False,
        image_size: int | None = None,
        on_error: str = "raise",
        resize: str = "square",
    ):
        self.csv_path = existing_path(csv_path, "CSV manifest")
        base = existing_path(root, "image root") if root is not None else self.csv_path.parent
        on_error = check_on_error(on_error)
        rows = _read_manifest(self.csv_path)
        labels, classes = _encode_labels([label for _, label in rows])
        items, skipped = [], SkipLog()
        for (rel, _), label in zip(rows, labels, strict=True):
            path = Path(rel).expanduser()
            path = path if path.is_absolute() else base / path
            if path.is_file():
                items.append((path, label))
            else:
                handle_bad_file(
                    path, f"listed in {self.csv_path.name} but missing", on_error, skipped
                )
        if not items:
            raise ValueError(f"{self.csv_path}: no existing image files listed")
        super().__init__(items, gray, image_size, on_error, classes, resize)
        self.skipped = skipped


# ---------------------------------------------------------------------- listing
def _visible(path: Path) -> bool:
    return not path.name.startswith(".")


def _is_image(path: Path, exts: tuple[str, ...]) -> bool:
    return path.is_file() and _visible(path) and path.name.lower().endswith(exts)


def _images_under(folder: Path, exts: tuple[str, ...], problems: list | None = None) -> list[Path]:
    return walk_tree(
        folder,
        lambda p: (
            _visible(p)
            and p.name.lower().endswith(exts)
            and not any(part.startswith(".") for part in p.relative_to(folder).parts)
        ),
        problems,
    )


def _read_manifest(csv_path: Path) -> list[tuple[str, str]]:
    with open(csv_path, newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        columns = {name.strip().lower(): name for name in reader.fieldnames or []}
        if "path" not in columns:
            raise ValueError(
                f"{csv_path}: needs a header with a 'path' column (found: {', '.join(columns) or 'none'})"
            )
        path_col, label_col = columns["path"], columns.get("label")
        rows = []
        for row in reader:
            rel = (row.get(path_col) or "").strip()
            if rel:
                rows.append((rel, (row.get(label_col) or "").strip() if label_col else ""))
    return rows


def _encode_labels(raw: list[str]) -> tuple[list[int], list[str] | None]:
    """Integer labels as they are; string labels as sorted-name indices; empty as -1."""
    given = [r for r in raw if r != ""]
    if not given:
        return [-1] * len(raw), None
    try:
        ints = [int(r) if r != "" else -1 for r in raw]
        return ints, [str(i) for i in range(max(ints) + 1)]
    except ValueError:
        classes = sorted(set(given))
        lookup = {name: i for i, name in enumerate(classes)}
        return [lookup[r] if r != "" else -1 for r in raw], classes


# ---------------------------------------------------------------------- decoding
def read_image(path: str | Path) -> np.ndarray:
    """Pixels of one image file as H x W (gray) or H x W x 3 (colour), in the file's dtype.

    TIFFs are read with tifffile first, because Pillow silently reduces 16-bit RGB TIFFs to
    8 bit; Pillow decodes the codecs tifffile lacks without imagecodecs (LZW, JPEG).
    """
    return read_source(path)[0]


def read_source(path: str | Path, cap: int | None = None) -> tuple[np.ndarray, tuple[int, int]]:
    """``read_image``'s pixels and the image's own (H, W) as displayed. With ``cap`` (the
    pretraining source size) a JPEG may be decoded at a reduced scale, libjpeg's DCT scaling
    by 1/2, 1/4 or 1/8 (a faster decode, already low-passed), that still covers
    ``capped_shape(H, W, cap)``: a 3000 px radiograph is never decoded whole to be shrunk."""
    path = Path(path)
    try:
        if path.stat().st_size == 0:
            raise UnreadableFileError(path, "empty file (0 bytes)")
    except OSError as err:
        raise UnreadableFileError(path, f"cannot access: {err}") from err
    if path.suffix.lower() in (".tif", ".tiff"):
        pixels = _read_tiff(path)
        if pixels is not None:
            pixels = _standard_layout(path, pixels)
            return pixels, (int(pixels.shape[0]), int(pixels.shape[1]))
    pixels, size = _read_pil(path, cap)
    return _standard_layout(path, pixels), size


def _read_tiff(path: Path) -> np.ndarray | None:
    """The TIFF's one 2-D image (grey or with samples), or None when tifffile cannot decode it
    (Pillow then tries). The declared size is checked against the pixel budget first, and a
    stack (a 3-D or 4-D TIFF: several planes in its first series) is refused, not read as
    its first plane."""
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            series = tif.series[0]
            planes = math.prod(
                n for n, a in zip(series.shape, series.axes, strict=True) if a not in "YXS"
            )
            if planes > 1:
                raise UnreadableFileError(
                    path,
                    f"a stack of {planes} images (TIFF axes {series.axes}, shape "
                    f"{tuple(series.shape)}); only single 2-D images are read",
                )
            page = tif.pages[0]
            check_pixel_budget(path, page.shape)
            return page.asarray()
    except UnreadableFileError:
        raise
    except MemoryError:
        raise
    except Exception:  # tifffile raises many types (codec missing, damaged IFDs): let PIL try
        return None


def _read_pil(path: Path, cap: int | None = None) -> tuple[np.ndarray, tuple[int, int]]:
    try:
        with Image.open(path) as image:  # reads the header only
            if cap is not None and image.format == "JPEG":
                size = _displayed_size(image)  # a JPEG's EXIF is in its header
                height, width = capped_shape(image.height, image.width, cap)
                image.draft(image.mode, (width, height))  # never below the requested size
            # the size that will be decoded (a JPEG's draft scale included), before decoding
            # anything: a PNG's EXIF may sit after its pixels, so its size is read after this
            check_pixel_budget(path, (image.height, image.width, len(image.getbands())))
            if cap is None or image.format != "JPEG":
                size = _displayed_size(image)
            image = ImageOps.exif_transpose(image)  # camera photos: pixels as the user sees them
            return _pil_pixels(image), size
    except UnreadableFileError:
        raise
    except UnidentifiedImageError as err:
        raise UnreadableFileError(
            path, "not an image Pillow can identify (wrong format or damaged)"
        ) from err
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        raise UnreadableFileError(path, f"cannot decode ({err})") from err


def _displayed_size(image: Image.Image) -> tuple[int, int]:
    """(H, W) after the EXIF orientation is applied (orientations 5-8 swap the sides)."""
    swapped = image.getexif().get(ExifTags.Base.Orientation, 1) in (5, 6, 7, 8)
    return (image.width, image.height) if swapped else (image.height, image.width)


def _pil_pixels(image: Image.Image) -> np.ndarray:
    mode = image.mode
    if mode.startswith("I;16"):
        return np.asarray(image).astype(np.uint16)
    if mode == "I":  # Pillow's 32-bit mode holds 16-bit PNG/PGM data: keep it as 16 bit
        return np.clip(np.asarray(image), 0, 65535).astype(np.uint16)
    if mode == "F":
        return np.asarray(image, dtype=np.float32)
    if mode in ("1", "L", "LA", "La"):
        return np.asarray(image.convert("L"))
    return np.asarray(image.convert("RGB"))  # P, RGBA, CMYK, YCbCr, LAB, HSV, ...


def _standard_layout(path: Path, pixels: np.ndarray) -> np.ndarray:
    """H x W or H x W x 3 (alpha dropped, planar TIFF transposed, 1-channel squeezed)."""
    if pixels.ndim == 3 and pixels.shape[0] in (1, 3, 4) and pixels.shape[-1] not in (1, 3, 4):
        pixels = pixels.transpose(1, 2, 0)
    if pixels.ndim == 3 and pixels.shape[-1] == 1:
        pixels = pixels[..., 0]
    if pixels.ndim == 3 and pixels.shape[-1] == 4:
        pixels = pixels[..., :3]
    if pixels.ndim == 3 and pixels.shape[-1] == 2:  # gray + alpha
        pixels = pixels[..., 0]
    if pixels.ndim not in (2, 3) or (pixels.ndim == 3 and pixels.shape[-1] != 3):
        raise UnreadableFileError(
            path, f"unsupported image shape {pixels.shape} (not 2-D gray or RGB)"
        )
    if pixels.size == 0:
        raise UnreadableFileError(path, "image has no pixels")
    if pixels.dtype.kind not in "uifb":
        raise UnreadableFileError(path, f"unsupported pixel type {pixels.dtype}")
    if pixels.dtype.kind == "f" and not np.isfinite(pixels).any():
        raise UnreadableFileError(path, "every pixel is NaN or infinite (no image content)")
    return pixels


def to_tensor(pixels: np.ndarray, gray: bool) -> torch.Tensor:
    """H x W [x 3] pixels -> float32 C x H x W in [0, 1] (C = 1 if gray else 3).

    Integers are divided by their dtype's maximum (a 12-bit image in a 16-bit file stays
    dark: ``medp2x scan`` shows such ranges); floats are clipped to [0, 1].
    """
    if pixels.dtype == np.bool_:
        values = pixels.astype(np.float32)
    elif pixels.dtype.kind in "ui":
        values = np.clip(pixels.astype(np.float32) / np.iinfo(pixels.dtype).max, 0.0, 1.0)
    else:
        values = np.clip(np.nan_to_num(pixels.astype(np.float32)), 0.0, 1.0)
    if values.ndim == 2:
        values = values[None]
        return torch.from_numpy(np.ascontiguousarray(values if gray else np.repeat(values, 3, 0)))
    if gray:
        return torch.from_numpy(np.ascontiguousarray((values @ LUMA)[None]))
    return torch.from_numpy(np.ascontiguousarray(values.transpose(2, 0, 1)))
