"""Augmented views of whole batches, on the training device, each sample with its own draw.

Why not torchvision or kornia: ``torchvision.transforms.v2`` draws *one* set of random
parameters per call, so a batched tensor gets the same crop, jitter and blur for every sample;
its functional ops take scalar factors. Per-sample randomness with torchvision alone means one
call per sample in DataLoader workers, which is what this module replaces (see
``benchmarks/views_device.py`` and ``docs/augmentations.md``). kornia would provide batched
per-sample augmentation, but it is a new dependency for a dozen short ops that are written
below with per-row parameters, and tested against torchvision's functional ops.

Design: ``BatchAugment.plan`` draws every random parameter on the CPU (small vectors, from a
CPU ``torch.Generator``: no device syncs, and the same seed gives the same views on any
device); ``BatchAugment.__call__`` applies them: one ``roi_align`` call crops and resizes all
views of one size, then each photometric op runs on the rows that drew it.

Crops come from the images at their own resolution, as a RandomResizedCrop of the decoded
photograph does in the originals: a batch of differently sized images arrives padded, with
each image's (h, w) (``medp2x.data.collate.ImageBatch``), and every row's box is drawn inside
its own image. The images are only capped at ``source_size`` on their shorter side
(``default_source_size``: about twice the crop), never squashed to the crop size.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from typing import Any

import torch
import torch.nn.functional as F
from torchvision.ops import roi_align

from medp2x.data.collate import ImageBatch

MODALITIES = ("rgb", "gray")
JITTER_OPS = ("brightness", "contrast", "saturation", "hue", "gamma")
_LUMA = (0.2989, 0.587, 0.114)  # the weights of torchvision's rgb_to_grayscale
_CHROMA_OPS = ("saturation", "hue")  # need three channels


@dataclass(frozen=True)
class ViewAugment:
    """Photometric recipe of one view; strengths follow torchvision's ColorJitter.

    brightness/contrast/saturation ``s``: factor uniform in [max(0, 1 - s), 1 + s];
    hue ``h``: shift uniform in [-h, h] (fraction of the hue circle);
    gamma ``g``: exponent log-uniform in [1 / (1 + g), 1 + g] (grayscale recipes).
    The jitter ops run in a random order per sample, like ColorJitter.
    """

    flip_p: float = 0.5
    jitter_p: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.4
    hue: float = 0.1
    gamma: float = 0.0
    gray_p: float = 0.2
    blur_p: float = 0.5
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    solarize_p: float = 0.0
    solarize_threshold: float = 0.5


@dataclass(frozen=True)
class AugmentRecipe:
    """One method's photometric views: ``large`` recipes are cycled over the large crops
    (BYOL's and DINO's two views differ), ``small`` serves every small crop. Each method
    declares its own (``SSLMethod.augment``, in its module under ``medp2x/methods/``); crop
    counts, sizes and area scales are in its ``ViewSpec``."""

    large: tuple[ViewAugment, ...]
    small: ViewAugment


def gray_variant(aug: ViewAugment) -> ViewAugment:
    """The grayscale-modality recipe (X-ray, ultrasound, MRI): no chroma to jitter, so
    saturation, hue and random grayscale go; a gamma jitter of the saturation strength takes
    their place (a medp2x choice: the originals define no grayscale recipe)."""
    return replace(aug, saturation=0.0, hue=0.0, gray_p=0.0, gamma=aug.saturation)


def with_color_strength(aug: ViewAugment, strength: float) -> ViewAugment:
    """``aug`` with its brightness, contrast, saturation and hue jitter times ``strength``
    (SimCLR's colour-distortion strength s; its small-image setting is s = 0.5, App. B.9)."""
    if strength < 0:
        raise ValueError(f"color_strength must be >= 0, not {strength}")
    return replace(
        aug,
        brightness=aug.brightness * strength,
        contrast=aug.contrast * strength,
        saturation=aug.saturation * strength,
        hue=aug.hue * strength,
    )


def view_augments(
    recipe: AugmentRecipe,
    modality: str,
    n_large: int,
    n_small: int,
    overrides: Mapping[str, Any] | None,
    color_strength: float = 1.0,
) -> list[ViewAugment]:
    """The recipe of every view, large crops first, its colour jitter scaled by
    ``color_strength``, then ``overrides`` applied to all (an explicit value wins)."""
    if modality not in MODALITIES:
        raise ValueError(f"unknown modality {modality!r}; choose one of {', '.join(MODALITIES)}")
    augs = [recipe.large[i % len(recipe.large)] for i in range(n_large)] + [recipe.small] * n_small
    if color_strength != 1.0:
        augs = [with_color_strength(a, color_strength) for a in augs]
    if modality == "gray":
        augs = [gray_variant(a) for a in augs]
    if overrides:
        known = {f.name for f in fields(ViewAugment)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise ValueError(f"unknown augmentation override(s) {unknown}; known: {sorted(known)}")
        augs = [replace(a, **overrides) for a in augs]
    return augs


# ---------------------------------------------------------------------------------------------
# Vectorised ops: x is N×C×H×W in [0, 1], every parameter a length-N tensor (one per row).


def _rows(t: torch.Tensor) -> torch.Tensor:
    return t.view(-1, 1, 1, 1).to(dtype=torch.float32)


def luma(x: torch.Tensor) -> torch.Tensor:
    """N×1×H×W luminance of RGB rows."""
    w = torch.tensor(_LUMA, device=x.device, dtype=x.dtype)
    return torch.einsum("nchw,c->nhw", x, w).unsqueeze(1)


def _blend(x: torch.Tensor, other: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    f = _rows(factor)
    return (x * f).add_(other * (1.0 - f)).clamp_(0.0, 1.0)


def brightness(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return (x * _rows(factor)).clamp_(0.0, 1.0)


def contrast(x: torch.Tensor, factor: torch.Tensor, per_channel: bool = False) -> torch.Tensor:
    """Blend with the mean grey level; ``per_channel`` keeps channels apart (gray stacks)."""
    mean = x.mean((-2, -1), keepdim=True)  # mean of luma = luma of the channel means
    if not per_channel:
        mean = luma(mean) if x.shape[1] == 3 else mean.mean(1, keepdim=True)
    return _blend(x, mean, factor)


def saturation(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return _blend(x, luma(x), factor)


def hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rotate the HSV hue by ``shift`` (fraction of the circle), as torchvision's adjust_hue.

    Written in terms of max M, chroma C and the hexagonal hue 6h: channel n of (R, G, B) is
    M - C clamp(min(k, 4 - k), 0, 1), k = (n + 6h) mod 6, n = (5, 3, 1) — fewer full-size
    passes than RGB -> HSV -> RGB (this op dominates colour jitter on CPU)."""
    r, g, b = x.unbind(1)
    maxc, minc = x.amax(1), x.amin(1)
    chroma = maxc - minc
    inv = chroma.clamp_min(1e-12).reciprocal_()  # C = 0: all channels equal, numerators 0
    h6 = torch.where(maxc == g, (b - r).mul_(inv).add_(2.0), (r - g).mul_(inv).add_(4.0))
    h6 = torch.where(maxc == r, (g - b).mul_(inv), h6)
    h6 += 6.0 * shift.view(-1, 1, 1).to(x.dtype)
    n = torch.tensor([5.0, 3.0, 1.0], device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    k = torch.remainder(h6.unsqueeze(1) + n, 6.0)
    ramp = torch.minimum(k, 4.0 - k).clamp_(0.0, 1.0)
    return ramp.mul_(chroma.unsqueeze(1).neg()).add_(maxc.unsqueeze(1)).clamp_(0.0, 1.0)


def gamma(x: torch.Tensor, exponent: torch.Tensor) -> torch.Tensor:
    return x.clamp(0.0, 1.0).pow(_rows(exponent))


def grayscale(x: torch.Tensor) -> torch.Tensor:
    return luma(x).expand_as(x).contiguous()


def solarize(x: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    return torch.where(x >= _rows(threshold), 1.0 - x, x)


def hflip(x: torch.Tensor) -> torch.Tensor:
    return x.flip(-1)


def blur_kernel_size(size: int, fraction: float = 0.1) -> int:
    """Odd kernel of about ``fraction`` of the image side, as SimCLR/BYOL (23 at 224 px)."""
    return max(3, 2 * (int(fraction * size) // 2) + 1)


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """Separable Gaussian blur with one sigma per row: a grouped conv whose groups are the
    N*C channels, each with its own kernel; reflect padding as torchvision."""
    n, c, h, w = x.shape
    half = min(kernel_size // 2, h - 1, w - 1)
    t = torch.arange(-half, half + 1, device=x.device, dtype=x.dtype)
    s = sigma.to(device=x.device, dtype=x.dtype).clamp_min(1e-6).view(-1, 1)
    kernel = torch.exp(-0.5 * (t / s) ** 2)
    kernel = (kernel / kernel.sum(1, keepdim=True)).repeat_interleave(c, 0)
    y = F.pad(x.reshape(1, n * c, h, w), (half, half, half, half), mode="reflect")
    y = F.conv2d(y, kernel.view(n * c, 1, 1, -1), groups=n * c)
    y = F.conv2d(y, kernel.view(n * c, 1, -1, 1), groups=n * c)
    return y.view(n, c, h, w)


def resized_crops(
    images: torch.Tensor,
    boxes: torch.Tensor,
    batch_index: torch.Tensor,
    size: int,
    antialias: bool = True,
) -> torch.Tensor:
    """Crop box k (x1, y1, x2, y2 on integer pixel edges) of image ``batch_index[k]`` and
    resize it to size×size.

    ``antialias=True`` resizes each crop alone with antialiased bilinear interpolation
    (``F.interpolate(..., antialias=True)``), torchvision's ``resized_crop`` on tensors, which
    matches PIL's resize that lightly's and the originals' transforms use: when shrinking, its
    triangle filter spans the scale factor. ``False`` does all crops in one ``roi_align`` call
    (``aligned=True``, adaptive sampling): faster for thousands of crops on a GPU, but sharper
    when shrinking (each output pixel averages only its own bin); those views put lightly's own
    SimCLR loop 3.8 linear-probe points lower in the long parity run (docs/augmentations.md)."""
    if not antialias:
        rois = torch.cat([batch_index.view(-1, 1).to(boxes.dtype), boxes], 1)
        rois = rois.to(device=images.device, dtype=images.dtype)
        return roi_align(
            images, rois, (size, size), spatial_scale=1.0, sampling_ratio=-1, aligned=True
        )
    edges = boxes.round().to(torch.int64).tolist()
    rows = batch_index.to(torch.int64).tolist()
    return torch.cat(
        [
            F.interpolate(
                images[row : row + 1, :, y1:y2, x1:x2],
                size=(size, size),
                mode="bilinear",
                align_corners=False,
                antialias=True,
            )
            for row, (x1, y1, x2, y2) in zip(rows, edges, strict=True)
        ]
    )


# ---------------------------------------------------------------------------------------------
# Parameter sampling (CPU, vectorised over rows).


def _uniform(lo: torch.Tensor, hi: torch.Tensor, g: torch.Generator | None) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(lo.shape, generator=g)


def _bernoulli(p: torch.Tensor, g: torch.Generator | None) -> torch.Tensor:
    return torch.rand(p.shape, generator=g) < p


def sample_crop_boxes(
    n: int,
    height: int | torch.Tensor,
    width: int | torch.Tensor,
    scale: tuple[float, float],
    ratio: tuple[float, float],
    g: torch.Generator | None = None,
    attempts: int = 10,
) -> torch.Tensor:
    """RandomResizedCrop's box sampler (10 tries, then a central crop), for n rows at once.
    ``height`` and ``width`` are the image's, or one per row (a padded batch of images of
    different sizes: each row's box lies inside its own image and follows its own area and
    aspect). Returns n×4 float boxes (x1, y1, x2, y2) on integer pixel edges."""
    height = torch.as_tensor(height, dtype=torch.float32).expand(n)
    width = torch.as_tensor(width, dtype=torch.float32).expand(n)
    area = (height * width).view(-1, 1)
    target = area * (scale[0] + (scale[1] - scale[0]) * torch.rand(n, attempts, generator=g))
    log_r = math.log(ratio[0]) + (math.log(ratio[1]) - math.log(ratio[0])) * torch.rand(
        n, attempts, generator=g
    )
    aspect = torch.exp(log_r)
    w = torch.round(torch.sqrt(target * aspect))
    h = torch.round(torch.sqrt(target / aspect))
    ok = (w > 0) & (w <= width.view(-1, 1)) & (h > 0) & (h <= height.view(-1, 1))
    first = ok.to(torch.int8).argmax(1, keepdim=True)
    w, h, found = w.gather(1, first)[:, 0], h.gather(1, first)[:, 0], ok.any(1)
    fb_w, fb_h = _fallback_crop(height, width, ratio)
    w, h = torch.where(found, w, fb_w), torch.where(found, h, fb_h)
    u = torch.rand(n, 2, generator=g)
    top = torch.where(found, torch.floor(u[:, 0] * (height - h + 1)), (height - h) // 2)
    left = torch.where(found, torch.floor(u[:, 1] * (width - w + 1)), (width - w) // 2)
    return torch.stack([left, top, left + w, top + h], 1)


def _fallback_crop(
    height: torch.Tensor, width: torch.Tensor, ratio: tuple[float, float]
) -> tuple[torch.Tensor, torch.Tensor]:
    """torchvision's fallback box size per row: the whole image, or its largest central
    crop within the ratio range (in float64, rounded half to even as its ``round``)."""
    h, w = height.double(), width.double()
    lo, hi = min(ratio), max(ratio)
    in_ratio = w / h
    too_tall, too_wide = in_ratio < lo, in_ratio > hi
    fb_w = torch.where(too_wide, torch.round(h * hi), w)
    fb_h = torch.where(too_tall, torch.round(w / lo), h)
    return fb_w.float(), fb_h.float()


@dataclass
class GroupPlan:
    """Random parameters of the views that share one output size (rows = views × batch,
    view-major). Jitter factors are identities where a row did not draw the op."""

    size: int
    views: list[int]
    batch_index: torch.Tensor
    boxes: torch.Tensor
    flip: torch.Tensor
    jitter: dict[str, torch.Tensor] = field(default_factory=dict)  # op -> rows that apply it
    factors: dict[str, torch.Tensor] = field(default_factory=dict)  # op -> factor per row
    order: torch.Tensor | None = None  # rows × len(JITTER_OPS): each row's op order
    gray: torch.Tensor | None = None
    blur: torch.Tensor | None = None
    sigma: torch.Tensor | None = None
    solarize: torch.Tensor | None = None
    threshold: torch.Tensor | None = None


def _row_sizes(size: int | torch.Tensor, batch_index: torch.Tensor) -> int | torch.Tensor:
    """One image side for all rows, or each row's image's side (views × batch rows)."""
    if isinstance(size, torch.Tensor) and size.ndim > 0:
        return size[batch_index]
    return size


def _per_row(augs: Sequence[ViewAugment], name: str, batch: int) -> torch.Tensor:
    return torch.tensor([float(getattr(a, name)) for a in augs]).repeat_interleave(batch)


def _sample_jitter(plan: GroupPlan, augs, batch, g) -> None:
    applied = _bernoulli(_per_row(augs, "jitter_p", batch), g)
    plan.order = torch.rand(len(applied), len(JITTER_OPS), generator=g).argsort(1)
    for op in JITTER_OPS:
        s = _per_row(augs, op, batch)
        if op == "hue":
            lo, hi = -s, s
        elif op == "gamma":
            lo, hi = -torch.log1p(s), torch.log1p(s)
        else:
            lo, hi = (1.0 - s).clamp_min(0.0), 1.0 + s
        factor = _uniform(lo, hi, g)
        plan.factors[op] = factor.exp() if op == "gamma" else factor
        plan.jitter[op] = applied & (s > 0)


def sample_group(
    augs: Sequence[ViewAugment],
    views: list[int],
    size: int,
    batch: int,
    height: int | torch.Tensor,
    width: int | torch.Tensor,
    scale: tuple[float, float],
    ratio: tuple[float, float],
    g: torch.Generator | None,
) -> GroupPlan:
    """Every random parameter of one group, drawn in a fixed order (seeded runs repeat).
    ``height``/``width``: the images' size, or one per image (length ``batch``)."""
    n = len(augs) * batch
    batch_index = torch.arange(n) % batch
    plan = GroupPlan(
        size=size,
        views=views,
        batch_index=batch_index,
        boxes=sample_crop_boxes(
            n, _row_sizes(height, batch_index), _row_sizes(width, batch_index), scale, ratio, g
        ),
        flip=_bernoulli(_per_row(augs, "flip_p", batch), g),
    )
    _sample_jitter(plan, augs, batch, g)
    plan.gray = _bernoulli(_per_row(augs, "gray_p", batch), g)
    plan.blur = _bernoulli(_per_row(augs, "blur_p", batch), g)
    lo = torch.tensor([a.blur_sigma[0] for a in augs]).repeat_interleave(batch)
    hi = torch.tensor([a.blur_sigma[1] for a in augs]).repeat_interleave(batch)
    plan.sigma = _uniform(lo, hi, g)
    plan.solarize = _bernoulli(_per_row(augs, "solarize_p", batch), g)
    plan.threshold = _per_row(augs, "solarize_threshold", batch)
    return plan


# ---------------------------------------------------------------------------------------------


def _apply_rows(
    x: torch.Tensor, rows: torch.Tensor, op: Callable[..., torch.Tensor], *params: torch.Tensor
) -> torch.Tensor:
    """Run ``op`` only on the selected rows (CPU mask: no device sync), in place."""
    idx = rows.nonzero().view(-1)
    if idx.numel() == 0:
        return x
    if idx.numel() == x.shape[0]:
        return op(x, *(p.to(x.device) for p in params))
    idx_dev = idx.to(x.device)
    sub = op(x.index_select(0, idx_dev), *(p[idx].to(x.device) for p in params))
    return x.index_copy_(0, idx_dev, sub)


def _image_sizes(sizes: torch.Tensor, shape: torch.Size) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image heights and widths of a padded batch, checked against its tensor."""
    sizes = sizes.to("cpu", torch.int64)
    if sizes.shape != (shape[0], 2):
        raise ValueError(f"sizes must be {shape[0]}×2 (h, w per image), got {tuple(sizes.shape)}")
    if (sizes < 1).any() or (sizes[:, 0] > shape[-2]).any() or (sizes[:, 1] > shape[-1]).any():
        raise ValueError(f"image sizes {sizes.tolist()} do not fit the {tuple(shape[-2:])} batch")
    return sizes[:, 0], sizes[:, 1]


class BatchAugment:
    """Callable: ``augment(images B×C×H×W in [0, 1]) -> list of views`` in [0, 1], large crops
    first. Every sample of every view draws its own crop, flip, jitter, blur and solarize.
    ``images`` may also be an ``ImageBatch`` (``medp2x.data.collate``) of images of their own
    sizes: each crop is then drawn within its own image, at that image's resolution.

    ``generator``: a CPU ``torch.Generator`` for reproducible views (default: torch's global
    RNG, which Ignite/``manual_seed`` seeds). ``modality="gray"`` keeps channels independent
    (contrast about each channel's own mean), so gray stacks stay gray.
    """

    def __init__(
        self,
        views: Sequence[ViewAugment],
        sizes: Sequence[int],
        scales: Sequence[tuple[float, float]],
        modality: str = "rgb",
        device: torch.device | str | None = None,
        generator: torch.Generator | None = None,
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        blur_kernel_fraction: float = 0.1,
        antialias: bool = True,
    ):
        if not (len(views) == len(sizes) == len(scales)) or not views:
            raise ValueError("views, sizes and scales must be non-empty and of equal length")
        if modality not in MODALITIES:
            raise ValueError(
                f"unknown modality {modality!r}; choose one of {', '.join(MODALITIES)}"
            )
        if generator is not None and generator.device.type != "cpu":
            raise ValueError(
                "generator must be a CPU torch.Generator (parameters are drawn on CPU)"
            )
        self.views, self.sizes = list(views), [int(s) for s in sizes]
        self.scales = [tuple(map(float, s)) for s in scales]
        self.modality, self.generator = modality, generator
        self.device = torch.device(device) if device is not None else None
        self.ratio, self.blur_kernel_fraction = ratio, blur_kernel_fraction
        self.antialias = bool(antialias)  # resized_crops: PIL-like resizing, or one roi_align

    def __repr__(self) -> str:
        return (
            f"BatchAugment(modality={self.modality!r}, sizes={self.sizes}, "
            f"scales={self.scales}, views={self.views})"
        )

    def _groups(self) -> dict[tuple[int, tuple[float, float]], list[int]]:
        groups: dict[tuple[int, tuple[float, float]], list[int]] = {}
        for i, key in enumerate(zip(self.sizes, self.scales, strict=True)):
            groups.setdefault(key, []).append(i)
        return groups

    def plan(
        self,
        batch: int,
        height: int | torch.Tensor,
        width: int | torch.Tensor,
        generator: torch.Generator | None = None,
    ) -> list[GroupPlan]:
        """Draw the random parameters of all views for a batch of height×width images, or of
        images of their own sizes (``height``/``width``: one per image, a padded batch)."""
        g = generator if generator is not None else self.generator
        return [
            sample_group(
                [self.views[i] for i in idx], idx, size, batch, height, width, scale, self.ratio, g
            )
            for (size, scale), idx in self._groups().items()
        ]

    def __call__(
        self, images: torch.Tensor | ImageBatch, generator: torch.Generator | None = None
    ) -> list[torch.Tensor]:
        """Views of ``images``: a B×C×H×W tensor, or an ``ImageBatch`` of images of their own
        sizes (each row cropped inside its own image, never from the padding)."""
        sizes = images.sizes if isinstance(images, ImageBatch) else None
        images = self._prepare(images.pixels if isinstance(images, ImageBatch) else images)
        batch, _, height, width = images.shape
        if sizes is not None:
            height, width = _image_sizes(sizes, images.shape)
        out: list[torch.Tensor | None] = [None] * len(self.views)
        with torch.no_grad(), torch.autocast(images.device.type, enabled=False):
            for plan in self.plan(batch, height, width, generator):
                x = self.apply(images, plan)
                for k, view in enumerate(plan.views):
                    out[view] = x[k * batch : (k + 1) * batch]
        return out  # type: ignore[return-value]

    def _prepare(self, images: torch.Tensor) -> torch.Tensor:
        if not isinstance(images, torch.Tensor) or images.ndim != 4:
            raise ValueError(
                f"expected a B×C×H×W tensor, got {getattr(images, 'shape', type(images))}"
            )
        if self.device is not None:
            images = images.to(self.device, non_blocking=True)
        if images.dtype == torch.uint8:
            return images.float().div_(255.0)
        if not images.is_floating_point():
            raise ValueError(f"expected float images in [0, 1] or uint8, got {images.dtype}")
        return images.float()

    def apply(self, images: torch.Tensor, plan: GroupPlan) -> torch.Tensor:
        """Apply one group's drawn parameters: crop+resize, flip, jitter, gray, blur, solarize."""
        channels = images.shape[1]
        colour = self.modality == "rgb" and channels == 3
        if self.modality == "rgb" and channels not in (1, 3):
            raise ValueError(f"modality 'rgb' needs 1 or 3 channels, got {channels}")
        x = resized_crops(images, plan.boxes, plan.batch_index, plan.size, self.antialias)
        x = _apply_rows(x, plan.flip, hflip)
        ops: dict[str, Callable[..., torch.Tensor]] = {
            "brightness": brightness,
            "contrast": lambda t, f: contrast(t, f, per_channel=self.modality == "gray"),
            "saturation": saturation,
            "hue": hue,
            "gamma": gamma,
        }
        for slot in range(len(JITTER_OPS)):
            for op_id, name in enumerate(JITTER_OPS):
                if name in _CHROMA_OPS and not colour:
                    continue  # identity on one channel; never applied to gray stacks
                rows = plan.jitter[name] & (plan.order[:, slot] == op_id)
                x = _apply_rows(x, rows, ops[name], plan.factors[name])
        if colour:
            x = _apply_rows(x, plan.gray, grayscale)
        k = blur_kernel_size(plan.size, self.blur_kernel_fraction)
        x = _apply_rows(x, plan.blur, lambda t, s: gaussian_blur(t, s, k), plan.sigma)
        x = _apply_rows(x, plan.solarize, solarize, plan.threshold)
        return x.clamp_(0.0, 1.0)


# Shorter-side cap of the pretraining sources, as a multiple of the large crop (docs/augmentations.md):
# enough that a 0.08-area crop is enlarged at most ~1.6x (3.5x from a copy at the crop size),
# close to what the originals' 224 px crops saw in ImageNet's ~500 x 375 photographs, and small
# enough to keep decoding, transfer and roi_align costs down. The CPU-sized profile uses 2x.
SOURCE_SIZE_FACTORS = {"tiny": 2.0, "full": 16 / 7}  # full: 512 px sources for 224 px crops


def default_source_size(crop_size: int, profile: str) -> int:
    """The profile's ``source_size`` for ``crop_size`` crops, rounded up to 16 pixels."""
    if profile not in SOURCE_SIZE_FACTORS:
        raise ValueError(
            f"unknown profile {profile!r}; choose one of {', '.join(SOURCE_SIZE_FACTORS)}"
        )
    return 16 * math.ceil(crop_size * SOURCE_SIZE_FACTORS[profile] / 16)


def source_size_for(recipe: Any, requested: int | None = None) -> int:
    """The shorter-side cap of the images the views crop from: ``requested`` (a user's
    ``source_size``), else the recipe profile's default for its large crops."""
    if requested is None:
        return default_source_size(int(recipe.views.large_size), recipe.profile)
    if isinstance(requested, bool) or not isinstance(requested, int) or requested < 1:
        raise ValueError(f"source_size must be a positive number of pixels, not {requested!r}")
    return requested


def build_views(
    method: str,
    modality: str,
    spec: Any,
    device: torch.device | str | None = None,
    *,
    generator: torch.Generator | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> BatchAugment:
    """The method's published augmentations (or their grayscale variant) for ``spec``
    (a ViewSpec: n_large crops of large_size, n_small of small_size, crop area scales).
    ``overrides`` replaces ViewAugment fields in every view, e.g. ``{"flip_p": 0.0}``."""
    from medp2x.methods import augment_for  # the method registry; its modules import this one

    strength = float(getattr(spec, "color_strength", 1.0))
    augs = view_augments(
        augment_for(method), modality, int(spec.n_large), int(spec.n_small), overrides, strength
    )
    sizes = [spec.large_size] * spec.n_large + [spec.small_size] * spec.n_small
    scales = [tuple(spec.large_scale)] * spec.n_large + [tuple(spec.small_scale)] * spec.n_small
    antialias = bool(getattr(spec, "antialias", True))
    return BatchAugment(augs, sizes, scales, modality, device, generator, antialias=antialias)
