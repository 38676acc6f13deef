"""The one sample contract every reader meets, and the shared bad-file policy.

A sample is a dict ``{"image": float32 tensor C x H x W in [0, 1], "label": int (-1 when
unlabelled), "meta": dict}``. ``meta`` never holds patient identifiers.

Readers take ``on_error="raise" | "skip"``. ``raise`` stops with one line naming the file and
the reason; ``skip`` drops the file, counts it, and the run reports the count at the end, so
one truncated file never kills a week-long run.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

logger = logging.getLogger("medp2x.data")

OnError = Literal["raise", "skip"]


class UnreadableFileError(ValueError):
    """A file a reader cannot turn into pixels. The message is ``<path>: <reason>``."""

    def __init__(self, path: str | Path, reason: str):
        self.path, self.reason = str(path), reason
        super().__init__(f"{path}: {reason}")


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
    each bad source file is recorded once in ``self.skipped`` and never tried again, and
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
            if source in bad:
                continue
            try:
                sample = self.load(candidate)
            except UnreadableFileError as err:
                bad.add(source)
                self.skipped.add(err.path, err.reason)
                passed_over += 1
                continue
            sample["meta"]["skipped"] = passed_over
            return sample
        raise UnreadableFileError(getattr(self, "root", "dataset"), "no readable sample left")


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


def list_files(root: str | Path, suffixes: Iterable[str]) -> list[Path]:
    """Files under ``root`` (or ``root`` itself) with one of the suffixes, sorted for
    reproducible sample order across machines."""
    root = existing_path(root)
    wanted = tuple(s.lower() for s in suffixes)
    if root.is_file():
        return [root]
    return sorted(p for p in root.rglob("*") if p.is_file() and p.name.lower().endswith(wanted))
