"""The restricted unpickler for raw pickles (BYOL's Haiku/dill file): the security boundary.

Unpickling runs code named by the file. ``_SafeUnpickler`` resolves only an allow-list of
globals, each mapped to a local, inert re-implementation (array and dtype proxies, plain
records): nothing from numpy, dill, jax or haiku is ever called with data from the file, and
any other global, persistent id or leftover callable is refused before it runs. Arrays are
built at the end with ``np.frombuffer`` after their byte counts are checked. Keep this module
small and reviewable; PyTorch files never come here (``files.torch_load_safe``).
"""

from __future__ import annotations

import collections
import math
import pickle
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np


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
