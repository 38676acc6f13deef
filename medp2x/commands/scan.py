"""``medp2x scan``: read a dataset the way a run would, and report what is in it.

Prints the files found, the samples they give (tiles, frames, slices, images), image sizes,
source dtypes and value ranges, and every unreadable file with its reason, so a folder can be
checked before a long run. Exit code 0 when everything was readable, 1 otherwise.

The kind is decided from the file extensions found (``--kind auto``): whole-slide formats
(and tiled TIFFs, which OpenSlide recognises) -> wsi; .dcm or extension-less DICOM -> dicom;
.nii/.nii.gz -> nifti; JPEG/PNG/TIFF/BMP (or a .csv manifest) -> folder.

Examples::

    medp2x scan /data/slides                     # every tissue tile of every slide
    medp2x scan /data/xrays --kind dicom --limit 500
    medp2x scan /data/labelled_tiles             # class-per-folder images
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from medp2x.data.readers import KINDS as READER_KINDS

KINDS = ("auto", *READER_KINDS)


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "scan",
        help="read a dataset folder the way a run would and list unreadable files",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("path", metavar="PATH", help="dataset folder, slide, or CSV manifest")
    p.add_argument("--kind", choices=KINDS, default="auto", help="reader (default: by extension)")
    p.add_argument(
        "--limit",
        type=int,
        metavar="N",
        help="read at most N samples, spread evenly (default: all)",
    )
    wsi = p.add_argument_group("whole-slide images")
    wsi.add_argument("--tile-size", type=int, default=256, help="tile side in pixels (256)")
    wsi.add_argument("--mpp", type=float, help="microns per pixel of the tiles (default: level 0)")
    wsi.add_argument("--min-tissue", type=float, default=0.5, help="minimum tissue fraction")
    other = p.add_argument_group("DICOM and NIfTI")
    other.add_argument(
        "--modalities", metavar="LIST", help="DICOM modalities to keep, comma-separated (CR,DX,US)"
    )
    other.add_argument(
        "--mask",
        metavar="RULE",
        help="NIfTI mask files, e.g. '*_mask.nii.gz' (not scanned as images)",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from medp2x.data.base import existing_path

    path = existing_path(args.path, "scan path")
    if args.limit is not None and args.limit < 1:
        raise ValueError(f"--limit must be at least 1, not {args.limit}")
    kind, found = (args.kind, "") if args.kind != "auto" else detect_kind(path)
    data_logger = logging.getLogger("medp2x.data")
    level = data_logger.level
    data_logger.setLevel(logging.ERROR)  # skip warnings would repeat the report's list
    try:
        dataset = open_dataset(kind, path, args)
        report = scan_dataset(dataset, args.limit)
    finally:
        data_logger.setLevel(level)
    say(f"scan of {path} (kind: {kind}{', ' + found if found else ''})")
    say("\n".join(report.lines(dataset, kind)))
    return 0 if report.all_readable else 1


def say(text: str) -> None:
    """Print ``text`` whatever bytes its file names hold: a name that is not valid UTF-8
    (Python keeps its bytes as surrogate escapes) is shown with ``\\xNN`` escapes rather than
    ending the scan with a UnicodeEncodeError under a strict UTF-8 locale."""
    encoding = getattr(sys.stdout, "encoding", None) or "utf-8"
    raw = text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    print(raw.encode(encoding, "backslashreplace").decode(encoding))


# ---------------------------------------------------------------------- which reader
def detect_kind(path: Path) -> tuple[str, str]:
    """(kind, why) from the extensions under ``path``; the most common kind wins."""
    if path.is_file() and path.suffix.lower() == ".csv":
        return "folder", "CSV manifest"
    files = [path] if path.is_file() else _visible_files(path)
    from medp2x.data.readers import count_kinds

    counts = count_kinds(files)
    if not counts:
        raise ValueError(f"no image, slide, DICOM or NIfTI files found under {path}")
    kind, _ = counts.most_common(1)[0]
    why = ", ".join(f"{n} {k} file(s)" for k, n in counts.most_common())
    if len(counts) > 1:
        why += f"; reading as {kind}, use --kind to choose"
    return kind, why


def _visible_files(root: Path) -> list[Path]:
    from medp2x.data.base import walk_tree

    return walk_tree(
        root, lambda p: not any(part.startswith(".") for part in p.relative_to(root).parts)
    )


def open_dataset(kind: str, path: Path, args: argparse.Namespace):
    """The run's reader for ``kind`` (``medp2x.data.readers``), in skip mode so every bad file
    gets reported."""
    from medp2x.data.readers import open_reader

    options = {
        "wsi": {"tile_size": args.tile_size, "mpp": args.mpp, "min_tissue": args.min_tissue,
                "allow_empty": True},
        "dicom": {"modalities": args.modalities.split(",") if args.modalities else None},
        "nifti": {"mask": args.mask},
    }  # fmt: skip
    return open_reader(kind, path, on_error="skip", **options.get(kind, {}))


# ---------------------------------------------------------------------- reading
@dataclass
class ScanReport:
    """What reading the samples found."""

    samples: int = 0
    attempted: int = 0  # samples asked for (fewer than ``samples`` with --limit)
    read: int = 0  # samples that came back
    shapes: Counter = field(default_factory=Counter)
    source_sizes: Counter = field(default_factory=Counter)
    ranges: dict = field(default_factory=dict)  # source kind -> [count, min, max]
    blank: int = 0
    errors: dict = field(default_factory=dict)  # path -> reason (first one)
    failures: Counter = field(default_factory=Counter)  # path -> samples that failed
    index_errors: list = field(default_factory=list)  # (path, reason) found while indexing

    @property
    def all_readable(self) -> bool:
        return not self.errors and not self.index_errors

    def lines(self, dataset, kind: str) -> list[str]:
        files = _file_count(dataset)
        bad = len({p for p, _ in self.index_errors} | set(self.errors))
        out = [f"files:    {files + len(self.index_errors)} ({bad} unreadable)"]
        if kind == "wsi":
            from medp2x.data.wsi import describe_slides

            out += [f"  {line}" for line in describe_slides(dataset.slides)]
        classes = getattr(dataset, "classes", None)
        if classes:
            out.append(f"classes:  {len(classes)} ({', '.join(map(str, classes))})")
        limited = f", {self.attempted} read (--limit)" if self.attempted < self.samples else ""
        out.append(f"samples:  {self.samples} {_sample_word(kind)}{limited}")
        if self.shapes:
            out.append(f"shapes:   {_top(self.shapes)}  (C x H x W given to the model)")
        if self.source_sizes:
            out.append(f"sources:  {_top(self.source_sizes)}  (H x W on disk)")
        for source, (count, lo, hi) in sorted(self.ranges.items()):
            out.append(f"values:   {source}: [{lo:.4f}, {hi:.4f}] over {count} sample(s)")
        if self.blank:
            out.append(f"blank:    {self.blank} sample(s) of one constant value")
        problems = list(self.index_errors) + sorted(self.errors.items())
        out.append(f"unreadable: {len(problems)}" if problems else "all files readable")
        for p, reason in problems:
            more = self.failures[p] - 1  # e.g. the other broken tiles of one slide
            out.append(
                f"  {p}: {reason}" + (f" (+{more} more sample(s) of it)" if more > 0 else "")
            )
        return out


def scan_dataset(dataset, limit: int | None = None) -> ScanReport:
    """Read every sample (or ``limit`` evenly spaced ones) strictly, collecting failures."""
    import numpy as np
    from tqdm import tqdm

    from medp2x.data.base import UnreadableFileError

    report = ScanReport(samples=len(dataset), index_errors=list(dataset.skipped.skipped))
    indices = range(len(dataset))
    if limit is not None and limit < len(dataset):
        indices = np.unique(np.linspace(0, len(dataset) - 1, limit).round().astype(int))
    load = getattr(dataset, "load", None) or dataset.__getitem__
    report.attempted = len(indices)
    for i in tqdm(indices, desc="scan", unit="sample", disable=None, file=sys.stderr, leave=False):
        try:
            sample = load(int(i))
        except UnreadableFileError as err:
            report.errors.setdefault(err.path, err.reason)
            report.failures[err.path] += 1
            continue
        except Exception as err:  # a reader bug must be reported, not end the scan
            report.errors.setdefault(f"sample {i}", f"{type(err).__name__}: {err}")
            continue
        _record(report, sample, int(i))
    if len(dataset.skipped.skipped) > len(report.index_errors):  # readers without ``load``
        report.index_errors = list(dataset.skipped.skipped)
    return report


def _record(report: ScanReport, sample: dict, index: int) -> None:
    image, meta = sample["image"], sample.get("meta", {})
    path = meta.get("path", f"sample {index}")
    report.read += 1
    if not bool(image.isfinite().all()):
        report.errors.setdefault(path, "image contains NaN or infinite values")
        return
    lo, hi = float(image.min()), float(image.max())
    if lo < 0 or hi > 1:
        report.errors.setdefault(path, f"values [{lo:.3g}, {hi:.3g}] outside [0, 1]")
    report.blank += lo == hi
    report.shapes["x".join(map(str, image.shape))] += 1
    size = _source_size(meta)
    if size:
        report.source_sizes[size] += 1
    source = _source_kind(meta)
    count, old_lo, old_hi = report.ranges.get(source, (0, math.inf, -math.inf))
    report.ranges[source] = (count + 1, min(old_lo, lo), max(old_hi, hi))


def _source_kind(meta: dict) -> str:
    if "dtype" in meta:
        return f"{meta['dtype']} files"
    if "bits_stored" in meta:
        return f"{meta['bits_stored']}-bit {meta.get('modality', '')}".rstrip()
    if "slide" in meta:
        return str(meta["slide"])
    return "all"


def _source_size(meta: dict) -> str | None:
    for h, w in (("height", "width"), ("rows", "cols")):
        if h in meta and w in meta:
            return f"{meta[h]}x{meta[w]}"
    return None


def _file_count(dataset) -> int:
    files = getattr(dataset, "files", None)
    if files is None:  # NiftiSliceDataset: one entry per (file, 4-D volume)
        files = {entry.path for entry in getattr(dataset, "volumes", [])}
    return len(files)


def _sample_word(kind: str) -> str:
    return {"wsi": "tiles", "dicom": "frames", "nifti": "slices"}.get(kind, "images")


def _top(counter: Counter, n: int = 5) -> str:
    shown = ", ".join(f"{k} ({v})" for k, v in counter.most_common(n))
    return shown + (f", ... {len(counter) - n} more" if len(counter) > n else "")
