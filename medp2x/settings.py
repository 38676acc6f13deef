"""Run settings checked before anything is built: one line naming the setting, the value given
and what is allowed, instead of a traceback from deep inside a run (bundles and the ``medp2x``
command print ``SettingError`` as that one line)."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np

from medp2x.precision import parse_amp

if TYPE_CHECKING:
    from medp2x.engine import PretrainConfig


class SettingError(ValueError):
    """A run setting of the wrong type or range: one line naming the setting, the value given
    and what is allowed (the bundle and the ``medp2x`` command print it without a traceback)."""


def _allowed(name: str, value: Any, allowed: str) -> SettingError:
    return SettingError(f"{name} = {value!r} is not allowed: {allowed}")


def check_int(name: str, value: Any, minimum: int, optional: bool = True) -> None:
    """An integer >= ``minimum`` (``None`` where optional). ``True`` and ``3.5`` are refused:
    a command line's ``--image_size 3.5`` would otherwise be truncated, ``eight`` fail deep inside."""
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        what = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        raise _allowed(name, value, what + (" (or null for the default)" if optional else ""))


def check_positive_number(name: str, value: Any, optional: bool = True) -> None:
    """A finite number > 0 (``nan``, ``inf``, ``0``, text refused)."""
    if value is None and optional:
        return
    number = isinstance(value, (int, float, np.number)) and not isinstance(value, bool)
    if not number or not math.isfinite(value) or value <= 0:
        raise _allowed(name, value, "a finite number > 0" + (" (or null)" if optional else ""))


def check_choice(name: str, value: Any, choices: tuple) -> None:
    if not isinstance(value, str) or value not in choices:
        raise _allowed(name, value, "one of " + ", ".join(map(str, choices)))


def check_normalization(value: Any) -> None:
    """``auto``, ``imagenet``, ``none``/null, or ``{"mean": [...], "std": [...]}`` with std > 0."""
    if value is None or value in ("auto", "imagenet", "none"):
        return
    allowed = 'auto, imagenet, none, or {"mean": [...], "std": [...]} with std > 0'
    if not isinstance(value, dict) or not {"mean", "std"} <= set(value):
        raise _allowed("normalization", value, allowed)
    try:
        mean, std = (np.asarray(value[k], dtype=np.float64).reshape(-1) for k in ("mean", "std"))
    except (TypeError, ValueError):
        raise _allowed("normalization", value, allowed) from None
    if len(mean) != len(std) or not (np.isfinite(mean).all() and np.isfinite(std).all()):
        raise _allowed("normalization", value, allowed)
    if (std <= 0).any():
        raise _allowed("normalization", value, allowed)


def check_amp(value: Any) -> None:
    try:
        parse_amp(value)
    except ValueError:
        raise _allowed("amp", value, "true, false or auto") from None


def check_pretrain_settings(cfg: PretrainConfig) -> None:
    """Every setting a user can type, checked once where the run is built, before any file is
    read or written: a wrong one is one line, not a traceback from deep inside training."""
    from medp2x.checkpoints import GRAY_MODES
    from medp2x.surgery import FILTER_MODES, SCALE_MODES

    for name in ("image_size", "source_size", "batch_size", "epochs"):
        check_int(name, getattr(cfg, name), minimum=1)
    check_int("accumulation_steps", cfg.accumulation_steps, minimum=1, optional=False)
    for name in ("epoch_length", "max_iterations"):  # sample counts: 1e5 is a fine spelling
        value = getattr(cfg, name)
        if isinstance(value, float) and value.is_integer():
            setattr(cfg, name, int(value))
    check_int("epoch_length", cfg.epoch_length, minimum=0)
    check_int("max_iterations", cfg.max_iterations, minimum=1)
    check_int("n_saved", cfg.n_saved, minimum=1)
    for name in ("num_workers", "checkpoint_every", "seed"):
        check_int(name, getattr(cfg, name), minimum=0, optional=False)
    check_positive_number("lr", cfg.lr)
    check_amp(cfg.amp)
    check_normalization(cfg.normalization)
    check_choice("modality", cfg.modality, ("rgb", "gray"))
    check_choice("gray_stem", cfg.gray_stem, GRAY_MODES)
    check_choice("scale", cfg.scale, SCALE_MODES)
    check_choice("filters", cfg.filters, FILTER_MODES)
    for name in ("method_options", "view_options"):
        if not isinstance(getattr(cfg, name), dict):
            raise _allowed(name, getattr(cfg, name), 'a dict, e.g. {"temperature": 0.2}')
