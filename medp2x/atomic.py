"""Atomic file writes: every file medp2x writes appears whole or not at all.

A write goes to a temporary file in the target's folder, then ``os.replace`` renames it over the
target (atomic on POSIX and Windows within one file system). A reader never sees half a file,
and an interrupted write leaves the previous version intact. This is the one implementation;
checkpoints, encoder files, reports, caches and provenance records all write through it.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any


def atomic_write(path: str | Path, write: Callable[[str], None]) -> Path:
    """Run ``write(tmp_path)`` then rename over ``path``. The temporary name keeps ``path``'s
    suffix (writers that pick a format from it still work) and gets the umask's permissions
    (``mkstemp``'s 0600 would otherwise outlive the rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    """``path.write_text(text)``, atomically."""
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """``path.write_bytes(data)``, atomically."""
    return atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))


def atomic_torch_save(obj: Any, path: str | Path) -> Path:
    """``torch.save(obj, path)``, atomically."""
    import torch  # imported late: the CLI's light commands never load torch for this module

    return atomic_write(path, lambda tmp: torch.save(obj, tmp))
