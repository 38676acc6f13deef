"""DICOM X-ray and ultrasound frames as 2D samples (pydicom 3 + pylibjpeg codecs).

Every frame of every DICOM file under a root is one sample (multi-frame cines with a stride).
The index is built from headers only; pixels are decoded one frame at a time when a sample
is asked for, and rendered the way a viewer shows them: modality LUT (rescale), VOI LUT or
window, MONOCHROME1 inversion, YBR -> RGB, palette colour, padding pixels set to black.

Patient identifiers never leave this module: headers are read with an allow-list of image
tags (nothing else is even kept in memory), pydicom's own warnings and log records (which
quote element values, e.g. an invalid birth date) are silenced while we read, and exceptions
are replaced by reasons written here, never pydicom's text.
"""

from __future__ import annotations

import json
import logging
import os
import re
import struct
import threading
import warnings
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom import Dataset, dcmread
from pydicom.errors import InvalidDicomError
from pydicom.pixels import (
    apply_color_lut,
    apply_modality_lut,
    apply_voi,
    apply_windowing,
    get_decoder,
    pixel_array,
)
from pydicom.uid import UID, ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from torch.utils.data import Dataset as TorchDataset

from medp2x.atomic import atomic_write_text
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
from medp2x.data.readers import DICOM_SUFFIXES

logger = logging.getLogger("medp2x.data.dicom")

WINDOWS = ("voi", "minmax", "percentile")
X_RAY_AND_US = ("CR", "DX", "MG", "RF", "XA", "US")
INDEX_CACHE_VERSION = 1

# The only header elements the index reads: image geometry and encoding, no identifiers.
_INDEX_TAGS = [
    "Modality",
    "PhotometricInterpretation",
    "Rows",
    "Columns",
    "NumberOfFrames",
    "SamplesPerPixel",
    "BitsAllocated",
    "BitsStored",
]
# Beyond group 0028 (which pixel_array copies), what rendering one frame needs.
_RENDER_TAGS = [
    0x20500020,  # Presentation LUT Shape
    0x52009229,  # Shared Functional Groups Sequence (enhanced multi-frame)
    0x52009230,  # Per-frame Functional Groups Sequence
]
_ITEM, _SEQUENCE_END = 0xFFFEE000, 0xFFFEE0DD
_UNDEFINED_LENGTH = 0xFFFFFFFF
_CODE_STRING = re.compile(r"^[A-Z0-9_ ]{0,16}$")
_PHOTOMETRICS = {  # PS3.3 C.7.6.3.1.2, as far as pydicom decodes them to grey or RGB
    "MONOCHROME1",
    "MONOCHROME2",
    "PALETTE COLOR",
    "RGB",
    "YBR_FULL",
    "YBR_FULL_422",
    "YBR_ICT",
    "YBR_RCT",
}
_OTHER_PHOTOMETRICS = {"YBR_PARTIAL_422", "YBR_PARTIAL_420", "HSV", "ARGB", "CMYK", "XYB"}
_UID = re.compile(r"^[0-9.]{1,64}$")


@dataclass(frozen=True)
class DicomFileInfo:
    """What the index knows about one file: geometry and encoding, never identifiers."""

    modality: str
    photometric: str
    rows: int
    columns: int
    frames: int
    samples_per_pixel: int
    bits_allocated: int
    bits_stored: int
    transfer_syntax: str


# --------------------------------------------------------------------------- PHI hygiene

_quiet_lock = threading.Lock()
_quiet_depth = 0
_quiet_saved: tuple[int, int, warnings.catch_warnings] | None = None


@contextmanager
def pydicom_silenced() -> Iterator[None]:
    """Silence pydicom's logger and warnings and skip value validation while reading.

    pydicom reports invalid values by quoting them ("Invalid value for VR DA: '19...'"),
    which would put dates and names into logs. Reentrant and thread-safe (a depth counter):
    the global settings are restored when the last reader leaves.
    """
    global _quiet_depth, _quiet_saved
    pydicom_logger, settings = logging.getLogger("pydicom"), pydicom.config.settings
    with _quiet_lock:
        if _quiet_depth == 0:
            caught = warnings.catch_warnings()
            caught.__enter__()
            warnings.simplefilter("ignore")
            _quiet_saved = (pydicom_logger.level, settings.reading_validation_mode, caught)
            # above CRITICAL: silences pydicom's child loggers too (they inherit the level)
            pydicom_logger.setLevel(logging.CRITICAL + 1)
            settings.reading_validation_mode = pydicom.config.IGNORE
        _quiet_depth += 1
    try:
        yield
    finally:
        with _quiet_lock:
            _quiet_depth -= 1
            if _quiet_depth == 0 and _quiet_saved is not None:
                level, mode, caught = _quiet_saved
                pydicom_logger.setLevel(level)
                settings.reading_validation_mode = mode
                caught.__exit__(None, None, None)
                _quiet_saved = None


def _code_string(value: object, default: str = "") -> str:
    """A CS value (Modality, Photometric Interpretation) if it looks like one: a crafted
    file must not smuggle free text into meta or the index cache."""
    text = str(value).strip().upper() if value is not None else default
    return text if _CODE_STRING.match(text) else "INVALID"


def _syntax_name(uid: str) -> str:
    uid = UID(uid)
    if uid.is_transfer_syntax:
        return uid.name
    return uid if _UID.match(uid) else "(malformed UID)"


def _as_int(value: object, default: int) -> int:
    try:
        return int(value) if value not in (None, "") else default
    except (TypeError, ValueError):
        return default


# --------------------------------------------------------------------------- file listing


def _has_dicom_marker(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            f.seek(128)
            return f.read(4) == b"DICM"
    except OSError:
        return False


def _is_raw_dicom(path: Path) -> bool:
    """A DICOM data set without the Part 10 preamble and ``DICM`` marker (ACR-NEMA-style and
    older exports): the file opens on an element of group 0008 (or 0002), little endian, with
    either an explicit VR or a plausible implicit length. pydicom reads these with ``force``."""
    try:
        with open(path, "rb") as f:
            head = f.read(8)
    except OSError:
        return False
    if len(head) < 8:
        return False
    group, element = struct.unpack("<HH", head[:4])
    if group not in (0x0002, 0x0008) or element > 0x1FFF:
        return False
    vr = head[4:6]
    return (vr.isalpha() and vr.isupper()) or struct.unpack("<L", head[4:8])[0] < (1 << 16)


def _looks_like_dicom(path: Path) -> bool:
    return _has_dicom_marker(path) or _is_raw_dicom(path)


def _inferred_syntax(header: Dataset) -> UID:
    """The transfer syntax of a file without a file meta header, from how pydicom read it."""
    implicit, little = header.original_encoding
    if implicit:
        return ImplicitVRLittleEndian
    return ExplicitVRLittleEndian if little is not False else ExplicitVRBigEndian


def find_dicom_files(root: str | Path, problems: list | None = None) -> list[Path]:
    """DICOM candidates under ``root`` (itself if a file), sorted: files with a DICOM suffix,
    and suffix-less files carrying the ``DICM`` marker (scanners often write ``IM0001``) or
    opening on a DICOM element without it (older ACR-NEMA-style exports).
    ``DICOMDIR`` and hidden files are directories' bookkeeping, not images."""
    root = existing_path(root, "DICOM root")
    if root.is_file():
        return [root]

    def wanted(path: Path) -> bool:
        if path.name.startswith(".") or path.name.upper() == "DICOMDIR":
            return False
        suffix = path.suffix.lower()
        return suffix in DICOM_SUFFIXES or (not suffix and _looks_like_dicom(path))

    return walk_tree(root, wanted, problems)


# --------------------------------------------------------------------------- header index


def read_dicom_info(path: str | Path) -> DicomFileInfo:
    """Header facts of one file, checked so that bad files fail here rather than mid-run:
    DICOM marker, pixel data present and complete, a decoder installed for its syntax.
    Raises :class:`UnreadableFileError` with a reason of our own wording."""
    path = Path(path)
    try:
        size = path.stat().st_size
    except OSError as error:
        raise UnreadableFileError(path, f"cannot open file ({error.strerror})") from None
    if size == 0:
        raise UnreadableFileError(path, "empty file (0 bytes)")
    with pydicom_silenced():
        try:
            raw = not _has_dicom_marker(path) and _is_raw_dicom(path)
            with open(path, "rb") as f:
                header = dcmread(f, stop_before_pixels=True, specific_tags=_INDEX_TAGS, force=raw)
                pixel_offset = f.tell()
                if raw:  # no file meta header: the transfer syntax is what pydicom inferred
                    header.file_meta = pydicom.dataset.FileMetaDataset()
                    header.file_meta.TransferSyntaxUID = _inferred_syntax(header)
                info = _info_from_header(path, header)
                _check_pixel_data(path, f, pixel_offset, size, info)
        except UnreadableFileError:
            raise
        except InvalidDicomError:
            raise UnreadableFileError(path, "not a DICOM file (no 'DICM' marker)") from None
        except OSError as error:
            raise UnreadableFileError(path, f"cannot read file ({error.strerror})") from None
        except Exception as error:  # pydicom's text may quote header values: not echoed
            reason = f"corrupt or truncated DICOM header ({type(error).__name__})"
            raise UnreadableFileError(path, reason) from None
    return info


def _info_from_header(path: Path, header: Dataset) -> DicomFileInfo:
    file_meta = getattr(header, "file_meta", None)
    syntax = file_meta.get("TransferSyntaxUID") if file_meta is not None else None
    if not syntax:
        raise UnreadableFileError(path, "no transfer syntax in the file meta header")
    missing = [k for k in ("Rows", "Columns", "BitsAllocated") if header.get(k) in (None, "")]
    if missing:
        reason = f"missing pixel data (no {'/'.join(missing)}: not an image object)"
        raise UnreadableFileError(path, reason)
    _check_decoder(path, syntax)
    _check_geometry(path, header)
    photometric = str(header.get("PhotometricInterpretation") or "MONOCHROME2").strip().upper()
    if photometric in _OTHER_PHOTOMETRICS:  # a known name: safe to echo
        raise UnreadableFileError(path, f"unsupported photometric interpretation {photometric}")
    if photometric not in _PHOTOMETRICS:
        raise UnreadableFileError(path, "unknown photometric interpretation")
    return DicomFileInfo(
        modality=_code_string(header.get("Modality"), ""),
        photometric=photometric,
        rows=int(header.Rows),
        columns=int(header.Columns),
        frames=max(1, _as_int(header.get("NumberOfFrames"), 1)),
        samples_per_pixel=_as_int(header.get("SamplesPerPixel"), 1),
        bits_allocated=int(header.BitsAllocated),
        bits_stored=_as_int(header.get("BitsStored"), int(header.BitsAllocated)),
        transfer_syntax=str(syntax) if _UID.match(str(syntax)) else "(malformed UID)",
    )


def _check_geometry(path: Path, header: Dataset) -> None:
    """Frames, bit depth and the size of one frame, as declared, before any pixel is read:
    a frame larger than the pixel budget is refused (a 200-byte RLE file may declare 65535^2),
    and so are files that declare no frames or a depth no radiograph is stored in."""
    frames = header.get("NumberOfFrames")
    if frames not in (None, "") and _as_int(frames, -1) < 1:
        raise UnreadableFileError(path, "Number of Frames is 0 or invalid: no frame to read")
    bits = _as_int(header.get("BitsAllocated"), 0)
    if bits not in (8, 16, 32):
        what = "1-bit pixel data (a bitmap, e.g. a segmentation)" if bits == 1 else f"{bits}-bit"
        raise UnreadableFileError(path, f"{what}: Bits Allocated must be 8, 16 or 32")
    stored = _as_int(header.get("BitsStored"), bits)
    if not 1 <= stored <= bits:
        raise UnreadableFileError(path, f"Bits Stored {stored} does not fit Bits Allocated {bits}")
    samples = _as_int(header.get("SamplesPerPixel"), 1)
    if samples not in (1, 3):
        raise UnreadableFileError(path, f"Samples per Pixel {samples}: only 1 or 3 are read")
    check_pixel_budget(path, (int(header.Rows), int(header.Columns), samples), "frame")


def _check_decoder(path: Path, syntax: UID) -> None:
    name = _syntax_name(syntax)
    try:
        decoder = get_decoder(syntax)
    except NotImplementedError:
        raise UnreadableFileError(
            path, f"unsupported transfer syntax {name}: pydicom has no decoder for it"
        ) from None
    if not decoder.is_available:
        needs = "; ".join(decoder.missing_dependencies) or "a decoder plugin"
        raise UnreadableFileError(path, f"unsupported transfer syntax {name}: install {needs}")


def _check_pixel_data(path: Path, f, offset: int, size: int, info: DicomFileInfo) -> None:
    """Pixel Data present and as long as the header promises; checked by seeking only,
    because a truncated file must be caught at indexing, not hours into a run."""
    syntax = UID(info.transfer_syntax)
    if syntax.is_deflated:  # file offsets refer to the compressed stream: decode will tell
        return
    if offset >= size:
        raise UnreadableFileError(path, "missing pixel data (header only or truncated)")
    endian = "<" if syntax.is_little_endian else ">"
    f.seek(offset)
    element_header = f.read(12)
    explicit_long = not syntax.is_implicit_VR and element_header[4:6] in (
        b"OB",
        b"OW",
        b"OF",
        b"OD",
        b"UN",
    )
    length_at, header_length = (8, 12) if explicit_long else (4, 8)
    if len(element_header) < header_length:
        raise UnreadableFileError(path, "truncated pixel data element")
    (length,) = struct.unpack(f"{endian}L", element_header[length_at : length_at + 4])
    data_start = offset + header_length
    if length == _UNDEFINED_LENGTH:
        _check_fragments(path, f, data_start, size)
        return
    expected = info.rows * info.columns * info.frames * info.samples_per_pixel
    expected = (expected * info.bits_allocated + 7) // 8
    available = size - data_start
    if available < expected:
        raise UnreadableFileError(
            path, f"truncated pixel data ({available} of {expected} bytes present)"
        )


def _check_fragments(path: Path, f, start: int, size: int) -> None:
    """Walk the encapsulated items up to the sequence delimiter. pydicom's
    ``parse_fragments`` stops silently at end of file, so it cannot tell truncation."""
    position = start
    while True:
        f.seek(position)
        item = f.read(8)
        if len(item) < 8:
            raise UnreadableFileError(path, "truncated compressed pixel data (file ends early)")
        group, element, length = struct.unpack("<HHL", item)
        tag = group << 16 | element
        if tag == _SEQUENCE_END:
            return
        if tag != _ITEM or length == _UNDEFINED_LENGTH:
            raise UnreadableFileError(path, "corrupt compressed pixel data (bad item tag)")
        position += 8 + length
        if position > size:
            raise UnreadableFileError(path, "truncated compressed pixel data (file ends early)")


# --------------------------------------------------------------------------- rendering


def read_dicom_frame(
    path: str | Path,
    frame: int = 0,
    window: str = "voi",
    percentiles: tuple[float, float] = (0.5, 99.5),
) -> np.ndarray:
    """One frame rendered for display, float32 in [0, 1]: H x W (grey) or H x W x 3 (colour).

    Only that frame is decoded (pydicom seeks to its fragments). Raises
    :class:`UnreadableFileError` with a reason of our own wording.
    """
    path = Path(path)
    header = Dataset()
    with pydicom_silenced():
        try:
            if not _has_dicom_marker(path) and _is_raw_dicom(path):
                header = dcmread(path, force=True)  # no file meta: read whole, syntax inferred
                header.file_meta = pydicom.dataset.FileMetaDataset()
                header.file_meta.TransferSyntaxUID = _inferred_syntax(header)
                raw = pixel_array(header, index=frame)
            else:
                raw = pixel_array(
                    os.fspath(path), index=frame, ds_out=header, specific_tags=_RENDER_TAGS
                )
            _flatten_frame_groups(header, frame)
            return _render(raw, header, window, percentiles)
        except UnreadableFileError:
            raise
        except MemoryError:
            raise
        except OSError as error:
            raise UnreadableFileError(path, f"cannot read file ({error.strerror})") from None
        except Exception as error:  # pydicom's text may quote header values: not echoed
            raise UnreadableFileError(path, _decode_failure(error, frame)) from None


def _decode_failure(error: Exception, frame: int) -> str:
    """A reason for a failed decode. We look at pydicom's message only to classify it."""
    text, kind = str(error), type(error).__name__
    if "no 'Pixel Data'" in text:
        return "missing pixel data"
    if "buffer size" in text or "less than expected" in text or isinstance(error, EOFError):
        return f"truncated pixel data (frame {frame})"
    if isinstance(error, RuntimeError) and "plugins" in text:
        return f"corrupt or truncated compressed pixel data (frame {frame})"
    return f"cannot decode pixel data of frame {frame} ({kind})"


def _flatten_frame_groups(header: Dataset, frame: int) -> None:
    """Copy one frame's rescale and window from the enhanced multi-frame functional groups
    to the top level, where pydicom's modality and VOI LUT functions look for them."""
    groups = []
    if shared := header.get("SharedFunctionalGroupsSequence"):
        groups.append(shared[0])
    per_frame = header.get("PerFrameFunctionalGroupsSequence")
    if per_frame and frame < len(per_frame):
        groups.append(per_frame[frame])
    for group in groups:  # per-frame values override shared ones
        for sequence, keys in (
            ("PixelValueTransformationSequence", ("RescaleSlope", "RescaleIntercept")),
            ("FrameVOILUTSequence", ("WindowCenter", "WindowWidth", "VOILUTFunction")),
        ):
            if items := group.get(sequence):
                for key in keys:
                    if key in items[0]:
                        setattr(header, key, items[0][key].value)


def _render(raw: np.ndarray, header: Dataset, window: str, percentiles) -> np.ndarray:
    photometric = str(header.get("PhotometricInterpretation", "MONOCHROME2")).strip().upper()
    if raw.ndim == 3:  # pixel_array already turned YBR_FULL(_422) into RGB; J2K's ICT/RCT too
        full_scale = 2 ** _as_int(header.get("BitsStored"), 8) - 1
        return np.clip(raw.astype(np.float32) / full_scale, 0.0, 1.0)
    if photometric == "PALETTE COLOR":
        rgb = apply_color_lut(raw, header)
        full_scale = 255 if rgb.dtype == np.uint8 else 65535
        return np.clip(rgb.astype(np.float32) / full_scale, 0.0, 1.0)
    return _render_grey(raw, header, photometric, window, percentiles)


def _render_grey(
    raw: np.ndarray, header: Dataset, photometric: str, window: str, percentiles
) -> np.ndarray:
    padding = _padding_mask(raw, header)
    values = apply_modality_lut(raw, header)
    image = _apply_voi(values, header) if window == "voi" else None
    if image is None:  # no usable VOI in the file, or the user asked for a data window
        bounds = (0.0, 100.0) if window == "minmax" else percentiles
        lo, hi = percentile_window(values, bounds, None if padding is None else ~padding)
        image = scale_to_unit(values, lo, hi)
    if _inverted(header, photometric):
        image = 1.0 - image
    if padding is not None:
        image[padding] = 0.0
    return image


def _apply_voi(values: np.ndarray, header: Dataset) -> np.ndarray | None:
    """The file's own VOI (LUT preferred, else the first window) on [0, 1], or None."""
    try:
        if header.get("VOILUTSequence"):
            item = header.VOILUTSequence[0]
            entries, first, _ = (int(v) for v in item.LUTDescriptor)
            domain = np.arange(first, first + (entries or 65536))
            lut = apply_voi(domain, header)  # the LUT itself: its span is the output range
            out = apply_voi(np.rint(values).astype(np.int64), header)
            return scale_to_unit(out, float(lut.min()), float(lut.max()))
        if "WindowCenter" in header and "WindowWidth" in header:
            out = apply_windowing(values, header)
            # pydicom maps the window onto the data type's range; the two infinities give
            # exactly its end points (also for SIGMOID), so we need not re-derive them.
            lo, hi = apply_windowing(np.array([-np.inf, np.inf]), header)
            return scale_to_unit(out, float(lo), float(hi))
    except (ValueError, NotImplementedError, TypeError, IndexError, AttributeError):
        logger.debug("unusable VOI LUT/window; falling back to percentiles")
    return None


def _padding_mask(raw: np.ndarray, header: Dataset) -> np.ndarray | None:
    """Pixels outside the acquired area (CT circle, MG background), if the file says so."""
    pad = header.get("PixelPaddingValue")
    if pad is None or isinstance(pad, (list, tuple, pydicom.multival.MultiValue)):
        return None
    limit = header.get("PixelPaddingRangeLimit")
    if isinstance(limit, int):
        lo, hi = sorted((int(pad), limit))
        mask = (raw >= lo) & (raw <= hi)
    else:
        mask = raw == int(pad)
    return mask if 0 < mask.sum() < mask.size else None


def _inverted(header: Dataset, photometric: str) -> bool:
    """MONOCHROME1 shows low values white; a Presentation LUT Shape of INVERSE says the
    same for a MONOCHROME2 image. The two are one instruction, never applied twice."""
    shape = str(header.get("PresentationLUTShape", "")).strip().upper()
    return photometric == "MONOCHROME1" or (photometric == "MONOCHROME2" and shape == "INVERSE")


# --------------------------------------------------------------------------- dataset


class DicomDataset(SkipUnreadable, TorchDataset):
    """Frames of the DICOM files under ``root`` as samples ``{"image", "label": -1, "meta"}``.

    ``modalities`` keeps only files whose Modality is listed (e.g. :data:`X_RAY_AND_US`);
    ``frame_stride`` takes every n-th frame of multi-frame files; ``window`` is ``"voi"``
    (the file's VOI LUT or window, else ``percentiles``), ``"minmax"`` or ``"percentile"``;
    ``channels`` forces 1 or 3 channels (None: grey stays 1, colour 3); ``image_size`` and
    ``resize`` size the frames (``base.resize_to``: ``"cap"`` for pretraining keeps the
    stored resolution up to a shorter side of ``image_size``); ``index_cache`` is a JSON file
    keeping header facts between runs (paths and image geometry only).
    """

    def __init__(
        self,
        root: str | Path,
        modalities: Iterable[str] | None = None,
        frame_stride: int = 1,
        image_size: int | Sequence[int] | None = None,
        window: str = "voi",
        percentiles: tuple[float, float] = (0.5, 99.5),
        channels: int | None = None,
        on_error: OnError = "raise",
        index_cache: str | Path | None = None,
        resize: str = "square",
    ):
        if window not in WINDOWS:
            raise ValueError(f"window must be one of {WINDOWS}, not {window!r}")
        if not isinstance(frame_stride, int) or frame_stride < 1:
            raise ValueError(f"frame_stride must be a positive integer, not {frame_stride!r}")
        if channels not in (None, 1, 3):
            raise ValueError(f"channels must be None, 1 or 3, not {channels!r}")
        percentile_window(np.zeros(1), percentiles)  # validates the pair early
        self.root = Path(root)
        self.modalities = None if modalities is None else {m.upper() for m in modalities}
        self.frame_stride, self.window, self.percentiles = frame_stride, window, percentiles
        self.image_size, self.channels = image_size, channels
        self.resize = check_resize(resize)
        self.on_error = check_on_error(on_error)
        self.skipped = SkipLog()
        self.files: list[Path] = []
        self.infos: list[DicomFileInfo] = []
        self.excluded_by_modality = 0
        self._build_index(index_cache)

    # ----- index

    def _build_index(self, index_cache: str | Path | None) -> None:
        cached = _load_index_cache(index_cache)
        fresh: dict[str, dict] = {}
        problems: list[tuple[str, str]] = []
        files = find_dicom_files(self.root, problems)
        for path, reason in problems:
            handle_bad_file(path, reason, self.on_error, self.skipped)
        for path in files:
            info = self._file_info(path, cached, fresh)
            if info is None:
                continue
            if self.modalities is not None and info.modality not in self.modalities:
                self.excluded_by_modality += 1
                continue
            self.files.append(path)
            self.infos.append(info)
        if index_cache is not None and fresh != cached.get("files"):
            _save_index_cache(index_cache, fresh)
        frames = [range(0, info.frames, self.frame_stride) for info in self.infos]
        self._sample_file = np.repeat(
            np.arange(len(frames), dtype=np.int32), [len(r) for r in frames]
        )
        self._sample_frame = np.fromiter(
            (f for r in frames for f in r), dtype=np.int32, count=len(self._sample_file)
        )
        logger.info(
            "DICOM index of %s: %d files, %d frames, %d excluded by modality, %d skipped",
            self.root,
            len(self.files),
            len(self),
            self.excluded_by_modality,
            len(self.skipped),
        )

    def _file_info(self, path: Path, cached: dict, fresh: dict) -> DicomFileInfo | None:
        key = str(path)
        try:
            stat = path.stat()
            stamp = [stat.st_size, stat.st_mtime_ns]
        except OSError:
            stamp = None
        entry = cached.get("files", {}).get(key)
        if isinstance(entry, dict) and stamp and entry.get("stamp") == stamp:
            try:
                info = DicomFileInfo(**entry["info"])
                fresh[key] = entry
                return info
            except (TypeError, KeyError):
                pass  # an entry from another version: read the header again
        try:
            info = read_dicom_info(path)
        except UnreadableFileError as error:
            handle_bad_file(path, error.reason, self.on_error, self.skipped)
            return None
        if stamp:
            fresh[key] = {"stamp": stamp, "info": asdict(info)}
        return info

    # ----- samples

    def __len__(self) -> int:
        return len(self._sample_file)

    def source_of(self, index: int) -> int:
        return int(self._sample_file[index])

    def load(self, index: int) -> dict:
        """Sample ``index``, raising :class:`UnreadableFileError` whatever ``on_error``."""
        file_index, frame = int(self._sample_file[index]), int(self._sample_frame[index])
        path, info = self.files[file_index], self.infos[file_index]
        image = read_dicom_frame(path, frame, self.window, self.percentiles)
        meta = {
            "path": str(path),
            "modality": info.modality,
            "photometric": info.photometric,
            "frame": frame,
            "height": info.rows,  # of the stored frame, before any resize
            "width": info.columns,
            "bits_stored": info.bits_stored,
        }
        return {
            "image": resize_to(
                to_sample_tensor(image, self.channels), self.image_size, self.resize
            ),
            "label": -1,
            "meta": meta,
        }


def _load_index_cache(path: str | Path | None) -> dict:
    if path is None or not Path(path).is_file():
        return {}
    try:
        content = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        logger.warning("index cache %s is unreadable; rebuilding it", path)
        return {}
    if not isinstance(content, dict) or content.get("version") != INDEX_CACHE_VERSION:
        return {}
    return content


def _save_index_cache(path: str | Path, files: dict[str, dict]) -> None:
    """Written atomically (temp file + rename) so an interrupted run leaves the old one."""
    atomic_write_text(path, json.dumps({"version": INDEX_CACHE_VERSION, "files": files}))
