"""The SSL methods behind one registry, each with a ``full`` and a ``tiny`` recipe.

``build_method("swav", encoder, profile="tiny", queue_length=0)`` builds a method whose
``recipe`` carries every setting the engine and optimiser need; any recipe field can be
overridden by name (see ``docs/methods.md``). A method is one module here declaring its
class, recipes and views; adding one is that module plus its line in ``_REGISTRY``
(docs/methods.md, "Adding a method").
"""

from __future__ import annotations

import copy
from typing import Any

from torch import nn

from medp2x.methods import byol, dino, moco, simclr, swav
from medp2x.methods.base import (
    Recipe,
    SSLMethod,
    ViewSpec,
    check_profile,
    override_recipe,
    validate_recipe,
)
from medp2x.views import AugmentRecipe

_REGISTRY: dict[str, type[SSLMethod]] = {
    "simclr": simclr.SimCLR,
    "swav": swav.SwAV,
    "byol": byol.BYOL,
    "moco": moco.MoCo,
    "dino": dino.DINO,
}


METHODS: tuple[str, ...] = tuple(_REGISTRY)


def method_class(name: str) -> type[SSLMethod]:
    """The registered class of method ``name`` (case-insensitive)."""
    key = name.lower()
    if key not in _REGISTRY:
        raise ValueError(f"unknown SSL method {name!r}; choose one of {', '.join(METHODS)}")
    return _REGISTRY[key]


def recipe_for(name: str, profile: str = "tiny", **overrides: Any) -> Recipe:
    """The published (``full``) or CPU-sized (``tiny``) recipe of a method, with overrides."""
    cls = method_class(name)
    check_profile(profile)
    recipe = copy.deepcopy(cls.recipes[profile])  # the table stays as published
    validate_recipe(recipe)
    return override_recipe(recipe, **overrides) if overrides else recipe


def augment_for(name: str) -> AugmentRecipe:
    """The photometric recipe of a method's views (``medp2x.views.build_views`` reads it)."""
    return method_class(name).augment


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
    cls = method_class(name)
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
    "augment_for",
    "build_method",
    "method_class",
    "recipe_for",
]
