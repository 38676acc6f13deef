"""What a pretraining run saw, as content hashes, so no test image is ever scored as unseen.

Every pretraining run writes ``<run>/seen_files.json``: the SHA-256 of the *content* of each
source file its dataset reads (an image file, a whole slide, a DICOM file, a NIfTI volume; a
slide's thousands of tiles share their slide's hash), or of each image where one file holds
many (MedMNIST ``.npz`` arrays), or of a record's identity where the store is split officially
(TFDS ``name/split/index``, PCam ``.h5`` file name and index). No path, name or header field is
written, so the record carries no patient identifier; renaming or moving a file does not hide it.

``medp2x evaluate`` hashes the test split the same way and refuses to score an encoder whose
run saw any test image (``count_test_overlap``). A P2X run also inherits the record of its first
stage (``ssl_checkpoint``) when that was a medp2x run, so a test image seen by either stage
counts. What hashes cannot see: derived data (PCam's test patches were cut from CAMELYON16's
test slides, so pretraining on those slides is leakage with no shared file: docs/datasets.md).

Cost: each source file is read once, streaming, on a few threads; a resumed run whose file
listing (paths, sizes, modification times, itself only kept as one digest) is unchanged reuses
the record instead of hashing again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from torch.utils.data import ConcatDataset, Dataset, Subset

from medp2x.atomic import atomic_write_text
from medp2x.run_folder import SEEN_FILES, run_folder_of

logger = logging.getLogger("medp2x.provenance")

RECORD_NAME = SEEN_FILES
FORMAT = "medp2x-seen-files/1"
HASH_THREADS = 4  # file reads overlap; hashlib releases the GIL on large buffers

_digest_cache: dict[tuple[str, int, int], str] = {}


# ----------------------------------------------------------------------------- sample keys


@dataclass
class SampleKeys:
    """One content key per sample (None where a sample's source cannot be identified), and a
    digest of the file listing behind them (to skip re-hashing an unchanged dataset)."""

    keys: list[str | None]
    listing: str

    @property
    def identified(self) -> set[str]:
        return {k for k in self.keys if k is not None}

    @property
    def unidentified(self) -> int:
        return sum(k is None for k in self.keys)


def sample_keys(dataset: Dataset, hash_files: bool = True) -> SampleKeys:
    """Content keys of every sample of ``dataset`` (see the module docstring for the units).

    ``hash_files=False`` only lists the files (the listing digest), for the resume shortcut.
    """
    sources = _sources(dataset, np.arange(len(dataset)))
    files = sorted({s for s in sources if isinstance(s, Path)})
    listing = _listing_digest(files)
    if not hash_files:
        return SampleKeys([], listing)
    digests = dict(zip(files, _hash_files(files), strict=True))
    keys = [digests[s] if isinstance(s, Path) else s for s in sources]
    return SampleKeys(keys, listing)


def _sources(dataset: Dataset, indices: np.ndarray) -> list[Path | str | None]:
    """Per sample: its source file (hashed later, once per file), a ready key, or None."""
    if isinstance(dataset, Subset):
        return _sources(dataset.dataset, np.asarray(dataset.indices)[indices])
    if isinstance(dataset, ConcatDataset):
        ends = np.asarray(dataset.cumulative_sizes)
        part = np.searchsorted(ends, indices, side="right")
        starts = np.concatenate([[0], ends[:-1]])
        out: list[Path | str | None] = [None] * len(indices)
        for p in np.unique(part):
            where = np.flatnonzero(part == p)
            local = indices[where] - starts[p]
            for i, source in zip(where, _sources(dataset.datasets[p], local), strict=True):
                out[i] = source
        return out
    items = getattr(dataset, "items", None)  # medp2x.data.folder: (file, label) pairs
    if isinstance(items, list) and len(items) == len(dataset):
        return [Path(items[i][0]) for i in indices]
    volumes = getattr(dataset, "volumes", None)  # NIfTI slices: their volume file
    if volumes is not None and hasattr(dataset, "source_of"):
        return [Path(volumes[dataset.source_of(int(i))].path) for i in indices]
    files = getattr(dataset, "files", None)  # slides (tiles), DICOM files (frames)
    if isinstance(files, list) and hasattr(dataset, "source_of"):
        return [Path(files[dataset.source_of(int(i))]) for i in indices]
    images = getattr(dataset, "images", None)  # MedMNIST .npz: many images in one file
    if isinstance(images, np.ndarray) and len(images) == len(dataset):
        return [_array_key(images[int(i)]) for i in indices]
    return _record_keys(dataset, indices)


def _record_keys(dataset: Dataset, indices: np.ndarray) -> list[str | None]:
    """Officially split record stores: the record's identity (name, split, index)."""
    name, split = getattr(dataset, "name", None), getattr(dataset, "split", None)
    if getattr(dataset, "source", None) is not None and name and split:  # TFDSDataset
        return [_text_key(f"tfds:{name}:{split}:{int(i)}") for i in indices]
    x_path = getattr(dataset, "x_path", None)  # PCam .h5: the file name carries the split
    if x_path is not None:
        return [_text_key(f"pcam:{Path(x_path).name}:{int(i)}") for i in indices]
    return [None] * len(indices)


def _array_key(image: np.ndarray) -> str:
    h = hashlib.sha256(f"array:{image.dtype.str}:{image.shape}:".encode())
    h.update(np.ascontiguousarray(image).tobytes())
    return h.hexdigest()


def _text_key(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogateescape")).hexdigest()


# ----------------------------------------------------------------------------- file hashing


def file_digest(path: str | Path) -> str:
    """SHA-256 of a file's content, streamed; cached per (path, size, mtime) in this process,
    so a test split is hashed once however many encoders or checkpoints are checked."""
    path = Path(path)
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _digest_cache:
        with path.open("rb") as handle:
            _digest_cache[key] = hashlib.file_digest(handle, "sha256").hexdigest()
    return _digest_cache[key]


def _hash_files(files: Sequence[Path]) -> list[str]:
    if len(files) < 2:
        return [file_digest(f) for f in files]
    with ThreadPoolExecutor(max_workers=min(HASH_THREADS, os.cpu_count() or 1)) as pool:
        return list(pool.map(file_digest, files))


def _listing_digest(files: Iterable[Path]) -> str:
    """One digest of (path, size, mtime) of the files: changes when any file does."""
    h = hashlib.sha256()
    for f in files:
        stat = f.stat()
        h.update(
            f"{f.resolve()}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode(
                "utf-8", "surrogateescape"
            )
        )  # any file name
    return h.hexdigest()


# ----------------------------------------------------------------------------- run records


def record_seen_files(
    run_dir: str | Path, dataset: Dataset, first_stage: str | Path | None = None
) -> Path:
    """Write ``<run_dir>/seen_files.json`` for a pretraining run on ``dataset``, merged with
    the record of the first-stage checkpoint's run when there is one."""
    run_dir = Path(run_dir)
    path = run_dir / RECORD_NAME
    first_record = find_record(first_stage) if first_stage else None
    inherited = read_record(first_record)
    inherited_digest = file_digest(first_record) if first_record else None
    listing = sample_keys(dataset, hash_files=False).listing
    previous = _previous_record(path)
    if (
        previous is not None
        and previous.get("listing") == listing
        and (previous.get("first_stage") or {}).get("record_sha256") == inherited_digest
    ):
        return path  # a resumed run on unchanged files: nothing new to hash
    keys = sample_keys(dataset)
    seen = keys.identified
    record = {
        "format": FORMAT,
        "what": "SHA-256 of the content of each source file (or image) pretraining read; no paths",
        "samples": len(keys.keys),
        "unidentified_samples": keys.unidentified,
        "listing": keys.listing,
        "first_stage": None,
    }
    if inherited is not None:
        seen |= set(inherited["sha256"])
        record["first_stage"] = {
            "record_sha256": inherited_digest,
            "hashes": len(inherited["sha256"]),
            "unidentified_samples": inherited.get("unidentified_samples", 0),
        }
    record["sha256"] = sorted(seen)
    atomic_write_text(path, json.dumps(record, indent=0))
    if keys.unidentified:
        logger.warning(
            "%s: %d of %d samples come from a dataset type whose files cannot be identified; "
            "evaluations will say so",
            path,
            keys.unidentified,
            len(keys.keys),
        )
    return path


def _previous_record(path: Path) -> dict | None:
    try:
        return read_record(path) if path.is_file() else None
    except ValueError:
        return None  # damaged (e.g. a killed write): hash again


def find_record(encoder: str | Path | None) -> Path | None:
    """The ``seen_files.json`` of the run an encoder file came from: beside ``encoder.pt`` or
    one folder above a ``checkpoints/`` file; None for anything else."""
    if encoder is None:
        return None
    path = Path(encoder)
    if not path.is_file():
        return None
    for folder in dict.fromkeys((path.parent, run_folder_of(path))):
        if (folder / RECORD_NAME).is_file():
            return folder / RECORD_NAME
    return None


def read_record(path: str | Path | None) -> dict | None:
    """A run record, checked; None when ``path`` is None. A damaged record is an error, since
    silently treating it as "saw nothing" would hide leakage."""
    if path is None:
        return None
    path = Path(path)
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ValueError(f"{path}: unreadable seen-files record ({err})") from err
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise ValueError(f"{path}: not a {FORMAT} record")
    if not isinstance(record.get("sha256"), list):
        raise ValueError(f"{path}: no sha256 list")
    return record


# ----------------------------------------------------------------------------- test overlap


@dataclass
class Overlap:
    """How many test images an encoder's pretraining saw, and how sure that count is."""

    status: str  # "checked", "no record", "not pretrained", "module", "test unidentified"
    seen: int | None = None  # test images whose content the run saw (None: not known)
    test_images: int = 0
    record: Path | None = None
    unidentified_run_samples: int = 0

    @property
    def note(self) -> str:
        if self.status == "checked":
            partial = (
                f"; {self.unidentified_run_samples} pretraining samples unidentifiable"
                if self.unidentified_run_samples
                else ""
            )
            allowed = " (scored anyway: allow_test_overlap)" if self.seen else ""
            return f"saw {self.seen} of {self.test_images} test images{partial}{allowed}"
        if self.status == "no record":
            return "unknown (no seen_files.json beside the weights)"
        if self.status == "test unidentified":
            return "unknown (the test split's files cannot be identified)"
        if self.status == "module":
            return "unknown (given as a module, not a file)"
        return "not pretrained"


def count_test_overlap(record: Path | None, test_keys: SampleKeys | None) -> Overlap:
    """Overlap between a run record and the test split's keys."""
    if record is None:
        return Overlap("no record")
    if test_keys is None or test_keys.unidentified == len(test_keys.keys):
        return Overlap("test unidentified", record=record)
    data = read_record(record)
    seen = set(data["sha256"])
    count = sum(k in seen for k in test_keys.keys if k is not None)
    return Overlap(
        "checked",
        count,
        len(test_keys.keys),
        record,
        int(data.get("unidentified_samples", 0))
        + int((data.get("first_stage") or {}).get("unidentified_samples", 0)),
    )


__all__ = [
    "RECORD_NAME",
    "Overlap",
    "SampleKeys",
    "count_test_overlap",
    "file_digest",
    "find_record",
    "read_record",
    "record_seen_files",
    "sample_keys",
]
