"""The four SSL methods behind one constructor, each with a ``full`` and a ``tiny`` recipe.

``build_method("swav", encoder, profile="tiny", queue_length=0)`` builds a method whose
``recipe`` carries every setting the engine and optimiser need; any recipe field can be
overridden by name (see ``docs/methods.md``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from medp2x.methods import byol, moco, simclr, swav
from medp2x.methods.base import Recipe, SSLMethod, ViewSpec, override_recipe

_REGISTRY: dict[str, tuple[type[SSLMethod], Callable[[str], Recipe]]] = {
    "simclr": (simclr.SimCLR, simclr.recipe),
    "swav": (swav.SwAV, swav.recipe),
    "byol": (byol.BYOL, byol.recipe),
    "moco": (moco.MoCo, moco.recipe),
}


METHODS: tuple[str, ...] = tuple(_REGISTRY)


def _lookup(name: str) -> tuple[type[SSLMethod], Callable[[str], Recipe]]:
    key = name.lower()
    if key not in _REGISTRY:
        raise ValueError(f"unknown SSL method {name!r}; choose one of {', '.join(METHODS)}")
    return _REGISTRY[key]


def recipe_for(name: str, profile: str = "tiny", **overrides: Any) -> Recipe:
    """The published (``full``) or CPU-sized (``tiny``) recipe of a method, with overrides."""
    _, make_recipe = _lookup(name)
    recipe = make_recipe(profile)
    return override_recipe(recipe, **overrides) if overrides else recipe


def build_method(
    name: str,
    encoder: nn.Module,
    profile: str = "tiny",
    recipe: Recipe | None = None,
    **overrides: Any,
) -> SSLMethod:
    """An SSL method around ``encoder`` (its heads sized from ``encoder.feature_dim``).

    Pass ``recipe`` to reuse one built with ``recipe_for``; ``overrides`` apply on top.
    """
    cls, _ = _lookup(name)
    if recipe is None:
        recipe = recipe_for(name, profile)
    elif recipe.method != cls.name:
        raise ValueError(f"recipe is for {recipe.method!r}, not {name!r}")
    if overrides:
        recipe = override_recipe(recipe, **overrides)
    return cls(encoder, recipe)


__all__ = [
    "METHODS",
    "Recipe",
    "SSLMethod",
    "ViewSpec",
    "build_method",
    "recipe_for",
]
