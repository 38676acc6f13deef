"""The one sample contract every reader meets, the shared size policy and bad-file policy.

A sample is a dict ``{"image": float32 tensor C x H x W in [0, 1], "label": int (-1 when
unlabelled), "meta": dict}``. ``meta`` never holds patient identifiers.

Readers take ``image_size`` and ``resize`` (see ``resize_to``): ``"cap"`` for pretraining
sources (the image at its own resolution, aspect kept, only shrunk to a shorter side of at
most ``image_size``: views then crop the real pixels), ``"shorter"`` for evaluation's
resize-then-centre-crop, ``"square"`` for the fixed-size batches of old.

Readers take ``on_error="raise" | "skip"``. ``raise`` stops with one line naming the file and
the reason; ``skip`` drops the file, counts it, and the run reports the count at the end, so
one truncated file never kills a week-long run.
"""

from __future__ import annotations

import logging
import math
import os
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
import torchvision.transforms.v2.functional as TF
from torch.utils.data import Dataset, Subset

logger = logging.getLogger("medp2x.data")

OnError = Literal["raise", "skip"]
ResizeMode = Literal["square", "shorter", "cap"]
RESIZE_MODES = ("square", "shorter", "cap")
CAP_LONGER_SIDE = 2  # "cap" also holds the longer side to this many times image_size

# The pixel budget: the most values (height x width x channels, per frame or per volume) a
# reader decodes at once. Every reader checks the size a file *declares* against it before
# allocating anything, so a 200-byte header that claims 30000^3 voxels is refused, not read.
# 2^27 values: a 11585^2 grey or 6689^2 RGB image, a 512^3 volume; 512 MiB as float32.
DEFAULT_PIXEL_BUDGET = 1 << 27
PIXEL_BUDGET_ENV = "MEDP2X_PIXEL_BUDGET"


class UnreadableFileError(ValueError):
    """A file a reader cannot turn into pixels. The message is ``<path>: <reason>``.

    ``part`` marks a failure of one part of a file that is otherwise readable (a tile of a
    slide): skip mode then drops that sample only, not every sample of the file."""

    def __init__(self, path: str | Path, reason: str, part: str | None = None):
        self.path, self.reason, self.part = str(path), reason, part
        super().__init__(f"{path}: {reason}")

    def __reduce__(self):  # DataLoader workers re-raise it in the main process
        return (type(self), (self.path, self.reason, self.part))


def pixel_budget() -> int:
    """The pixel budget in force: ``$MEDP2X_PIXEL_BUDGET`` if set (read at every check, so
    DataLoader workers and bundles see the same value), else ``DEFAULT_PIXEL_BUDGET``."""
    text = os.environ.get(PIXEL_BUDGET_ENV, "").strip().replace("_", "")
    if not text:
        return DEFAULT_PIXEL_BUDGET
    try:
        value = int(float(text)) if "e" in text.lower() else int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise ValueError(
            f"{PIXEL_BUDGET_ENV}={text!r}: the pixel budget must be a positive integer"
        )
    return value


def set_pixel_budget(values: int) -> None:
    """Set the pixel budget for this process and the worker processes it starts."""
    if int(values) < 1:
        raise ValueError(f"the pixel budget must be a positive integer, not {values!r}")
    os.environ[PIXEL_BUDGET_ENV] = str(int(values))


def check_pixel_budget(path: str | Path, shape: Sequence[int], what: str = "image") -> None:
    """Refuse a file whose declared ``shape`` (H, W[, C] or X, Y, Z) has no pixels or more
    values than the pixel budget, *before* anything of that size is allocated."""
    dims = [int(n) for n in shape]
    text = " x ".join(map(str, dims))
    if not dims or min(dims) < 1:
        raise UnreadableFileError(path, f"{what} of declared size {text} has no pixels")
    values, budget = math.prod(dims), pixel_budget()
    if values > budget:
        raise UnreadableFileError(
            path,
            f"declared {what} size {text} = {values:,} values exceeds the pixel budget of "
            f"{budget:,} (a decompression bomb or a whole slide? raise {PIXEL_BUDGET_ENV} "
            "if the file is genuine)",
        )


@dataclass
class SkipLog:
    """Files skipped under ``on_error="skip"``, with their reasons (thread-safe)."""

    skipped: list[tuple[str, str]] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, path: str | Path, reason: str) -> None:
        with self._lock:
            self.skipped.append((str(path), reason))
        logger.warning("skipping %s: %s", path, reason)

    def __len__(self) -> int:
        return len(self.skipped)

    def __getstate__(self) -> dict:  # DataLoader workers started by "spawn" pickle datasets
        return {"skipped": list(self.skipped)}

    def __setstate__(self, state: dict) -> None:
        self.skipped, self._lock = state["skipped"], threading.Lock()

    def summary(self) -> str:
        if not self.skipped:
            return "all files readable"
        lines = [f"{len(self.skipped)} file(s) skipped:"]
        lines += [f"  {path}: {reason}" for path, reason in self.skipped]
        return "\n".join(lines)


class SkipUnreadable:
    """``__getitem__`` with the bad-file policy, on top of a reader's ``load(index)``.

    ``raise``: ``load`` as it is. ``skip``: the next readable sample stands in (wrapping round),
    each bad source file is recorded once in ``self.skipped`` and never tried again (a bad
    part of a file, ``UnreadableFileError.part``, only that sample), and
    ``meta["skipped"]`` says how many were passed over. A ``Dataset`` cannot drop an index, so
    standing in keeps batch shapes and epoch lengths; readers say which source file (slide,
    DICOM file, volume) a sample comes from with ``source_of``.
    """

    on_error: OnError
    skipped: SkipLog

    def load(self, index: int) -> dict:
        raise NotImplementedError

    def source_of(self, index: int) -> int:
        return index

    def __getitem__(self, index: int) -> dict:
        if not -len(self) <= index < len(self):  # type: ignore[arg-type]
            raise IndexError(f"sample {index} of {len(self)}")  # type: ignore[arg-type]
        if self.on_error == "raise":
            return self.load(index)
        bad: set[int] = self.__dict__.setdefault("_bad_sources", set())
        passed_over = 0
        for offset in range(len(self)):  # type: ignore[arg-type]
            candidate = (index + offset) % len(self)  # type: ignore[arg-type]
            source = self.source_of(candidate)
            if source in bad or ("part", candidate) in bad:
                continue
            try:
                sample = self.load(candidate)
            except UnreadableFileError as err:
                bad.add(("part", candidate) if err.part else source)  # a tile, or the file
                self.skipped.add(err.path, err.reason)
                passed_over += 1
                continue
            sample["meta"]["skipped"] = passed_over
            return sample
        raise UnreadableFileError(getattr(self, "root", "dataset"), "no readable sample left")


class SplitSubset(Subset):
    """One split of a dataset (``indices`` into it) that never serves another split's image.

    ``SkipUnreadable`` stands in the next readable sample *of the whole dataset*, which for a
    test split cut out of a shared dataset can be a training image with its label. Built by
    ``drop_unreadable``, a split holds only samples that were read once; should one fail later
    (the file changed), the next sample of the same split stands in and it is counted."""

    def __init__(self, dataset: Dataset, indices: Sequence[int], dropped: Sequence = ()):
        super().__init__(dataset, list(indices))
        self.dropped: list[tuple[str, str]] = list(dropped)  # (file, reason), found up front
        self.skipped = SkipLog()  # failures after the check

    def __getitem__(self, index: int) -> dict:
        load = getattr(self.dataset, "load", self.dataset.__getitem__)
        for offset in range(len(self.indices)):
            candidate = self.indices[(index + offset) % len(self.indices)]
            try:
                sample = load(candidate)
            except UnreadableFileError as err:
                self.skipped.add(err.path, err.reason)
                continue
            sample.setdefault("meta", {})["skipped"] = offset
            return sample
        raise UnreadableFileError(getattr(self.dataset, "root", "split"), "no readable sample left")

    def __getitems__(self, indices: list[int]) -> list[dict]:
        return [self[i] for i in indices]

    @property
    def classes(self) -> list[str] | None:  # the class names are the whole dataset's
        return getattr(self.dataset, "classes", None)


def flatten_subset(dataset: Dataset) -> tuple[Dataset, list[int]]:
    """(the dataset under any nesting of ``Subset``, the indices into it)."""
    indices: list[int] | None = None
    while isinstance(dataset, Subset):
        inner = [int(i) for i in dataset.indices]
        indices = inner if indices is None else [inner[i] for i in indices]
        dataset = dataset.dataset
    return dataset, list(range(len(dataset))) if indices is None else indices  # type: ignore[arg-type]


def drop_unreadable(split: Dataset) -> SplitSubset | Dataset:
    """``split`` without the samples that cannot be read (``split`` itself when all can), each
    bad file dropped from its own split and listed in ``.dropped``: a labelled split (train or test of an evaluation) must
    never have a bad file replaced by an image of another split. Every sample is decoded once,
    up front. Datasets without ``load`` (in-memory arrays, TFDS) are returned as they are."""
    base, indices = flatten_subset(split)
    load = getattr(base, "load", None)
    if load is None:
        return split
    keep, dropped, bad_files = [], [], set()
    for i in indices:
        source = base.source_of(i) if hasattr(base, "source_of") else i
        if source in bad_files:
            continue
        try:
            load(i)
        except UnreadableFileError as err:
            bad_files.add(source)
            dropped.append((err.path, err.reason))
            continue
        keep.append(i)
    if not dropped:
        return split  # as it was (a whole dataset keeps its attributes: classes, items)
    logger.warning("%d unreadable file(s) dropped from a split of %d", len(dropped), len(indices))
    return SplitSubset(base, keep, dropped)


def check_on_error(on_error: str) -> OnError:
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', not {on_error!r}")
    return on_error  # type: ignore[return-value]


def handle_bad_file(path: str | Path, reason: str, on_error: OnError, log: SkipLog) -> None:
    """Raise or record one unreadable file, according to the user's choice."""
    if on_error == "raise":
        raise UnreadableFileError(path, reason)
    log.add(path, reason)


def existing_path(path: str | Path, what: str = "data_dir") -> Path:
    """The path itself, or one clear error naming it and the setting it came from."""
    p = Path(path).expanduser()
    if not p.exists():
        raise FileNotFoundError(f"{what} {str(p)!r} does not exist")
    return p


def walk_tree(
    root: str | Path,
    wanted: Callable[[Path], bool] = lambda _: True,
    problems: list[tuple[str, str]] | None = None,
) -> list[Path]:
    """Regular files under ``root`` for which ``wanted(path)`` holds, sorted (reproducible
    sample order across machines). Links to files and folders are followed (archives are often
    assembled from links), each real folder once; what cannot be walked is not dropped in
    silence but appended to ``problems`` as (path, reason): a link whose target is missing, a
    link back into a folder above it, a folder that cannot be listed."""
    root = Path(root)
    found: list[Path] = []
    seen: set[str] = set()

    def note(path: Path | str, reason: str) -> None:
        if problems is not None:
            problems.append((str(path), reason))

    def visit(folder: Path) -> None:
        real = os.path.realpath(folder)
        if folder.is_symlink():
            above = os.path.realpath(folder.parent)
            if above == real or above.startswith(real.rstrip(os.sep) + os.sep):
                note(folder, "symbolic link loop (a link to a folder above it): not followed")
                return
        if real in seen:  # reached again through another link: read once
            return
        seen.add(real)
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError as err:
            note(folder, f"folder cannot be listed ({err.strerror}): its files are not read")
            return
        for entry in entries:
            path = Path(entry.path)
            try:
                is_dir, is_file = entry.is_dir(), entry.is_file()
            except OSError as err:
                note(path, f"cannot stat ({err.strerror})")
                continue
            if is_dir:
                visit(path)
            elif is_file:
                if wanted(path):
                    found.append(path)
            elif entry.is_symlink() and wanted(path):
                note(path, "dangling symbolic link (its target does not exist)")

    visit(root)
    return sorted(found)


def list_files(
    root: str | Path, suffixes: Iterable[str], problems: list[tuple[str, str]] | None = None
) -> list[Path]:
    """Files under ``root`` (or ``root`` itself) with one of the suffixes, sorted for
    reproducible sample order across machines (``walk_tree``: what cannot be walked goes to
    ``problems``)."""
    root = existing_path(root)
    wanted = tuple(s.lower() for s in suffixes)
    if root.is_file():
        return [root]
    return walk_tree(root, lambda p: p.name.lower().endswith(wanted), problems)


# ---------------------------------------------------------------------- sizes
def check_resize(resize: str) -> ResizeMode:
    if resize not in RESIZE_MODES:
        raise ValueError(f"resize must be one of {', '.join(RESIZE_MODES)}, not {resize!r}")
    return resize  # type: ignore[return-value]


def capped_shape(height: int, width: int, size: int) -> tuple[int, int]:
    """The shape an image of ``height`` x ``width`` takes under ``resize="cap"``: the same
    aspect, shorter side at most ``size`` and longer side at most ``CAP_LONGER_SIDE * size``
    (a padded batch is as large as its tallest and widest images), never enlarged. Rounded
    as torchvision's ``resize(image, [size], max_size=...)`` rounds."""
    short, long = sorted((height, width))
    max_long = CAP_LONGER_SIDE * size
    if short <= size and long <= max_long:
        return height, width
    new_short = min(short, size)
    new_long = int(new_short * long / short)
    if new_long > max_long:
        new_short, new_long = max(1, int(max_long * new_short / new_long)), max_long
    return (new_long, new_short) if height > width else (new_short, new_long)


def resize_to(
    image: torch.Tensor, size: int | Sequence[int] | None, mode: str = "square"
) -> torch.Tensor:
    """One C x H x W image brought to ``size`` by ``mode`` (bilinear, antialiased):

    - ``"square"``: ``size`` x ``size`` (or the (H, W) given): the aspect ratio is lost;
    - ``"shorter"``: shorter side exactly ``size``, aspect kept (torchvision's ``Resize(int)``,
      the first step of evaluation's resize and centre crop);
    - ``"cap"``: ``capped_shape``: aspect kept, only ever shrunk (pretraining sources).

    ``size=None``, or an image already of the target shape, is returned as it is."""
    if size is None:
        return image
    height, width = (int(n) for n in image.shape[-2:])
    shape = target_shape(height, width, size, mode)
    if shape == (height, width):
        return image
    return TF.resize(image, list(shape), antialias=True).clamp_(0.0, 1.0)


def target_shape(height: int, width: int, size: int | Sequence[int], mode: str) -> tuple[int, int]:
    """(H, W) that ``resize_to`` gives an image of ``height`` x ``width``."""
    check_resize(mode)
    if mode == "square":
        h, w = (size, size) if isinstance(size, int) else size
        return int(h), int(w)
    if not isinstance(size, int) or size < 1:
        raise ValueError(f'resize="{mode}" needs one positive image_size, not {size!r}')
    if mode == "cap":
        return capped_shape(height, width, size)
    short, long = sorted((height, width))
    new_long = int(size * long / short)
    return (new_long, size) if height > width else (size, new_long)
