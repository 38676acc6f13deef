"""The registry of readers: which source kind a file or folder is, and the reader that opens it.

One entry per kind (``wsi``, ``dicom``, ``nifti``, ``folder``): its file suffixes, an optional
content probe for files the suffix cannot decide, and how to open a path as a ``Dataset``.
``medp2x scan``, the paper datasets' medical readers and the bundles pick readers here, so a
new kind is one entry (docs/data.md, "Adding a reader"). Readers are imported only when
opened: OpenSlide and pydicom load only for the folders that need them.

Ambiguous suffixes are settled by content, as OpenSlide would read them: a tiled (pyramidal)
TIFF is a slide, another TIFF an image; a folder of DICOM instances that OpenSlide reads is one
DICOM-WSI slide; an extension-less file with the DICOM preamble is DICOM.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch is imported only when a reader opens: `medp2x --help` stays fast
    from torch.utils.data import Dataset

PROBES = 20  # files whose content is read to tell tiled slides / DICOM without extension


@dataclass(frozen=True)
class Reader:
    """A source kind: the suffixes that name it and how to open a path of it.

    ``open(path, **options)`` returns the kind's ``Dataset``; ``options`` are its reader's
    keyword arguments (``on_error``, ``image_size``, ``resize`` ...)."""

    kind: str
    suffixes: tuple[str, ...]
    open: Callable[..., Dataset]
    samples: str  # what one sample is, for messages and docs

    def claims(self, name: str) -> bool:
        return name.lower().endswith(self.suffixes)


def _open_wsi(path: Path, **options: Any) -> Dataset:
    from medp2x.data.wsi import WSITileDataset

    return WSITileDataset(path, **options)


def _open_dicom(path: Path, **options: Any) -> Dataset:
    from medp2x.data.dicom import DicomDataset

    return DicomDataset(path, **options)


def _open_nifti(path: Path, **options: Any) -> Dataset:
    from medp2x.data.nifti import NiftiSliceDataset

    return NiftiSliceDataset(path, **options)


def _open_folder(path: Path, **options: Any) -> Dataset:
    from medp2x.data.folder import CSVManifestDataset, ImageFolderDataset

    if path.is_file() and path.suffix.lower() == ".csv":
        return CSVManifestDataset(path, **options)
    return ImageFolderDataset(path, **options)


# Suffixes only a whole-slide format uses; .tif/.tiff and DICOM are settled by content.
WSI_SUFFIXES = (".svs", ".ndpi", ".vms", ".vmu", ".scn", ".mrxs", ".svslide", ".bif", ".czi")
DICOM_SUFFIXES = (".dcm", ".dicom", ".dic", ".ima")
NIFTI_SUFFIXES = (".nii", ".nii.gz")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp")
TIFF_SUFFIXES = (".tif", ".tiff")

READERS: dict[str, Reader] = {
    r.kind: r
    for r in (
        Reader("wsi", WSI_SUFFIXES, _open_wsi, "tissue tiles"),
        Reader("dicom", DICOM_SUFFIXES, _open_dicom, "frames"),
        Reader("nifti", NIFTI_SUFFIXES, _open_nifti, "2-D slices"),
        Reader("folder", IMAGE_SUFFIXES, _open_folder, "images"),
    )
}
KINDS = tuple(READERS)


def open_reader(kind: str, path: str | Path, **options: Any) -> Dataset:
    """The ``kind`` reader's dataset of ``path``."""
    if kind not in READERS:
        raise ValueError(f"unknown kind {kind!r} (one of {', '.join(KINDS)})")
    return READERS[kind].open(Path(path), **options)


def kinds_of(files: Iterable[Path]) -> list[str | None]:
    """The kind of each file (None: no reader's), settling ambiguous suffixes by content."""
    import openslide

    probes = 0
    tiff_votes: list[bool] = []
    dicom_dirs: dict[Path, str] = {}
    kinds: list[str | None] = []
    for f in files:
        name, suffix = f.name.lower(), f.suffix.lower()
        if READERS["nifti"].claims(name):
            kinds.append("nifti")
        elif READERS["wsi"].claims(name):
            kinds.append("wsi")
        elif suffix in TIFF_SUFFIXES:
            if len(tiff_votes) < PROBES:  # tiled (pyramidal) TIFFs are slides, others images
                tiff_votes.append(openslide.OpenSlide.detect_format(str(f)) is not None)
            kinds.append("tiff")
        elif READERS["dicom"].claims(name):
            if f.parent not in dicom_dirs:  # one folder of instances is one DICOM-WSI slide
                is_wsi = openslide.OpenSlide.detect_format(str(f)) == "dicom"
                dicom_dirs[f.parent] = "wsi" if is_wsi else "dicom"
            kinds.append(dicom_dirs[f.parent])
        elif READERS["folder"].claims(name):
            kinds.append("folder")
        elif suffix == "" and probes < PROBES * 10:
            probes += 1
            kinds.append("dicom" if has_dicom_preamble(f) else None)
        else:
            kinds.append(None)
    tiff_kind = "wsi" if tiff_votes and sum(tiff_votes) * 2 > len(tiff_votes) else "folder"
    return [tiff_kind if k == "tiff" else k for k in kinds]


def has_dicom_preamble(path: Path) -> bool:
    try:
        with open(path, "rb") as handle:
            return handle.read(132)[128:132] == b"DICM"
    except OSError:
        return False


def count_kinds(files: Iterable[Path]) -> Counter:
    """How many files of each kind (files no reader claims are not counted)."""
    return Counter(k for k in kinds_of(files) if k)
