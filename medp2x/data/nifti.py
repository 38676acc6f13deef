"""NIfTI MRI volumes as 2D slices (nibabel), with an optional TorchIO MRI augmentation.

Volumes are put in the closest canonical (RAS+) orientation, so that ``axis=2`` means axial
slices whatever the scanner wrote; slices with too little foreground (air above the head)
are left out; intensities are mapped to [0, 1] between robust percentiles computed once per
volume over its foreground. The index keeps per volume only its window and the numbers of
the kept slices: a pass over each volume at start-up, nothing voxel-sized afterwards.

A slice is shown the usual way: for an axial slice rows run anterior (top) to posterior and
columns from the patient's left to right in index order (RAS: right is larger x), for coronal
and sagittal slices superior is at the top.
"""

from __future__ import annotations

import fnmatch
import gzip
import logging
import zlib
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from nibabel.orientations import apply_orientation, io_orientation
from skimage.filters import threshold_otsu
from torch.utils.data import Dataset as TorchDataset

from medp2x.data.base import (
    OnError,
    SkipLog,
    SkipUnreadable,
    UnreadableFileError,
    check_on_error,
    check_pixel_budget,
    check_resize,
    existing_path,
    handle_bad_file,
    resize_to,
    walk_tree,
)
from medp2x.data.intensity import percentile_window, scale_to_unit, to_sample_tensor
from medp2x.data.readers import NIFTI_SUFFIXES

logger = logging.getLogger("medp2x.data.nifti")

FOREGROUND_RULES = ("robust", "otsu", "nonzero")
AUGMENTATION_PROFILES = ("light", "strong")
MaskRule = str | Path | Sequence[str] | None


@dataclass(frozen=True)
class VolumeEntry:
    """One 3D volume in the index: where it is, its intensity window, the kept slices."""

    path: Path
    volume: int  # index along the 4th dimension (0 for 3D files)
    lo: float
    hi: float
    slices: np.ndarray  # canonical indices along ``axis`` with enough foreground
    compressed: bool


# --------------------------------------------------------------------------- files and masks


def find_nifti_files(root: str | Path, problems: list | None = None) -> list[Path]:
    """``.nii`` and ``.nii.gz`` files under ``root`` (itself if a file), sorted; dangling
    links, link loops and unlistable folders go to ``problems`` (``base.walk_tree``)."""
    root = existing_path(root, "NIfTI root")
    if root.is_file():
        return [root]
    return walk_tree(
        root,
        lambda p: not p.name.startswith(".") and p.name.lower().endswith(NIFTI_SUFFIXES),
        problems,
    )


def _stem(path: Path) -> str:
    name = path.name
    return name[: -len(".nii.gz")] if name.lower().endswith(".nii.gz") else path.stem


def pair_masks(files: list[Path], mask: MaskRule) -> dict[Path, Path | None]:
    """Images (masks removed) mapped to their mask file, following the ``mask`` rule:

    - ``None``: no masks;
    - a pattern with ``*`` (``"*_mask.nii.gz"``): the image's name without ``.nii[.gz]``
      replaces ``*``, in the image's folder; every file matching the pattern is a mask;
    - a pair ``(old, new)`` (``("hd_bet_", "hd_bet_mask_")``): the mask's name is the image's
      with ``old`` replaced by ``new``;
    - the path of one mask volume used for every image (a template brain mask).
    A missing mask is reported when the image is indexed.
    """
    if mask is None:
        return dict.fromkeys(files)
    if isinstance(mask, (list, tuple)):
        if len(mask) != 2 or not all(isinstance(part, str) and part for part in mask):
            raise ValueError(f"a mask rule pair must be two non-empty strings, not {mask!r}")
        old, new = mask
        pairs = {f: f.with_name(f.name.replace(old, new, 1)) for f in files if old in f.name}
        mask_files = {m for m in pairs.values() if m in set(files)}
    elif "*" in str(mask):
        pattern = str(mask)
        pairs = {f: f.with_name(pattern.replace("*", _stem(f))) for f in files}
        mask_files = {f for f in files if fnmatch.fnmatch(f.name, pattern)}
    else:
        single = existing_path(mask, "mask")
        return {f: single for f in files if f.resolve() != single.resolve()}
    return {f: pairs.get(f) for f in files if f not in mask_files}


# --------------------------------------------------------------------------- reading


def _load_header(path: Path) -> nib.Nifti1Image:
    try:
        size = path.stat().st_size
    except OSError as error:
        raise UnreadableFileError(path, f"cannot open file ({error.strerror})") from None
    if size == 0:
        raise UnreadableFileError(path, "empty file (0 bytes)")
    try:
        image = nib.load(path)
    except Exception as error:  # nibabel's messages vary by failure; the class suffices
        reason = f"not a NIfTI file or corrupt header ({type(error).__name__})"
        raise UnreadableFileError(path, reason) from None
    if not isinstance(image, nib.Nifti1Image | nib.Nifti2Image):
        raise UnreadableFileError(path, f"not a NIfTI image ({type(image).__name__})")
    header_size = image.header.sizeof_hdr
    offset = int(image.dataobj.offset)
    if path.name.lower().endswith(NIFTI_SUFFIXES) and offset < header_size:
        # a single-file NIfTI stores its voxels after the header: an offset inside it would
        # read the header's own bytes as voxels (nibabel does not object)
        reason = f"corrupt header (voxel data offset {offset} inside the {header_size}-byte header)"
        raise UnreadableFileError(path, reason)
    dtype = image.get_data_dtype()
    if dtype.fields is not None or np.iscomplexobj(np.zeros(0, dtype)):
        raise UnreadableFileError(path, f"unsupported voxel type {dtype} (RGB or complex)")
    return image


def _spatial_shape_and_volumes(path: Path, image: nib.Nifti1Image) -> tuple[tuple, int]:
    shape = image.shape
    while len(shape) > 4 and shape[-1] == 1:  # e.g. (x, y, z, 1, 1)
        shape = shape[:-1]
    if len(shape) not in (3, 4):
        raise UnreadableFileError(path, f"{len(shape)}D image; only 3D and 4D are read")
    check_pixel_budget(path, shape[:3], "volume")  # one volume is read at a time
    if len(shape) == 4 and shape[3] < 1:
        raise UnreadableFileError(path, f"4D image of declared size {shape} has no volumes")
    return shape[:3], (shape[3] if len(shape) == 4 else 1)


def verify_gzip_stream(path: Path, image: nib.Nifti1Image) -> None:
    """Decompress a ``.nii.gz`` to its end so that gzip checks its CRC-32 and length.

    nibabel reads only the bytes the header asks for and never reaches the gzip trailer, so a
    damaged stream would be read with wrong voxels and no error. Streamed in 1 MiB chunks (no
    memory), and stopped when the stream holds far more than the header declares (a gzip
    bomb behind a small image)."""
    declared = (
        int(image.dataobj.offset) + int(np.prod(image.shape)) * image.get_data_dtype().itemsize
    )
    limit, total = declared + (64 << 20), 0
    try:
        with gzip.open(path, "rb") as stream:
            while chunk := stream.read(1 << 20):
                total += len(chunk)
                if total > limit:
                    raise UnreadableFileError(
                        path,
                        f"gzip stream holds more than {limit:,} bytes; the header declares {declared:,}",
                    )
    except EOFError:
        raise UnreadableFileError(
            path, "truncated or corrupt image data (the gzip stream ends early)"
        ) from None
    except (gzip.BadGzipFile, zlib.error, OSError) as error:
        reason = str(error) if isinstance(error, gzip.BadGzipFile) else type(error).__name__
        raise UnreadableFileError(path, f"corrupt gzip stream ({reason})") from None


def _read_data(path: Path, image: nib.Nifti1Image, slicer: tuple) -> np.ndarray:
    """Voxels through nibabel's proxy (scaling applied), NaN/inf made finite."""
    try:
        data = np.asanyarray(image.dataobj[slicer], dtype=np.float32)
    except MemoryError:
        raise
    except Exception as error:
        reason = f"truncated or corrupt image data ({type(error).__name__})"
        raise UnreadableFileError(path, reason) from None
    finite = np.isfinite(data)
    if not finite.all():
        if not finite.any():
            raise UnreadableFileError(path, "every voxel is NaN or infinite (no image content)")
        # a copy: an uncompressed float32 file arrives as nibabel's read-only memory map
        data = np.nan_to_num(data, nan=0.0, posinf=0.0, neginf=0.0)
    return np.asarray(data)


def _volume_slicer(image: nib.Nifti1Image, volume: int) -> tuple:
    extra = len(image.shape) - 3
    return (slice(None),) * 3 + ((volume,) + (0,) * (extra - 1) if extra else ())


def read_canonical_volume(path: str | Path, volume: int = 0) -> np.ndarray:
    """One 3D volume in closest-canonical (RAS+) voxel order, float32 — what
    ``nibabel.as_closest_canonical`` gives, without loading the other volumes of a 4D file."""
    path = Path(path)
    image = _load_header(path)
    data = _read_data(path, image, _volume_slicer(image, volume))
    return apply_orientation(data, io_orientation(image.affine))


def read_canonical_slice(path: str | Path, volume: int, axis: int, index: int) -> np.ndarray:
    """One canonical slice (the 2D array over the two other canonical axes, in order),
    reading only that slab of the file: the canonical axis maps to one file axis, maybe
    flipped, so the slab is found in the file's own voxel order and then reoriented."""
    path = Path(path)
    image = _load_header(path)
    orientation = io_orientation(image.affine)
    file_axis = int(np.flatnonzero(orientation[:, 0] == axis)[0])
    length = image.shape[file_axis]
    file_index = length - 1 - index if orientation[file_axis, 1] < 0 else index
    slicer = list(_volume_slicer(image, volume))
    slicer[file_axis] = slice(file_index, file_index + 1)
    slab = apply_orientation(_read_data(path, image, tuple(slicer)), orientation)
    return slab[(slice(None),) * axis + (0,)]


def display_orientation(plane: np.ndarray) -> np.ndarray:
    """A canonical plane (a, b) as an image: rows = b from high to low (anterior or
    superior at the top), columns = a."""
    return np.ascontiguousarray(np.flipud(plane.T))


def foreground_mask(volume: np.ndarray, rule: str | float) -> np.ndarray:
    """Voxels that count as foreground, by ``rule``:

    - ``"robust"``: above p2 + 10% of (p98 - p2), FSL BET's background threshold (Smith
      2002); works on raw scans with a noisy background and on skull-stripped ones;
    - ``"otsu"``: above Otsu's threshold (fails on heavy-tailed volumes such as b0 maps);
    - ``"nonzero"``: non-zero voxels (skull-stripped or registered volumes);
    - a number: above that intensity.
    """
    if rule == "nonzero":
        return volume != 0
    if volume.max() <= volume.min():
        return np.zeros(volume.shape, dtype=bool)
    step = max(1, round((volume.size / 2_000_000) ** (1 / 3)))  # ~2M voxels: enough for
    sample = volume[::step, ::step, ::step]  # a threshold, and no copy of the whole volume
    if rule == "robust":
        p2, p98 = np.percentile(sample, (2, 98))
        return volume > p2 + 0.1 * (p98 - p2)
    if rule == "otsu":
        return volume > threshold_otsu(sample)
    return volume > float(rule)


# --------------------------------------------------------------------------- augmentation


def mri_augmentation(profile: str = "light"):
    """A TorchIO pipeline of cheap MRI artefacts for [0, 1] images, applied to a slice as a
    1 x H x W x 1 tensor (TorchIO's C x W x H x D): bias field, gamma, noise, and in the
    ``"strong"`` profile motion ghosts. Its output is clipped back to [0, 1] by the reader."""
    import torchio as tio

    if profile == "light":
        transforms = [
            tio.RandomBiasField(coefficients=0.3, order=3, p=0.5),
            tio.RandomGamma(log_gamma=(-0.2, 0.2), p=0.5),
            tio.RandomNoise(std=(0.0, 0.02), p=0.3),
        ]
    elif profile == "strong":
        transforms = [
            tio.RandomBiasField(coefficients=0.5, order=3, p=0.7),
            tio.RandomGamma(log_gamma=(-0.3, 0.3), p=0.7),
            tio.RandomNoise(std=(0.0, 0.05), p=0.5),
            tio.RandomMotion(degrees=5, translation=5, num_transforms=2, p=0.2),
        ]
    else:
        raise ValueError(f"profile must be one of {AUGMENTATION_PROFILES}, not {profile!r}")
    return tio.Compose(transforms)


# --------------------------------------------------------------------------- dataset


class NiftiSliceDataset(SkipUnreadable, TorchDataset):
    """2D slices along canonical ``axis`` (0 sagittal, 1 coronal, 2 axial) of the NIfTI
    volumes under ``root``, as samples ``{"image": 1 x H x W, "label": -1, "meta"}``.

    ``min_foreground``: the fraction of a slice that must be foreground (``mask`` if given,
    else the ``foreground`` rule) for it to be kept; ``percentiles``: the per-volume window,
    computed over foreground voxels; ``volume_index``: for 4D files, None takes every volume,
    an int only that one; ``augment``: a profile of :func:`mri_augmentation` or a callable on
    a 1 x H x W x 1 tensor; ``cache_volumes``: how many decompressed ``.nii.gz`` volumes
    each process keeps (slices of an uncompressed ``.nii`` are read alone); ``image_size``
    and ``resize`` size the slices (``base.resize_to``: ``"cap"`` for pretraining keeps the
    voxel grid up to a shorter side of ``image_size``).
    """

    def __init__(
        self,
        root: str | Path,
        axis: int = 2,
        min_foreground: float = 0.1,
        mask: MaskRule = None,
        percentiles: tuple[float, float] = (1.0, 99.0),
        image_size: int | Sequence[int] | None = None,
        volume_index: int | None = None,
        on_error: OnError = "raise",
        augment: str | Callable[[torch.Tensor], torch.Tensor] | None = None,
        foreground: str | float = "robust",
        channels: int = 1,
        cache_volumes: int = 1,
        resize: str = "square",
    ):
        if axis not in (0, 1, 2):
            raise ValueError(f"axis must be 0, 1 or 2, not {axis!r}")
        if not 0.0 <= min_foreground <= 1.0:
            raise ValueError(f"min_foreground must be in [0, 1], not {min_foreground!r}")
        if isinstance(foreground, str) and foreground not in FOREGROUND_RULES:
            raise ValueError(f"foreground must be one of {FOREGROUND_RULES} or a number")
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, not {channels!r}")
        if volume_index is not None and volume_index < 0:
            raise ValueError(f"volume_index must be None or >= 0, not {volume_index!r}")
        percentile_window(np.zeros(1), percentiles)  # validates the pair early
        self.root, self.axis, self.min_foreground = Path(root), axis, min_foreground
        self.percentiles, self.image_size, self.channels = percentiles, image_size, channels
        self.resize = check_resize(resize)
        self.volume_index, self.foreground = volume_index, foreground
        self.augment = mri_augmentation(augment) if isinstance(augment, str) else augment
        self.on_error = check_on_error(on_error)
        self.cache_volumes = max(1, int(cache_volumes))
        self.skipped = SkipLog()
        self.volumes: list[VolumeEntry] = []
        self._cache: OrderedDict[tuple[Path, int], np.ndarray] = OrderedDict()
        self._build_index(mask)

    # ----- index

    def _build_index(self, mask: MaskRule) -> None:
        problems: list[tuple[str, str]] = []
        files = find_nifti_files(self.root, problems)
        for path, reason in problems:
            handle_bad_file(path, reason, self.on_error, self.skipped)
        for path, mask_path in pair_masks(files, mask).items():
            try:
                self.volumes.extend(self._index_file(path, mask_path))
            except UnreadableFileError as error:
                handle_bad_file(error.path, error.reason, self.on_error, self.skipped)
        counts = [len(v.slices) for v in self.volumes]
        self._sample_volume = np.repeat(np.arange(len(counts), dtype=np.int32), counts)
        self._sample_slice = (
            np.concatenate([v.slices for v in self.volumes]).astype(np.int32)
            if self.volumes
            else np.zeros(0, dtype=np.int32)
        )
        logger.info(
            "NIfTI index of %s: %d volumes, %d slices along axis %d, %d skipped",
            self.root,
            len(self.volumes),
            len(self),
            self.axis,
            len(self.skipped),
        )

    def _index_file(self, path: Path, mask_path: Path | None) -> list[VolumeEntry]:
        """One pass over the file's voxels: per volume, the foreground per slice and the
        intensity window. Only those small results are kept."""
        image = _load_header(path)
        spatial, n_volumes = _spatial_shape_and_volumes(path, image)
        if path.name.lower().endswith(".gz"):
            verify_gzip_stream(path, image)
        volumes = range(n_volumes) if self.volume_index is None else [self.volume_index]
        if self.volume_index is not None and self.volume_index >= n_volumes:
            reason = f"volume_index {self.volume_index} out of range ({n_volumes} volume(s))"
            raise UnreadableFileError(path, reason)
        mask = self._canonical_mask(path, image, spatial, mask_path)
        orientation = io_orientation(image.affine)
        other_axes = tuple(a for a in range(3) if a != self.axis)
        compressed = path.name.lower().endswith(".gz")
        entries = []
        for volume in volumes:
            data = apply_orientation(
                _read_data(path, image, _volume_slicer(image, volume)), orientation
            )
            inside = mask if mask is not None else foreground_mask(data, self.foreground)
            fraction = inside.mean(axis=other_axes)
            kept = np.flatnonzero((fraction >= self.min_foreground) & (fraction > 0))
            if self.min_foreground == 0:
                kept = np.arange(data.shape[self.axis])
            lo, hi = percentile_window(data, self.percentiles, inside)
            if hi <= lo:  # a binary or flat foreground (a mask given as an image): min-max
                lo, hi = float(data.min()), float(data.max())
            entries.append(VolumeEntry(path, volume, lo, hi, kept.astype(np.int32), compressed))
        return entries

    def _canonical_mask(
        self, path: Path, image: nib.Nifti1Image, spatial: tuple, mask_path: Path | None
    ) -> np.ndarray | None:
        if mask_path is None:
            return None
        if not mask_path.is_file():
            raise UnreadableFileError(path, f"mask not found: {mask_path.name}")
        mask_image = _load_header(mask_path)
        if mask_path.name.lower().endswith(".gz"):
            verify_gzip_stream(mask_path, mask_image)
        if mask_image.shape[:3] != spatial:
            reason = f"mask {mask_path.name} has shape {mask_image.shape[:3]}, image {spatial}"
            raise UnreadableFileError(path, reason)
        if not np.allclose(mask_image.affine, image.affine, atol=1e-3):
            raise UnreadableFileError(path, f"mask {mask_path.name} is on another voxel grid")
        return read_canonical_volume(mask_path, 0) > 0

    def __getstate__(self) -> dict:  # DataLoader workers under "spawn" pickle the dataset
        state = self.__dict__.copy()
        state["_cache"] = OrderedDict()  # volumes are per process
        return state

    # ----- samples

    def __len__(self) -> int:
        return len(self._sample_volume)

    def source_of(self, index: int) -> int:
        return int(self._sample_volume[index])

    def _plane(self, entry: VolumeEntry, index: int) -> np.ndarray:
        key = (entry.path, entry.volume)
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key][self._along_axis(index)]
        if not entry.compressed:
            return read_canonical_slice(entry.path, entry.volume, self.axis, index)
        # A gzip stream cannot seek: any slice costs decompressing up to it, so keep it whole.
        volume = read_canonical_volume(entry.path, entry.volume)
        self._cache[key] = volume
        while len(self._cache) > self.cache_volumes:
            self._cache.popitem(last=False)
        return volume[self._along_axis(index)]

    def _along_axis(self, index: int) -> tuple:
        return (slice(None),) * self.axis + (index,)  # a view: np.take copies the volume

    def load(self, index: int) -> dict:
        """Sample ``index``, raising :class:`UnreadableFileError` whatever ``on_error``."""
        entry = self.volumes[int(self._sample_volume[index])]
        slice_index = int(self._sample_slice[index])
        plane = display_orientation(self._plane(entry, slice_index))
        image = scale_to_unit(plane, entry.lo, entry.hi)
        if self.augment is not None:
            tensor = self.augment(torch.from_numpy(image)[None, :, :, None])
            image = np.clip(np.asarray(tensor, dtype=np.float32)[0, :, :, 0], 0.0, 1.0)
        meta = {
            "path": str(entry.path),
            "volume": entry.volume,
            "axis": self.axis,
            "slice": slice_index,
            "height": image.shape[0],  # of the slice, before any resize
            "width": image.shape[1],
        }
        tensor = resize_to(to_sample_tensor(image, self.channels), self.image_size, self.resize)
        return {"image": tensor, "label": -1, "meta": meta}
