"""Read any supported ResNet checkpoint as a torchvision-layout backbone, safely and audibly.

P2X starts from someone else's ImageNet self-supervised weights. Each publisher uses its own
layout (see ``docs/checkpoints.md`` and DESIGN §3.6); this module maps all of them to
torchvision key names without ``fc`` and says exactly what it did in a ``LoadReport``:

=================  =========================================================================
format             layout read
=================  =========================================================================
torchvision        flat torchvision state dict (``fc.*`` ignored); a uniform ``module.``
                   prefix is stripped
swav               flat (or under ``state_dict``) with ``module.``; ``projection_head.*``
                   and ``prototypes.*`` ignored
moco               ``{'state_dict': {module.encoder_q.*, module.encoder_k.*, module.queue,
                   module.queue_ptr}, 'epoch', 'arch', 'optimizer'}``: encoder_q minus fc
simclr-tonylins    ``{'state_dict': torchvision names}`` (tonylins/simclr-converter)
simclr-separius    ``{'resnet': net.* names, 'head': ...}`` (Separius/SimCLRv2-Pytorch)
byol               the Haiku/dill pickle ``pretrain_res50x1.pkl``: ``{'experiment_state':
                   (online_params, target_params, online_state, target_state, opt_state),
                   'step', 'rng'}``; HWIO kernels, (1, 1, 1, C) batch-norm tensors
medp2x             medp2x encoder file (``save_encoder``) or engine training checkpoint
=================  =========================================================================

Safety: PyTorch files go through ``torch.load(weights_only=True)``. Raw pickles (the BYOL
file) go through ``_SafeUnpickler``, whose allow-list maps each permitted global to a local,
inert re-implementation (array and dtype proxies, plain records): nothing from numpy, dill,
jax or haiku is ever called with data from the file, and any other global is refused.
"""

from __future__ import annotations

import collections
import json
import math
import os
import pickle
import re
import zipfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medp2x import __version__
from medp2x.networks import ARCHS, IMAGENET_MEAN, IMAGENET_STD, build_encoder

FORMATS = (
    "torchvision",
    "swav",
    "moco",
    "simclr-tonylins",
    "simclr-separius",
    "byol",
    "medp2x",
)
GRAY_MODES = ("sum", "repeat")
ENCODER_FILE_VERSION = 1

IMAGENET = {"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)}
# SwAV's own training and evaluation code normalises with std 0.228 for red (main_swav.py).
SWAV_NORMALIZATION = {"mean": [0.485, 0.456, 0.406], "std": [0.228, 0.224, 0.225]}
PUBLISHED_NORMALIZATION: dict[str, dict | None] = {
    "torchvision": IMAGENET,
    "swav": SWAV_NORMALIZATION,
    "moco": IMAGENET,
    "simclr-tonylins": None,  # SimCLR was trained on [0, 1] images without mean/std
    "simclr-separius": None,
    "byol": IMAGENET,  # byol/utils/dataset.py normalize_images
}


# ----------------------------------------------------------------------------------------------
# The report
# ----------------------------------------------------------------------------------------------


@dataclass
class LoadReport:
    """What a load did: the format, which backbone keys came from the file, which are missing,
    which file entries were left out, and the input normalisation the weights expect
    (``None``: images in [0, 1] with no mean/std, as SimCLR)."""

    path: str
    format: str
    arch: str
    loaded: list[str]
    missing: list[str]
    ignored: list[str]
    normalization: dict | None
    in_channels: int = 3
    mismatched: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    detected: bool = True

    def __str__(self) -> str:
        how = "detected from the keys" if self.detected else "as requested"
        lines = [
            f"{self.path}",
            f"  format   {self.format} ({how}); torchvision {self.arch}, {self.in_channels} input channel(s)",
            f"  loaded   {len(self.loaded)} tensors; missing {len(self.missing)}; "
            f"shape mismatches {len(self.mismatched)}",
        ]
        if self.missing:
            lines.append(f"  missing  {summarize_keys(self.missing)}")
        if self.mismatched:
            lines.append(f"  mismatch {summarize_keys(self.mismatched, group=False)}")
        lines.append(
            f"  ignored  {len(self.ignored)}"
            + (f": {summarize_keys(self.ignored)}" if self.ignored else "")
        )
        lines.append(f"  input    {describe_normalization(self.normalization)}")
        lines += [f"  note     {note}" for note in self.notes]
        return "\n".join(lines)


def describe_normalization(normalization: dict | None) -> str:
    if normalization is None:
        return "images in [0, 1], no mean/std normalisation"
    mean = ", ".join(f"{v:.4g}" for v in normalization["mean"])
    std = ", ".join(f"{v:.4g}" for v in normalization["std"])
    return f"images in [0, 1], then (x - mean) / std with mean ({mean}), std ({std})"


def summarize_keys(keys: list[str], limit: int = 8, group: bool = True) -> str:
    """A short listing: keys grouped by their leading entry (``module.encoder_k.* (320)``),
    at most ``limit`` items and a count of the rest."""
    items = _group_keys(keys) if group else list(keys)
    shown = ", ".join(items[:limit])
    return shown + (f", ... (+{len(items) - limit} more)" if len(items) > limit else "")


def _group_keys(keys: list[str]) -> list[str]:
    groups: dict[str, list[str]] = {}
    for key in keys:
        parts = re.split(r"[./]", key)
        head = (
            ".".join(parts[:2])
            if parts[0] in ("module", "model", "resnet", "experiment_state")
            else parts[0]
        )
        groups.setdefault(head, []).append(key)
    out = []
    for members in groups.values():
        if len(members) == 1:
            out.append(members[0])
            continue
        prefix = os.path.commonprefix(members)
        cut = max(prefix.rfind("."), prefix.rfind("/"))
        out.append(f"{prefix[: cut + 1]}* ({len(members)})" if cut > 0 else f"{len(members)} keys")
    return out


# ----------------------------------------------------------------------------------------------
# Public entry points
# ----------------------------------------------------------------------------------------------


def read_checkpoint(
    path: str | Path,
    format: str = "auto",
    allow_partial: bool = False,
    in_channels: int | None = 3,
    gray: str = "sum",
    arch: str | None = None,
) -> tuple[dict[str, torch.Tensor], LoadReport]:
    """torchvision-layout backbone state dict (no ``fc``) and a ``LoadReport`` from any
    supported file. Strict unless ``allow_partial``: a missing backbone tensor or a shape that
    differs from torchvision's ``arch`` (inferred when None) raises ``ValueError``.

    ``in_channels=1`` turns an RGB stem into a gray one: ``gray="sum"`` sums the three input
    filters (folding a per-channel mean/std into the filters and ``bn1``), ``gray="repeat"``
    keeps the 3-channel stem for gray images repeated to 3 channels (``report.in_channels``
    is then 3).
    """
    if format != "auto" and format not in FORMATS:
        raise ValueError(
            f"unknown checkpoint format {format!r}; choose auto or one of {', '.join(FORMATS)}"
        )
    if gray not in GRAY_MODES:
        raise ValueError(f"gray must be one of {', '.join(GRAY_MODES)}, not {gray!r}")
    if in_channels not in (1, 3, None):
        raise ValueError(f"in_channels must be 1, 3 or None (as stored), not {in_channels}")
    path = Path(path)
    obj = load_file(path)
    fmt = detect_format(obj, path) if format == "auto" else format
    mapped = MAPPERS[fmt](obj, path)
    state, report = _assemble(path, fmt, mapped, arch, allow_partial)
    report.detected = format == "auto"
    state = _adapt_stem(path, state, report, in_channels, gray)
    return state, report


def load_encoder(
    path: str | Path,
    arch: str | None = None,
    in_channels: int | None = 3,
    format: str = "auto",
    allow_partial: bool = False,
    gray: str = "sum",
) -> tuple[torch.nn.Module, LoadReport]:
    """A torchvision ResNet (``fc`` = Identity, ``.feature_dim``) with the file's weights, and
    the report (its ``normalization`` is what the encoder's inputs need)."""
    state, report = read_checkpoint(path, format, allow_partial, in_channels, gray, arch=arch)
    if allow_partial:  # what the file lacks keeps torchvision's random initialisation
        encoder = build_encoder(report.arch, report.in_channels)
        encoder.load_state_dict(state, strict=False)
        return encoder, report
    with torch.device("meta"):  # every tensor comes from the file: skip the random init
        encoder = build_encoder(report.arch, report.in_channels)
    encoder.load_state_dict(state, strict=True, assign=True)
    return encoder, report


def infer_arch(state_dict: Mapping[str, Any]) -> str:
    """The torchvision ResNet a torchvision-layout state dict belongs to, from its block counts,
    block type and widths."""
    blocks = []
    for layer in range(1, 5):
        indices = {int(m[1]) for k in state_dict if (m := re.match(rf"layer{layer}\.(\d+)\.", k))}
        blocks.append(max(indices) + 1 if indices else 0)
    bottleneck = "layer1.0.conv3.weight" in state_dict
    table = {
        (False, (2, 2, 2, 2)): "resnet18",
        (False, (3, 4, 6, 3)): "resnet34",
        (True, (3, 4, 6, 3)): "resnet50",
        (True, (3, 4, 23, 3)): "resnet101",
        (True, (3, 8, 36, 3)): "resnet152",
    }
    arch = table.get((bottleneck, tuple(blocks)))
    if arch is None:
        kind = "bottleneck" if bottleneck else "basic"
        raise ValueError(
            f"not a torchvision ResNet: {kind} blocks per stage {tuple(blocks)} "
            f"(supported: {', '.join(ARCHS)}); pass arch= to force one"
        )
    if arch == "resnet50" and _out_channels(state_dict, "layer1.0.conv3.weight") == 256:
        if _out_channels(state_dict, "layer1.0.conv1.weight") == 128:
            return "wide_resnet50_2"
    return arch


def _out_channels(state_dict: Mapping[str, Any], key: str) -> int | None:
    value = state_dict.get(key)
    return int(value.shape[0]) if value is not None and len(value.shape) else None


def save_encoder(
    path: str | Path,
    state_dict: Mapping[str, torch.Tensor],
    arch: str,
    in_channels: int,
    normalization: dict | None,
    method: str | None = None,
    version: str | None = None,
) -> Path:
    """Write a medp2x encoder file atomically: ``{"medp2x": {version, arch, in_channels,
    normalization, method, file_version}, "state_dict": backbone without fc}``. The header
    keeps the normalisation with the weights, which a bare state dict cannot."""
    meta = {
        "version": version or __version__,
        "file_version": ENCODER_FILE_VERSION,
        "arch": arch,
        "in_channels": int(in_channels),
        "normalization": _plain_normalization(normalization),
        "method": method,
    }
    tensors = {
        k: v.detach().cpu().contiguous() for k, v in state_dict.items() if not k.startswith("fc.")
    }
    return atomic_torch_save({"medp2x": meta, "state_dict": tensors}, path)


def export_state_dict(
    path: str | Path, state_dict: Mapping[str, torch.Tensor], report: LoadReport
) -> Path:
    """Write a bare torchvision-layout state dict (readable by any tool) and, beside it,
    ``<path>.json`` with the normalisation and origin, which ``read_checkpoint`` picks up so
    converted SimCLR weights are not mistaken for ImageNet-normalised ones."""
    path = atomic_torch_save({k: v.contiguous() for k, v in state_dict.items()}, path)
    sidecar = {
        "written_by": "medp2x convert",
        "medp2x_version": __version__,
        "source": Path(report.path).name,
        "source_format": report.format,
        "arch": report.arch,
        "in_channels": report.in_channels,
        "normalization": report.normalization,
    }
    _atomic_write_text(sidecar_path(path), json.dumps(sidecar, indent=2) + "\n")
    return path


def sidecar_path(path: str | Path) -> Path:
    return Path(f"{path}.json")


def atomic_torch_save(obj: Any, path: str | Path) -> Path:
    """``torch.save`` to a temporary file in the target folder, then ``os.replace``: a reader
    never sees half a file, and an interrupted write leaves the old one intact."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _plain_normalization(normalization: Any) -> dict | None:
    if normalization is None:
        return None
    if hasattr(normalization, "mean") and not isinstance(normalization, Mapping):
        normalization = {"mean": normalization.mean, "std": normalization.std}
    if normalization.get("mean") is None:
        return None
    return {
        k: [float(v) for v in np.asarray(normalization[k], dtype=np.float64).reshape(-1)]
        for k in ("mean", "std")
    }


# ----------------------------------------------------------------------------------------------
# Reading files: torch.load(weights_only=True), or the restricted unpickler for raw pickles
# ----------------------------------------------------------------------------------------------

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


class _Refused(Exception):
    """A global the allow-list does not permit (raised inside the unpickler)."""


class _ArrayMarker:
    """Stands for ``numpy.ndarray`` inside a pickle; deliberately not callable, so the real
    class (whose constructor takes buffers, offsets and strides) is never exposed."""

    __slots__ = ()


_ARRAY_MARKER = _ArrayMarker()
_MAX_ARRAY_BYTES = 1 << 34
_SIMPLE_DTYPE = re.compile(r"^[<>|=]?(?:b1|\?|[iu][1248]|f[248]|c(?:8|16))$")


class _DTypeSpec:
    """Inert stand-in for ``numpy.dtype(spec, align, copy)``: keeps the spec and the byte order
    from the pickled state; ``resolve`` builds a real dtype only for plain numeric codes."""

    def __init__(self, spec: Any, align: Any = False, copy: Any = True):
        if not isinstance(spec, str) or not _SIMPLE_DTYPE.match(spec):
            raise _Refused(f"numpy dtype {spec!r} (only plain numeric arrays are read)")
        self.spec = spec
        self.byteorder = "="

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, tuple) and len(state) > 1 and state[1] in ("<", ">", "|", "="):
            self.byteorder = state[1]

    def resolve(self) -> np.dtype:
        dtype = np.dtype(self.spec)
        return dtype.newbyteorder(self.byteorder) if self.byteorder in "<>" else dtype


class _ArrayProxy:
    """Inert stand-in for an unpickled ndarray: ``__setstate__`` only records (shape, dtype,
    order, bytes); ``materialize`` builds the array with ``np.frombuffer`` after checking the
    byte count, so numpy never parses anything else from the file."""

    def __init__(self) -> None:
        self.array: np.ndarray | None = None
        self.state: Any = None

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def materialize(self) -> np.ndarray:
        if self.array is None:
            self.array = _array_from_state(self.state)
        return self.array


def _array_from_state(state: Any) -> np.ndarray:
    if not (isinstance(state, tuple) and len(state) == 5):
        raise _Refused("a numpy array with an unknown state layout")
    _, shape, dtype, fortran, data = state
    if not isinstance(dtype, _DTypeSpec) or not isinstance(data, bytes | bytearray):
        raise _Refused("a numpy array that is not plain numeric data")
    if not (isinstance(shape, tuple) and all(isinstance(n, int) and n >= 0 for n in shape)):
        raise _Refused(f"a numpy array with shape {shape!r}")
    dt = dtype.resolve()
    if math.prod(shape) * dt.itemsize != len(data) or len(data) > _MAX_ARRAY_BYTES:
        raise _Refused(f"a numpy array whose data ({len(data)} bytes) does not fit {shape} x {dt}")
    array = np.frombuffer(data, dtype=dt).reshape(shape, order="F" if fortran else "C")
    return array.astype(dt.newbyteorder("="), copy=True)


def _reconstruct(subtype: Any, shape: Any, typecode: Any) -> _ArrayProxy:
    """``numpy.core.multiarray._reconstruct`` for plain ndarrays only."""
    if subtype is not _ARRAY_MARKER:
        raise _Refused(f"array reconstruction of {type(subtype).__name__}")
    return _ArrayProxy()


def _scalar(dtype: Any, data: Any = b"") -> Any:
    """``numpy.core.multiarray.scalar`` for numeric scalars (e.g. a pickled step counter)."""
    if not isinstance(dtype, _DTypeSpec) or not isinstance(data, bytes):
        raise _Refused("a numpy scalar that is not plain numeric data")
    dt = dtype.resolve()
    if len(data) != dt.itemsize:
        raise _Refused("a numpy scalar with the wrong byte count")
    return np.frombuffer(data, dtype=dt)[0].item()


def _latin1(text: Any, encoding: Any = "latin1") -> bytes:
    """``_codecs.encode``: how protocol-2 pickles spell bytes in Python 3; latin-1 text only."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise _Refused(f"_codecs.encode with {type(text).__name__} / {encoding!r}")
    return text.encode("latin1")


def _dill_create_array(f: Any, args: Any, state: Any, npdict: Any = None) -> _ArrayProxy:
    """``dill._dill._create_array``: dill's wrapper around ndarray's own reduce."""
    if f is not _reconstruct or not isinstance(args, tuple) or npdict:
        raise _Refused("dill._dill._create_array with anything but a plain ndarray")
    proxy = _reconstruct(*args)
    proxy.__setstate__(state)
    return proxy


def _record_type(name: Any, fields: Any) -> type:
    """An inert namedtuple standing for a publisher's state record (never imported)."""
    if not isinstance(name, str) or not isinstance(fields, tuple | list) or len(fields) > 64:
        raise _Refused("a namedtuple definition with unexpected arguments")
    if not all(isinstance(f, str) for f in fields):
        raise _Refused("a namedtuple definition with non-string fields")
    safe_name = name if name.isidentifier() else "Record"
    return collections.namedtuple(safe_name, list(fields), rename=True)


def _dill_create_namedtuple(
    name: Any, fields: Any, module: Any = None, defaults: Any = None
) -> type:
    """``dill._dill._create_namedtuple``: builds the record locally instead of importing
    ``module`` (which the real dill does first)."""
    return _record_type(name, fields)


def _plain_dict(mapping: Any = ()) -> dict:
    """Haiku 0.0.x ``frozendict`` (reduced to ``(frozendict, (dict,))``) as a plain dict."""
    if not isinstance(mapping, Mapping):
        raise _Refused("a frozendict built from something other than a dict")
    return dict(mapping)


def _known_record(name: str, fields: tuple[str, ...]) -> Callable[[], type]:
    return lambda: _record_type(name, fields)


_BYOL_STATE_FIELDS = ("online_params", "target_params", "online_state", "target_state", "opt_state")
# Records BYOL's checkpoint holds when pickled by reference (byol installed at save time).
_KNOWN_RECORDS = {
    "byol.byol_experiment._ByolExperimentState": _known_record(
        "_ByolExperimentState", _BYOL_STATE_FIELDS
    ),
    "byol.utils.optimizers.ScaleByLarsState": _known_record("ScaleByLarsState", ("mu",)),
    "byol.utils.optimizers.AddWeightDecayState": _known_record("AddWeightDecayState", ()),
    "optax._src.transform.ScaleState": _known_record("ScaleState", ()),
    "optax._src.base.EmptyState": _known_record("EmptyState", ()),
    "optax._src.transform.TraceState": _known_record("TraceState", ("trace",)),
}
_SAFE_GLOBALS: dict[str, Any] = {
    "numpy.ndarray": _ARRAY_MARKER,
    "numpy.dtype": _DTypeSpec,
    "numpy.core.multiarray._reconstruct": _reconstruct,
    "numpy._core.multiarray._reconstruct": _reconstruct,
    "numpy.core.multiarray.scalar": _scalar,
    "numpy._core.multiarray.scalar": _scalar,
    "_codecs.encode": _latin1,
    "collections.OrderedDict": collections.OrderedDict,
    "dill._dill._create_array": _dill_create_array,
    "dill._dill._create_namedtuple": _dill_create_namedtuple,
    "haiku._src.data_structures.frozendict": _plain_dict,
}


class _SafeUnpickler(pickle.Unpickler):
    """Resolves only the allow-listed globals, each to a local inert function."""

    def find_class(self, module: str, name: str) -> Any:
        key = f"{module}.{name}"
        if key in _SAFE_GLOBALS:
            return _SAFE_GLOBALS[key]
        if key in _KNOWN_RECORDS:
            return _KNOWN_RECORDS[key]()
        raise _Refused(f"{key}: not an array or plain container")

    def persistent_load(self, pid: Any) -> Any:
        raise _Refused("a persistent id: not an array or plain container")


def safe_unpickle(path: str | Path) -> Any:
    """A raw pickle (BYOL's Haiku/dill file) rebuilt from numpy arrays and plain containers
    only; anything that would import or call other code is refused before it runs."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            obj = _SafeUnpickler(f).load()
        return _materialize(obj)
    except _Refused as err:
        raise ValueError(
            f"{path}: refused to unpickle {err}. Nothing in the file was run. If it is a genuine "
            "checkpoint that needs more, convert it in an isolated environment with its own "
            "libraries to a torch.save state dict (docs/checkpoints.md)"
        ) from None
    except Exception as err:  # noqa: BLE001 - any other failure on untrusted bytes: unreadable
        raise ValueError(
            f"{path}: not a PyTorch file or a readable pickle ({type(err).__name__}: {err})"
        ) from None


def _materialize(obj: Any) -> Any:
    """Replace array proxies by real arrays throughout plain containers."""
    if isinstance(obj, _ArrayProxy):
        return obj.materialize()
    if isinstance(obj, dict):
        return type(obj)((k, _materialize(v)) for k, v in obj.items())
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):
        return type(obj)._make(_materialize(v) for v in obj)
    if isinstance(obj, list | tuple):
        return type(obj)(_materialize(v) for v in obj)
    if isinstance(obj, _DTypeSpec | _ArrayMarker) or callable(obj):
        raise _Refused(f"{type(obj).__name__} left in the data: not an array or plain container")
    return obj


# ----------------------------------------------------------------------------------------------
# Format detection
# ----------------------------------------------------------------------------------------------


def detect_format(obj: Any, path: str | Path = "<checkpoint>") -> str:
    """The format of a loaded checkpoint object, from its structure and key names."""
    if not isinstance(obj, Mapping):
        raise ValueError(f"{path}: expected a dict of weights, found {type(obj).__name__}")
    if "medp2x" in obj and "state_dict" in obj:
        return "medp2x"
    if isinstance(obj.get("model"), Mapping) and any(
        str(k).startswith(("encoder.", "module.encoder.")) for k in obj["model"]
    ):
        return "medp2x"
    if "experiment_state" in obj or (
        "params" in obj
        and "state" in obj
        and isinstance(obj["params"], Mapping)
        and any("/~/" in str(k) for k in obj["params"])
    ):
        return "byol"
    if isinstance(obj.get("resnet"), Mapping) and any(
        str(k).startswith("net.") for k in obj["resnet"]
    ):
        return "simclr-separius"
    wrapped = isinstance(obj.get("state_dict"), Mapping)
    state = obj["state_dict"] if wrapped else obj
    keys = [str(k) for k in state]
    if any(k.startswith(("module.encoder_q.", "encoder_q.")) for k in keys):
        return "moco"
    bare = [k.removeprefix("module.") for k in keys]
    if any(k.startswith(("projection_head.", "prototypes.")) for k in bare):
        return "swav"
    if any(k.startswith("net.0.0.") for k in keys):
        return "simclr-separius"
    if "conv1.weight" in bare and any(k.startswith("layer1.") for k in bare):
        # tonylins/simclr-converter saves {'state_dict': model.state_dict()} and nothing else.
        return "simclr-tonylins" if wrapped and len(obj) == 1 else "torchvision"
    preview = ", ".join(keys[:5])
    raise ValueError(
        f"{path}: cannot tell the checkpoint format from its keys ({preview}, ...); "
        f"pass format= one of {', '.join(FORMATS)}"
    )


# ----------------------------------------------------------------------------------------------
# Mappers: file object -> {torchvision name: (source name, array)} + what was left out
# ----------------------------------------------------------------------------------------------


@dataclass
class _Mapped:
    tensors: dict[str, tuple[str, Any]]
    ignored: list[str]
    normalization: dict | None
    notes: list[str] = field(default_factory=list)
    arch: str | None = None


def _require_mapping(value: Any, what: str, path: Path) -> Mapping:
    if not isinstance(value, Mapping):
        raise ValueError(
            f"{path}: expected {what} to be a dict of tensors, found {type(value).__name__}"
        )
    return value


def _unwrap(obj: Mapping) -> tuple[Mapping, list[str]]:
    """The state dict (under ``state_dict`` or the object itself) and the other top-level
    entries (epoch, arch, optimizer, ...), which are ignored."""
    if isinstance(obj.get("state_dict"), Mapping):
        return obj["state_dict"], [str(k) for k in obj if k != "state_dict"]
    return obj, []


def _strip_uniform(state: Mapping, prefix: str) -> dict[str, tuple[str, Any]]:
    """{name without ``prefix``: (source name, value)}, stripping only when every key has it
    (``module.`` from DistributedDataParallel)."""
    keys = [str(k) for k in state]
    strip = bool(keys) and all(k.startswith(prefix) for k in keys)
    return {
        (k.removeprefix(prefix) if strip else k): (k, v)
        for k, v in zip(keys, state.values(), strict=True)
    }


def _map_torchvision(obj: Mapping, path: Path) -> _Mapped:
    state, extra = _unwrap(obj)
    tensors = _strip_uniform(state, "module.")
    mapped = _Mapped(tensors, extra, IMAGENET)
    _apply_sidecar(path, mapped)
    return mapped


def _apply_sidecar(path: Path, mapped: _Mapped) -> None:
    """A ``medp2x convert`` output keeps its normalisation in ``<file>.json``."""
    sidecar = sidecar_path(path)
    if not sidecar.is_file():
        return
    try:
        info = json.loads(sidecar.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"{sidecar}: unreadable medp2x convert metadata ({err})") from err
    if not isinstance(info, dict) or info.get("written_by") != "medp2x convert":
        return
    mapped.normalization = _plain_normalization(info.get("normalization"))
    mapped.notes.append(
        f"converted by medp2x from {info.get('source_format')} ({info.get('source')}); "
        f"normalisation from {sidecar.name}"
    )


def _map_tonylins(obj: Mapping, path: Path) -> _Mapped:
    state = _require_mapping(obj.get("state_dict"), "'state_dict'", path)
    tensors = _strip_uniform(state, "module.")
    extra = [str(k) for k in obj if k != "state_dict"]
    notes = []
    if "fc.bias" in tensors:
        notes.append(
            "simclr-converter never loads fc.bias (random in the file); fc is dropped anyway"
        )
    return _Mapped(tensors, extra, None, notes)


def _map_swav(obj: Mapping, path: Path) -> _Mapped:
    state, extra = _unwrap(obj)
    tensors = _strip_uniform(state, "module.")
    heads = {k: v for k, v in tensors.items() if k.startswith(("projection_head.", "prototypes."))}
    kept = {k: v for k, v in tensors.items() if k not in heads}
    return _Mapped(kept, extra + [src for src, _ in heads.values()], SWAV_NORMALIZATION)


def _map_moco(obj: Mapping, path: Path) -> _Mapped:
    state, extra = _unwrap(obj)
    prefix = next(
        (
            p
            for p in ("module.encoder_q.", "encoder_q.")
            if any(str(k).startswith(p) for k in state)
        ),
        None,
    )
    if prefix is None:
        raise ValueError(f"{path}: no module.encoder_q.* keys: not a MoCo checkpoint")
    tensors, ignored = {}, list(extra)
    for key, value in state.items():
        key = str(key)
        name = key.removeprefix(prefix)
        if key.startswith(prefix) and not name.startswith("fc."):
            tensors[name] = (key, value)
        else:
            ignored.append(key)
    return _Mapped(tensors, ignored, IMAGENET)


_SEPARIUS_RULES: list[tuple[re.Pattern, Callable[[re.Match], str]]] = [
    (re.compile(r"net\.0\.0\.weight"), lambda m: "conv1.weight"),
    (re.compile(r"net\.0\.1\.0\.(\w+)"), lambda m: f"bn1.{m[1]}"),
    (
        re.compile(r"net\.([1-4])\.blocks\.(\d+)\.net\.([024])\.weight"),
        lambda m: f"layer{m[1]}.{m[2]}.conv{int(m[3]) // 2 + 1}.weight",
    ),
    (
        re.compile(r"net\.([1-4])\.blocks\.(\d+)\.net\.([135])\.0\.(\w+)"),
        lambda m: f"layer{m[1]}.{m[2]}.bn{(int(m[3]) + 1) // 2}.{m[4]}",
    ),
    (
        re.compile(r"net\.([1-4])\.blocks\.(\d+)\.projection\.shortcut\.weight"),
        lambda m: f"layer{m[1]}.{m[2]}.downsample.0.weight",
    ),
    (
        re.compile(r"net\.([1-4])\.blocks\.(\d+)\.projection\.bn\.0\.(\w+)"),
        lambda m: f"layer{m[1]}.{m[2]}.downsample.1.{m[3]}",
    ),
]


def _map_separius(obj: Mapping, path: Path) -> _Mapped:
    if isinstance(obj.get("resnet"), Mapping):
        state, source_prefix, extra = obj["resnet"], "resnet.", []
        for key, value in obj.items():  # the projection head and anything else
            if key != "resnet":
                extra += [f"{key}.{k}" for k in value] if isinstance(value, Mapping) else [str(key)]
    else:
        (state, extra), source_prefix = _unwrap(obj), ""
    tensors, ignored = {}, list(extra)
    for key, value in state.items():
        key = str(key)
        for pattern, rename in _SEPARIUS_RULES:
            if m := pattern.fullmatch(key):
                tensors[rename(m)] = (source_prefix + key, value)
                break
        else:
            ignored.append(source_prefix + key)
    notes = []
    if any(
        "mixing_conv" in k or "shortcut.2." in k or k.startswith("net.0.2.")
        for k in map(str, state)
    ):
        notes.append(
            "selective-kernel (sk1) SimCLRv2 models have no torchvision equivalent; use an sk0 file"
        )
    return _Mapped(tensors, ignored, None, notes)


_BYOL_RULES: list[tuple[re.Pattern, Callable[[re.Match], str]]] = [
    (re.compile(r"(?:.*/~/)?initial_conv(?:_\d+)?"), lambda m: "conv1"),
    (re.compile(r"(?:.*/~/)?initial_batchnorm(?:_\d+)?"), lambda m: "bn1"),
    (
        re.compile(r"(?:.*/~/)?block_group_(\d+)/~/block_(\d+)/~/conv_(\d+)"),
        lambda m: f"layer{int(m[1]) + 1}.{m[2]}.conv{int(m[3]) + 1}",
    ),
    (
        re.compile(r"(?:.*/~/)?block_group_(\d+)/~/block_(\d+)/~/batchnorm_(\d+)"),
        lambda m: f"layer{int(m[1]) + 1}.{m[2]}.bn{int(m[3]) + 1}",
    ),
    (
        re.compile(r"(?:.*/~/)?block_group_(\d+)/~/block_(\d+)/~/shortcut_conv"),
        lambda m: f"layer{int(m[1]) + 1}.{m[2]}.downsample.0",
    ),
    (
        re.compile(r"(?:.*/~/)?block_group_(\d+)/~/block_(\d+)/~/shortcut_batchnorm"),
        lambda m: f"layer{int(m[1]) + 1}.{m[2]}.downsample.1",
    ),
]
_HAIKU_PARAM = {"w": "weight", "scale": "weight", "offset": "bias"}


def _byol_module(name: str) -> str | None:
    for pattern, rename in _BYOL_RULES:
        if m := pattern.fullmatch(name):
            return rename(m)
    return None


def _byol_trees(obj: Mapping, path: Path) -> tuple[Mapping, Mapping, list[str]]:
    """(online params, online state, ignored entries) from the released layout
    ``{'experiment_state': (online_params, ...), 'step', 'rng'}`` or ``{'params', 'state'}``."""
    if "experiment_state" in obj:
        exp = obj["experiment_state"]
        fields = list(exp.keys()) if isinstance(exp, Mapping) else list(getattr(exp, "_fields", []))
        get = exp.get if isinstance(exp, Mapping) else lambda name: getattr(exp, name, None)
        params, state = get("online_params"), get("online_state")
        ignored = [
            f"experiment_state.{f}" for f in fields if f not in ("online_params", "online_state")
        ]
        ignored += [str(k) for k in obj if k != "experiment_state"]
    else:
        params, state = obj.get("params"), obj.get("state")
        ignored = [str(k) for k in obj if k not in ("params", "state")]
    params = _require_mapping(params, "BYOL online_params", path)
    state = _require_mapping(state, "BYOL online_state", path)
    return params, state, ignored


def _map_byol(obj: Mapping, path: Path) -> _Mapped:
    params, state, ignored = _byol_trees(obj, path)
    tensors: dict[str, tuple[str, Any]] = {}
    for module, entries in params.items():
        target = _byol_module(str(module))
        for pname, value in _require_mapping(entries, f"BYOL params of {module}", path).items():
            source = f"{module}/{pname}"
            if target is None or pname not in _HAIKU_PARAM:
                ignored.append(source)
                continue
            array = _as_array(value, source, path)
            if pname == "w":  # Haiku conv kernels are HWIO; torch wants OIHW
                array = np.transpose(array, (3, 2, 0, 1))
            else:  # batch-norm scale/offset are stored as (1, 1, 1, C)
                array = array.reshape(-1)
            tensors[f"{target}.{_HAIKU_PARAM[pname]}"] = (source, array)
    for name, entries in state.items():
        module, _, stat = str(name).rpartition("/~/")
        target = _byol_module(module)
        if target is None or stat not in ("mean_ema", "var_ema"):
            ignored.append(str(name))
            continue
        entries = _require_mapping(entries, f"BYOL state {name}", path)
        if "average" not in entries:
            raise ValueError(f"{path}: BYOL state {name} has no 'average'")
        stat_name = "running_mean" if stat == "mean_ema" else "running_var"
        tensors[f"{target}.{stat_name}"] = (
            f"{name}/average",
            _as_array(entries["average"], name, path).reshape(-1),
        )
        if stat == "mean_ema" and "counter" in entries:
            counter = np.asarray(_as_array(entries["counter"], name, path), dtype=np.int64).reshape(
                ()
            )
            tensors[f"{target}.num_batches_tracked"] = (f"{name}/counter", counter)
    notes = [
        "BN statistics from Haiku's mean_ema/var_ema 'average' (counter -> num_batches_tracked)",
        "Haiku pads stride-2 layers 'SAME' (asymmetrically), torchvision symmetrically: outputs "
        "differ slightly from the JAX model, as with every PyTorch port of these weights",
    ]
    return _Mapped(tensors, ignored, IMAGENET, notes)


def _map_medp2x(obj: Mapping, path: Path) -> _Mapped:
    if "medp2x" in obj:
        meta = _require_mapping(obj["medp2x"], "'medp2x' header", path)
        state = _require_mapping(obj.get("state_dict"), "'state_dict'", path)
        tensors = {str(k): (str(k), v) for k, v in state.items()}
        extra = [str(k) for k in obj if k not in ("medp2x", "state_dict")]
        return _Mapped(
            tensors, extra, _plain_normalization(meta.get("normalization")), arch=meta.get("arch")
        )
    model = _require_mapping(obj.get("model"), "'model'", path)
    model_keys = _strip_uniform(model, "module.")
    tensors, ignored = {}, [str(k) for k in obj if k != "model"]
    for name, (source, value) in model_keys.items():
        inner = name.removeprefix("encoder.")
        if name.startswith("encoder.") and not inner.startswith("fc."):
            tensors[inner] = (f"model.{source}", value)
        else:
            ignored.append(f"model.{source}")
    meta, notes = _training_meta(obj, path)
    normalization = (
        _plain_normalization(meta["normalization"]) if "normalization" in meta else IMAGENET
    )
    if "normalization" not in meta:
        notes.append(
            "no normalisation recorded with this training checkpoint; assuming ImageNet mean/std"
        )
    return _Mapped(tensors, ignored, normalization, notes, arch=meta.get("arch"))


def _training_meta(obj: Mapping, path: Path) -> tuple[dict, list[str]]:
    """The run's header: in the checkpoint (``meta``), else the run's ``run_config.json``."""
    if isinstance(obj.get("meta"), Mapping):
        return dict(obj["meta"]), []
    for folder in (path.parent, path.parent.parent):
        config = folder / "run_config.json"
        if config.is_file():
            try:
                meta = json.loads(config.read_text()).get("meta") or {}
            except (OSError, json.JSONDecodeError, AttributeError):
                continue
            return dict(meta), [f"run settings from {config}"]
    return {}, []


MAPPERS: dict[str, Callable[[Mapping, Path], _Mapped]] = {
    "torchvision": _map_torchvision,
    "swav": _map_swav,
    "moco": _map_moco,
    "simclr-tonylins": _map_tonylins,
    "simclr-separius": _map_separius,
    "byol": _map_byol,
    "medp2x": _map_medp2x,
}


# ----------------------------------------------------------------------------------------------
# Assembly: check against torchvision's shapes, strict or partial
# ----------------------------------------------------------------------------------------------


def _as_array(value: Any, source: str, path: Path) -> np.ndarray:
    if isinstance(value, np.ndarray):
        return value
    if isinstance(value, int | float | np.generic):
        return np.asarray(value)
    raise ValueError(f"{path}: {source} is a {type(value).__name__}, not an array")


def _as_tensor(value: Any, source: str, path: Path) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value.detach()
    return torch.from_numpy(np.array(_as_array(value, source, path), order="C", copy=True))


@lru_cache(maxsize=16)
def _reference_shapes(arch: str, in_channels: int) -> dict[str, tuple[int, ...]]:
    """torchvision's state-dict shapes for ``arch`` (built on the meta device: no memory)."""
    with torch.device("meta"):
        encoder = build_encoder(arch, in_channels)
    return {k: tuple(v.shape) for k, v in encoder.state_dict().items()}


def _assemble(
    path: Path, fmt: str, mapped: _Mapped, arch: str | None, allow_partial: bool
) -> tuple[dict[str, torch.Tensor], LoadReport]:
    arrays = {name: value for name, (_, value) in mapped.tensors.items() if hasattr(value, "shape")}
    stem = arrays.get("conv1.weight")
    stem_channels = int(stem.shape[1]) if stem is not None and len(stem.shape) == 4 else 3
    if arch is None:
        try:
            arch = mapped.arch if mapped.arch in ARCHS else infer_arch(arrays)
        except ValueError as err:
            raise ValueError(f"{path}: {fmt} checkpoint: {err}") from None
    elif arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; choose one of {', '.join(ARCHS)}")
    expected = _reference_shapes(arch, stem_channels)
    tensors = {
        name: _as_tensor(value, src, path)
        for name, (src, value) in mapped.tensors.items()
        if name in expected
    }
    loaded, missing, mismatched = [], [], []
    for name, shape in expected.items():
        if name not in tensors:
            if not name.endswith("num_batches_tracked"):
                missing.append(name)
        elif tuple(tensors[name].shape) != shape:
            mismatched.append(f"{name} (file {tuple(tensors[name].shape)}, {arch} {shape})")
        else:
            loaded.append(name)
    ignored = mapped.ignored + [
        src for name, (src, _) in mapped.tensors.items() if name not in expected
    ]
    notes = list(mapped.notes)
    if (missing or mismatched) and not allow_partial:
        problems = []
        if missing:
            problems.append(
                f"{len(missing)} backbone tensor(s) missing: {summarize_keys(missing, group=False)}"
            )
        if mismatched:
            problems.append(
                f"{len(mismatched)} shape mismatch(es): {summarize_keys(mismatched, group=False)}"
            )
        hint = f" ({notes[-1]})" if fmt == "simclr-separius" and notes else ""
        raise ValueError(
            f"{path}: not a complete torchvision {arch} backbone in {fmt} layout: "
            + "; ".join(problems)
            + f"{hint}. Pass allow_partial=True (medp2x convert --allow-partial) to load the rest, "
            "arch= for another architecture, or format= if the detected format is wrong"
        )
    state: dict[str, torch.Tensor] = {}
    filled, cast = 0, set()
    for name in expected:
        if name in loaded:
            tensor = tensors[name]
            if tensor.is_floating_point() and tensor.dtype != torch.float32:
                cast.add(str(tensor.dtype).removeprefix("torch."))  # torchvision models are fp32
                tensor = tensor.float()
            state[name] = tensor.contiguous()
        elif name.endswith("num_batches_tracked") and name.rsplit(".", 1)[0] + ".weight" in loaded:
            state[name] = torch.zeros((), dtype=torch.long)
            filled += 1
    if cast:
        notes.append(f"weights stored as {', '.join(sorted(cast))}: converted to float32")
    if filled:
        notes.append(
            f"num_batches_tracked absent for {filled} BN layer(s): set to 0 (unused in eval mode)"
        )
    report = LoadReport(
        path=str(path),
        format=fmt,
        arch=arch,
        loaded=loaded,
        missing=missing,
        ignored=ignored,
        normalization=mapped.normalization,
        in_channels=stem_channels,
        mismatched=mismatched,
        notes=notes,
    )
    return state, report


# ----------------------------------------------------------------------------------------------
# Gray stems
# ----------------------------------------------------------------------------------------------


def _adapt_stem(
    path: Path, state: dict[str, torch.Tensor], report: LoadReport, in_channels: int, gray: str
) -> dict[str, torch.Tensor]:
    if in_channels is None or in_channels == report.in_channels:
        return state
    if report.in_channels != 3:
        raise ValueError(
            f"{path}: the stem takes {report.in_channels} channel(s); load it with in_channels={report.in_channels}"
        )
    if gray == "repeat":
        report.notes.append(
            "gray='repeat': 3-channel stem kept; feed gray images repeated to 3 channels"
        )
        return state
    if "conv1.weight" not in state:
        raise ValueError(f"{path}: no conv1.weight to turn into a gray stem")
    weight, running_mean, normalization = gray_stem(
        state["conv1.weight"], report.normalization, state.get("bn1.running_mean")
    )
    state["conv1.weight"] = weight
    if running_mean is not None:
        state["bn1.running_mean"] = running_mean
    report.normalization = normalization
    report.in_channels = 1
    report.notes.append(
        "gray='sum': conv1 filters summed over RGB"
        + (
            " with the per-channel std folded in and the mean difference moved into bn1.running_mean"
            if normalization
            else ""
        )
    )
    return state


def gray_stem(
    weight: torch.Tensor, normalization: dict | None, bn1_running_mean: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor | None, dict | None]:
    """A 1-channel stem equivalent to the RGB stem on a gray image repeated to 3 channels.

    Without mean/std the filters are summed: exact. With per-channel mean m and std s, the gray
    input is normalised with their averages (m̄, s̄) and ``W' = Σ_c W_c s̄ / s_c``; the remaining
    constant ``d = Σ W_c (m_c - m̄) / s_c`` per output channel is added to ``bn1.running_mean``.
    Exact away from conv1's 3-pixel zero-padded border; in training mode BN removes d itself.
    Returns (weight, new bn1 running mean or None, normalisation for the gray input).
    """
    if normalization is None:
        return weight.sum(1, keepdim=True), bn1_running_mean, None
    mean = torch.tensor(normalization["mean"], dtype=torch.float64)
    std = torch.tensor(normalization["std"], dtype=torch.float64)
    mean_bar, std_bar = mean.mean(), std.mean()
    w64 = weight.double()
    folded = (w64 * (std_bar / std).view(1, -1, 1, 1)).sum(1, keepdim=True)
    offset = (w64 * ((mean - mean_bar) / std).view(1, -1, 1, 1)).sum((1, 2, 3))
    running_mean = None
    if bn1_running_mean is not None:
        running_mean = (bn1_running_mean.double() + offset).to(bn1_running_mean.dtype)
    gray_norm = {"mean": [float(mean_bar)], "std": [float(std_bar)]}
    return folded.to(weight.dtype), running_mean, gray_norm


__all__ = [
    "FORMATS",
    "GRAY_MODES",
    "IMAGENET",
    "SWAV_NORMALIZATION",
    "LoadReport",
    "atomic_torch_save",
    "describe_normalization",
    "detect_format",
    "export_state_dict",
    "gray_stem",
    "infer_arch",
    "load_encoder",
    "load_file",
    "read_checkpoint",
    "safe_unpickle",
    "save_encoder",
    "sidecar_path",
    "summarize_keys",
]
