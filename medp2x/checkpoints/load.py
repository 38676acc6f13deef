"""Reading a checkpoint file's raw object without running anything from it.

PyTorch files (zip or legacy) go through ``torch.load(weights_only=True)``; any other file is a
raw pickle and goes through the restricted unpickler (``unpickler.safe_unpickle``). TensorFlow
checkpoints are refused with the converters to use.
"""

from __future__ import annotations

import pickle
import re
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medp2x.checkpoints.unpickler import safe_unpickle

# torch.save's legacy (pre-zip) format starts with its pickled magic number.
_LEGACY_TORCH_MAGIC = b"\x80\x02\x8a\x0al\xfc\x9cF\xf9 j\xa8P\x19."


def load_file(path: str | Path) -> Any:
    """The raw object in a checkpoint file, without running anything from it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint file")
    if path.suffix == ".index" or ".data-0" in path.name:
        raise ValueError(
            f"{path}: a TensorFlow checkpoint (SimCLR's own release); convert it with "
            "tonylins/simclr-converter or Separius/SimCLRv2-Pytorch first (docs/checkpoints.md)"
        )
    with open(path, "rb") as f:
        head = f.read(len(_LEGACY_TORCH_MAGIC))
    if zipfile.is_zipfile(path) or head.startswith(_LEGACY_TORCH_MAGIC):
        return _torch_load(path)
    return safe_unpickle(path)


def _numpy_array_globals() -> list:
    """NumPy's array rebuilders, allow-listed for ``weights_only`` loads: medp2x run checkpoints
    carry NumPy's RNG state (a uint32 array) so resumed runs draw the same random numbers.
    They rebuild arrays from bytes and call nothing else."""
    core = getattr(np, "_core", None) or np.core
    return [core.multiarray._reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]


def torch_load_safe(path: str | Path) -> Any:
    """``torch.load(weights_only=True)`` that also accepts plain NumPy arrays."""
    with torch.serialization.safe_globals(_numpy_array_globals()):
        return torch.load(path, map_location="cpu", weights_only=True)


def _torch_load(path: Path) -> Any:
    try:
        return torch_load_safe(path)
    except pickle.UnpicklingError as err:
        found = re.search(r"GLOBAL ([\w.]+)", str(err))
        what = found[1] if found else "an object that is not a tensor or plain container"
        raise ValueError(
            f"{path}: refused to load {what}: a weights file should hold only tensors and plain "
            "containers (read with torch.load(weights_only=True); nothing in the file was run)"
        ) from None
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile) as err:
        raise ValueError(f"{path}: not a readable PyTorch file ({err})") from err
