"""Resuming a run after a crash or a kill: which checkpoint to trust, and what to clean up.

A run killed at the wrong moment can leave a zero-byte or truncated newest checkpoint, a
temporary file of a save that never finished, and (after several restarts) more checkpoints
than ``keep_checkpoints`` asked for, since Ignite's ``Checkpoint`` only counts the files it
wrote itself. ``recover_checkpoints`` is what a resume does first:

1. removes the temporary files of interrupted saves (Ignite's atomic ``DiskSaver`` writes
   ``tmp*`` files beside the checkpoints and renames them when complete);
2. loads the newest checkpoint that loads (``torch.load(weights_only=True)``: nothing in a
   file is ever run) and holds a run's state, trying older ones in turn; each one passed over
   is named with the reason, and renamed ``<name>.unloadable`` so it is kept for inspection
   but never tried again;
3. ``Recovery.adopt`` hands the remaining checkpoints to the new ``Checkpoint`` handler, so
   ``keep_checkpoints`` counts them and the oldest go first.
"""

from __future__ import annotations

import logging
import os
import pickle
import re
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

logger = logging.getLogger("medp2x.recovery")

CHECKPOINT_PREFIX = "checkpoint"  # as medp2x.engine: checkpoint_<iteration>.pt
RUN_KEYS = ("model", "trainer")  # what a resumable run checkpoint must hold
UNLOADABLE_SUFFIX = ".unloadable"


@dataclass
class Recovery:
    """What ``recover_checkpoints`` found: the checkpoint to resume from (None: start fresh),
    its loaded state, and what was passed over or removed."""

    checkpoint_dir: Path
    path: Path | None = None
    state: dict | None = None
    skipped: list[tuple[Path, str]] = field(default_factory=list)  # (checkpoint, reason)
    removed_partial: list[Path] = field(default_factory=list)

    def adopt(self, saver: Any, keep: int | None, rank_zero: bool = True) -> None:
        """Give an Ignite ``Checkpoint`` handler the run's intact checkpoints on disk, newest
        ``keep`` of them (the others are deleted now), so that it rotates them as its own."""
        kept = checkpoint_files(self.checkpoint_dir)
        if keep:
            old, kept = kept[:-keep], kept[-keep:]
            for path in old if rank_zero else ():
                path.unlink(missing_ok=True)
                logger.info("removed %s (keep_checkpoints=%d)", path, keep)
        saver.load_state_dict({"_saved": [(iteration_of(p), p.name) for p in kept]})


def iteration_of(path: Path) -> int:
    return int(path.stem.rsplit("_", 1)[-1])


def checkpoint_files(checkpoint_dir: Path, prefix: str = CHECKPOINT_PREFIX) -> list[Path]:
    """``<prefix>_<iteration>.pt`` files, oldest first."""
    pattern = re.compile(rf"^{re.escape(prefix)}_(\d+)\.pt$")
    if not checkpoint_dir.is_dir():
        return []
    found = [p for p in checkpoint_dir.iterdir() if pattern.match(p.name) and p.is_file()]
    return sorted(found, key=iteration_of)


def remove_partial_saves(checkpoint_dir: Path) -> list[Path]:
    """Delete what an interrupted atomic save left: Ignite's ``DiskSaver`` writes
    ``tempfile.NamedTemporaryFile(dir=checkpoint_dir)`` files (``tmp<random>``) and renames
    them only when complete, so any such file is a save that never finished."""
    removed = []
    if checkpoint_dir.is_dir():
        for path in checkpoint_dir.iterdir():
            if path.name.startswith("tmp") and "." not in path.name and path.is_file():
                path.unlink(missing_ok=True)
                removed.append(path)
    return removed


def why_unloadable(path: Path, error: BaseException) -> str:
    """One line on why a checkpoint cannot be resumed from (no traceback, no advice to load
    it unsafely)."""
    try:
        size = path.stat().st_size
    except OSError as err:
        return f"cannot read it ({err.strerror})"
    if size == 0:
        return "empty file (0 bytes): a save was interrupted"
    if isinstance(error, pickle.UnpicklingError):
        found = re.search(r"GLOBAL ([\w.]+)", str(error))
        what = found[1] if found else "an object that is not a tensor or plain container"
        return f"refused: it holds {what} (loaded with weights_only=True; nothing in it was run)"
    if isinstance(error, (zipfile.BadZipFile, EOFError)) or "zip archive" in str(error):
        return f"truncated or damaged ({size:,} bytes; not a complete PyTorch archive)"
    return f"not loadable ({type(error).__name__})"


def _load_run_state(path: Path, load: Callable[[Path], Any]) -> dict:
    state = load(path)
    if not isinstance(state, dict) or any(key not in state for key in RUN_KEYS):
        raise KeyError("not a run checkpoint")
    return state


def newest_loadable_checkpoint(
    checkpoint_dir: str | Path, load: Callable[[Path], Any] | None = None
) -> Recovery:
    """The newest checkpoint in ``checkpoint_dir`` that loads and holds a run's state, trying
    older ones when it does not; ``Recovery.skipped`` names each one passed over and why."""
    if load is None:
        from medp2x.checkpoints import torch_load_safe as load
    recovery = Recovery(Path(checkpoint_dir))
    for path in reversed(checkpoint_files(recovery.checkpoint_dir)):
        try:
            state = _load_run_state(path, load)
        except MemoryError:
            raise
        except KeyError:
            recovery.skipped.append((path, "not a run checkpoint (no model or trainer state)"))
            continue
        except Exception as error:  # torch.load raises many types for damaged files
            recovery.skipped.append((path, why_unloadable(path, error)))
            continue
        recovery.path, recovery.state = path, state
        break
    return recovery


def recover_checkpoints(checkpoint_dir: str | Path, rank_zero: bool = True) -> Recovery:
    """What a resume does first (module docstring): clean up, find the newest loadable
    checkpoint, set the unloadable ones aside, and say so in one line each. Only rank 0
    changes files; every rank loads the same checkpoint."""
    checkpoint_dir = Path(checkpoint_dir)
    removed = remove_partial_saves(checkpoint_dir) if rank_zero else []
    recovery = newest_loadable_checkpoint(checkpoint_dir)
    recovery.removed_partial = removed
    for path in removed:
        message = f"removed {path}: the temporary file of a checkpoint save that never finished"
        logger.info(message)  # printed below: once on screen
        if rank_zero:
            print(message)
    for path, reason in recovery.skipped:
        message = f"checkpoint {path} skipped: {reason}"
        logger.info(message)  # printed below: once on screen
        if rank_zero:
            print(message)
            aside = path.with_name(path.name + UNLOADABLE_SUFFIX)
            os.replace(path, aside)
            print(f"  kept as {aside.name}; resuming from the newest loadable checkpoint")
    if recovery.skipped and recovery.path is None and rank_zero:
        print(f"no loadable checkpoint in {checkpoint_dir}: starting the run afresh")
    return recovery
