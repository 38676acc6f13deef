"""What every SSL method shares: its recipe, its views, the engine-facing hooks, and the
statistics the collapse monitor reads.

A method is an ``nn.Module`` holding the trained ``encoder`` (torchvision layout, saved
unchanged as the next stage's backbone) plus its heads (``heads.py``) and any momentum copies
(``momentum.py``); its loss is a function of ``losses.py``. The engine
calls ``forward(views)`` inside DDP and the hooks on the unwrapped module around each
optimizer step; everything a method does between steps (EMA, prototype normalisation and
freezing, queues) lives in those hooks so the engine stays method-agnostic.
"""

from __future__ import annotations

import dataclasses
import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from medp2x.methods.losses import at_least_float32
from medp2x.networks import feature_dim
from medp2x.views import AugmentRecipe

PROFILES = ("tiny", "full")
OPTIMIZERS = ("lars", "sgd", "adam")


@dataclass
class ViewSpec:
    """How many crops of which size and area fraction a method trains on (large crops first)."""

    n_large: int = 2
    large_size: int = 224
    n_small: int = 0
    small_size: int = 96
    large_scale: tuple[float, float] = (0.08, 1.0)
    small_scale: tuple[float, float] = (0.05, 0.14)
    # SimCLR's colour-distortion strength s (Chen et al. 2020, App. A): scales brightness,
    # contrast, saturation and hue jitter of the method's published recipe (1.0: as published).
    color_strength: float = 1.0
    # Resize each crop with antialiased bilinear interpolation, as PIL and torchvision do for
    # the originals and lightly (True), or all crops in one sharper roi_align call (False;
    # faster for very large batches on a GPU). docs/augmentations.md, "Resampling".
    antialias: bool = True

    def __post_init__(self) -> None:  # JSON configs give lists
        self.large_scale = tuple(self.large_scale)
        self.small_scale = tuple(self.small_scale)

    @property
    def n_views(self) -> int:
        return self.n_large + self.n_small

    def sizes(self) -> list[int]:
        """Expected side length of each view, in ``forward`` order."""
        return [self.large_size] * self.n_large + [self.small_size] * self.n_small


@dataclass
class Recipe:
    """Optimisation and view settings of one method; subclasses add the method's knobs.

    ``lr = base_lr * batch_size / lr_batch_divisor`` (linear scaling rule of the originals).
    """

    method: str
    profile: str
    arch: str
    image_size: int
    batch_size: int
    epochs: int
    optimizer: str
    base_lr: float
    weight_decay: float
    warmup_epochs: float
    views: ViewSpec
    momentum: float = 0.9
    lr_batch_divisor: int = 256

    def lr(self, batch_size: int | None = None) -> float:
        """Peak learning rate for a global batch (the recipe's own batch when omitted)."""
        return self.base_lr * (batch_size or self.batch_size) / self.lr_batch_divisor


def override_recipe(recipe: Recipe, **overrides: Any) -> Recipe:
    """A copy of ``recipe`` with fields replaced; unknown names raise a ValueError listing the valid ones.

    ``views`` may be a ``ViewSpec`` or a dict of its fields. Overriding ``image_size`` alone
    also resizes the crops (large = image_size, small scaled by the same factor), so one
    override switches e.g. 224 -> 96 px training as in the paper's appendix.
    """
    names = {f.name for f in dataclasses.fields(recipe)}
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise ValueError(
            f"unknown {recipe.method} recipe option(s) {', '.join(unknown)}; "
            f"valid: {', '.join(sorted(names))}"
        )
    views = overrides.pop("views", None)
    if isinstance(views, dict):
        views = dataclasses.replace(recipe.views, **views)
    elif views is None and "image_size" in overrides:
        views = _resized_views(recipe.views, recipe.image_size, int(overrides["image_size"]))
    if views is not None:
        overrides["views"] = views
    new = dataclasses.replace(recipe, **overrides)
    validate_recipe(new)
    return new


def _resized_views(views: ViewSpec, old_size: int, new_size: int) -> ViewSpec:
    small = max(8, round(views.small_size * new_size / old_size))
    return dataclasses.replace(views, large_size=new_size, small_size=small)


def check_profile(profile: str) -> None:
    if profile not in PROFILES:
        raise ValueError(f"unknown profile {profile!r}; choose one of {', '.join(PROFILES)}")


def validate_recipe(recipe: Recipe) -> None:
    check_profile(recipe.profile)
    if recipe.optimizer not in OPTIMIZERS:
        raise ValueError(
            f"unknown optimizer {recipe.optimizer!r}; choose one of {', '.join(OPTIMIZERS)}"
        )
    if recipe.batch_size < 2:
        raise ValueError(f"batch_size must be >= 2 for {recipe.method}, got {recipe.batch_size}")
    if recipe.views.n_large < 2:
        raise ValueError(f"{recipe.method} needs at least 2 large views")


@dataclass
class StepState:
    """Where training is, as last reported by the engine (0-based epoch and iteration)."""

    epoch: int = 0
    iteration: int = 0
    progress: float = 0.0


class SSLMethod(nn.Module, ABC):
    """Base of every method. A subclass declares, besides ``forward``:
    - ``name``: its registry key (``medp2x.methods``);
    - ``recipes``: its ``Recipe`` per profile (``"full"``: published, ``"tiny"``: CPU-sized);
    - ``augment``: the photometric recipe of its views (``medp2x.views.AugmentRecipe``); crop
      counts, sizes and area scales are in ``recipes[...].views``.

    Hooks, called by the engine on the unwrapped module:
    - ``on_before_optimizer_step(epoch, iteration)`` after ``backward``, before ``step``;
      ``epoch`` and ``iteration`` are 0-based (iteration counts optimizer steps done before
      this one, over the whole run).
    - ``on_after_optimizer_step(progress)`` with ``progress = iterations done / total``.
    - ``reset_momentum_encoders()`` after weight surgery on a fresh run (copy online -> target).
    """

    name: ClassVar[str] = ""
    recipes: ClassVar[dict[str, Recipe]] = {}
    augment: ClassVar[AugmentRecipe]
    multi_crop: bool = False  # False: exactly two large views
    # BatchNorm statistics over the global batch on several GPUs (SyncBatchNorm), as SimCLR,
    # BYOL, SwAV and DINO's originals; MoCo sets False: its shuffled BN needs per-GPU statistics.
    sync_bn: bool = True

    def __init__(self, encoder: nn.Module, recipe: Recipe):
        super().__init__()
        spec = recipe.views
        if not self.multi_crop and (spec.n_large != 2 or spec.n_small != 0):
            raise ValueError(
                f"{self.name} trains on exactly 2 large views, not {spec.n_large} large + "
                f"{spec.n_small} small"
            )
        self.encoder = encoder
        self.recipe = recipe
        self.feature_dim = feature_dim(encoder)
        self.state = StepState()

    @abstractmethod
    def forward(self, views: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        """Loss (key ``loss``) and detached scalars to log, from normalised views."""

    def on_before_optimizer_step(self, epoch: int, iteration: int) -> None:
        self.state.epoch = int(epoch)
        self.state.iteration = int(iteration)

    def on_after_optimizer_step(self, progress: float) -> None:
        self.state.progress = float(progress)

    def reset_momentum_encoders(self) -> None:
        """Methods without momentum encoders have nothing to reset."""

    def check_views(self, views: Sequence[torch.Tensor]) -> None:
        spec = self.recipe.views
        if len(views) != spec.n_views:
            raise ValueError(
                f"{self.name} expects {spec.n_views} views ({spec.n_large} large + "
                f"{spec.n_small} small), got {len(views)}"
            )
        sizes = {v.shape[0] for v in views}
        if len(sizes) != 1:
            raise ValueError(
                f"{self.name}: all views must hold the same images, got batch sizes {sorted(sizes)}"
            )
        if views[0].shape[0] < 2:
            raise ValueError(f"{self.name}: a batch needs at least 2 images")


def encode_groups(encoder: nn.Module, views: Sequence[torch.Tensor]) -> torch.Tensor:
    """Encode views, one forward per run of equal-size views (multi-crop as in SwAV's code:
    same-resolution crops share one pass and one set of BN statistics). Rows follow view order."""
    outputs = []
    start = 0
    while start < len(views):
        end = start
        while end < len(views) and views[end].shape[-2:] == views[start].shape[-2:]:
            end += 1
        outputs.append(encoder(torch.cat(list(views[start:end]), dim=0)))
        start = end
    return torch.cat(outputs, dim=0)


@torch.no_grad()
def embedding_spread(z: torch.Tensor) -> torch.Tensor:
    """Collapse monitor: the per-dimension std over the batch of the L2-normalised embeddings,
    times sqrt(dim) (lightly's ``std_of_l2_normalized``, rescaled). About 1 for embeddings
    spread over the sphere, 0 when every image maps to the same point."""
    z = torch.nn.functional.normalize(at_least_float32(z.detach()), dim=1)
    return z.std(dim=0).mean() * z.shape[1] ** 0.5


@torch.no_grad()
def prediction_entropy(scores: torch.Tensor, temperature: float | torch.Tensor) -> torch.Tensor:
    """Collapse monitor: mean entropy of softmax(s / T) over ln K. 1 means uniform predictions
    (SwAV's loss then sits at ln K and nothing is learnt; DINO's teacher collapsed by its
    centring); near 0, every row picks one prototype (DINO's teacher collapsed by sharpening
    when that prototype is the same for all images)."""
    log_p = F.log_softmax(at_least_float32(scores.detach()) / temperature, dim=1)
    entropy = -(log_p.exp() * log_p).sum(dim=1).mean()
    return entropy / math.log(scores.shape[1])


def frozen_at(epoch: int, iteration: int, epochs: int, iterations: int | None) -> bool:
    """Whether a part frozen for the first ``iterations`` iterations (when set) or else the
    first ``epochs`` epochs is still frozen (SwAV's prototypes, DINO's last layer)."""
    if iterations is not None:
        return iteration < iterations
    return epoch < epochs


def drop_gradients(module: nn.Module) -> None:
    """Leave ``module`` out of the coming optimizer step: with no gradient, neither momentum
    nor weight decay moves it (as SwAV and DINO freeze their last layers)."""
    for p in module.parameters():
        p.grad = None
