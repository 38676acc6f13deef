"""Weight surgery before second-stage pretraining (Ciga et al., §3): norm scaling, dead filters.

Self-supervised ImageNet ResNets have large convolution weights (most filters with Frobenius
norm > 1) and a few dead filters (norm < 0.1). Before pretraining them again on a new domain,
the paper (1) divides every conv weight followed by BatchNorm by √s, where s is its Frobenius
norm when s > 1, and compensates in BN (running mean /√s, running variance /s², γ /√s) so the
eval-mode function is unchanged; (2) replaces each dead filter with a copy of a random live
filter of the same layer. There is no reference code; ``docs/surgery.md`` explains each choice. What surgery did is
described, tabulated, written and plotted by ``medp2x.surgery_report``.

Choices where the paper is silent (all options, documented defaults):
- ``scale="per_filter"`` (default) uses one s per output channel, the unit Fig. 1 counts and
  the only one for which the text's "if the norm is greater than 1" tells inflated weights
  from ordinary ones (a whole layer's norm is above 1 in every ResNet, supervised ones too);
  ``"per_layer"`` uses one s per conv, the text's "norm of each layer": every layer is
  divided by √s (s about √filters × a filter's norm: 5-24 on a ResNet-18) and the effective
  learning rate of its filters multiplied by s. Both preserve the eval function since BN is
  per channel. ``benchmarks/p2x_surgery.py`` measured the consequence and chose the default.
- ``eps_exact=True`` folds BatchNorm's ε into γ so the function is preserved exactly with the
  usual ε = 1e-5 too: γ' = γ·√s·√(v/s² + ε)/√(v + ε), which is the paper's γ/√s when ε = 0.
  ``eps_exact=False`` is the paper's formula verbatim.
- A ``copy``-replaced filter also takes its source channel's BN entries (γ, β, running mean
  and variance), so the new channel is an exact twin of a live one; a ``random`` (Kaiming)
  filter gets a freshly initialised BN channel (γ 1, β 0, mean 0, variance 1). The next
  layer's input weights for that channel are left as they are.
- Dead filters are found on the weights as loaded, and replaced before scaling, so a filter
  that only looks small after per-layer scaling is not mistaken for a dead one.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path

import numpy as np
import torch
from ignite.engine import Engine, Events
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd

from medp2x.run_folder import SURGERY_CSV, SURGERY_PNG
from medp2x.surgery_report import LayerChange, SurgeryReport

logger = logging.getLogger("medp2x.surgery")

SCALE_MODES = ("per_layer", "per_filter", "none")
FILTER_MODES = ("copy", "random", "none")
DEFAULT_SCALE = "per_filter"  # why: docs/surgery.md, "Which scaling by default"


# ----------------------------------------------------------------------------- finding layers
@dataclass(frozen=True)
class ConvBN:
    """A convolution whose output goes straight into a BatchNorm over the same channels."""

    name: str  # module path of the conv, e.g. "layer1.0.downsample.0"
    conv: _ConvNd
    bn: _BatchNorm


def _is_conv(module: nn.Module) -> bool:
    return isinstance(module, _ConvNd) and not module.transposed


def _pairs_in_sequential(parent: nn.Sequential) -> list[tuple[str, nn.Module, nn.Module]]:
    return [
        (n1, m1, m2)
        for (n1, m1), (_, m2) in pairwise(parent.named_children())
        if _is_conv(m1) and isinstance(m2, _BatchNorm)
    ]


def _pairs_by_name(parent: nn.Module) -> list[tuple[str, nn.Module, nn.Module]]:
    """torchvision's naming: ``conv1 -> bn1``, ``convK -> bnK`` (and ``conv -> bn``)."""
    children = dict(parent.named_children())
    pairs = []
    for name, child in children.items():
        match = re.fullmatch(r"conv(\w*)", name)
        bn = children.get(f"bn{match.group(1)}") if match else None
        if _is_conv(child) and isinstance(bn, _BatchNorm):
            pairs.append((name, child, bn))
    return pairs


def find_conv_bn_pairs(model: nn.Module) -> list[ConvBN]:
    """Every conv followed by BN: stem, residual blocks and ``downsample`` shortcuts.

    Walks the module tree by torchvision's structure (``convK``/``bnK`` siblings, and
    consecutive conv, BN children of a ``Sequential`` such as ``downsample``) rather than by
    key strings, so wrappers and other ResNet-like models work too. Linear heads and ``fc``
    never match.
    """
    pairs, seen = [], set()
    for parent_name, parent in model.named_modules():
        found = (
            _pairs_in_sequential(parent)
            if isinstance(parent, nn.Sequential)
            else _pairs_by_name(parent)
        )
        for name, conv, bn in found:
            if id(conv) in seen or conv.out_channels != bn.num_features:
                continue
            seen.add(id(conv))
            pairs.append(ConvBN(f"{parent_name}.{name}".lstrip("."), conv, bn))
    return pairs


def filter_norms(weight: torch.Tensor) -> torch.Tensor:
    """Frobenius norm of each output filter (float64 on the CPU, one value per output channel)."""
    return weight.detach().double().flatten(1).norm(dim=1).cpu()


def conv_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """The weights surgery acts on, keyed by conv module path."""
    return {pair.name: pair.conv.weight.detach() for pair in find_conv_bn_pairs(model)}


def conv_weights_from_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Conv kernels of a state dict (floating ``*.weight`` tensors of 3 or more dimensions).

    Inspection works from keys alone so that any architecture can be inspected, not just
    the ones ``build_encoder`` knows; in ResNets every conv is followed by BN.
    """
    return {
        key[: -len(".weight")]: value
        for key, value in state_dict.items()
        if key.endswith(".weight") and value.ndim >= 3 and value.is_floating_point()
    }


# ------------------------------------------------------------------------------- statistics
@dataclass(frozen=True)
class LayerStats:
    """Filter-norm summary of one conv layer (or of all layers: ``layer == "all"``)."""

    layer: str
    filters: int
    frac_above: float  # fraction of filters with norm > threshold (exploding)
    frac_dead: float  # fraction of filters with norm < dead_threshold (dead)
    min: float
    median: float
    max: float


def _summarise(
    layer: str, norms: torch.Tensor, threshold: float, dead_threshold: float
) -> LayerStats:
    return LayerStats(
        layer=layer,
        filters=int(norms.numel()),
        frac_above=float((norms > threshold).double().mean()),
        frac_dead=float((norms < dead_threshold).double().mean()),
        min=float(norms.min()),
        median=float(norms.median()),
        max=float(norms.max()),
    )


def layer_norms(weights: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per-filter norms of each layer: computed once, then summarised and plotted."""
    return {name: filter_norms(w) for name, w in weights.items()}


def norm_stats(
    norms: Mapping[str, torch.Tensor], threshold: float = 1.0, dead_threshold: float = 0.1
) -> list[LayerStats]:
    """Per-layer statistics of ``layer_norms``, then one ``"all"`` row pooling every filter."""
    if not norms:
        raise ValueError("no convolution weights to summarise")
    rows = [_summarise(name, n, threshold, dead_threshold) for name, n in norms.items()]
    rows.append(_summarise("all", torch.cat(list(norms.values())), threshold, dead_threshold))
    return rows


def pooled_norms(norms: Mapping[str, torch.Tensor]) -> np.ndarray:
    """Every filter's norm, pooled over layers: one series of the Fig. 1 histogram."""
    return torch.cat(list(norms.values())).numpy()


# --------------------------------------------------------------------------------- surgery
def _check_choice(value: str, choices: Sequence[str], what: str) -> None:
    if value not in choices:
        raise ValueError(f"{what} must be one of {', '.join(choices)}, not {value!r}")


def _check_batchnorm(pair: ConvBN) -> None:
    bn = pair.bn
    if not bn.affine or bn.running_var is None or bn.running_mean is None:
        raise ValueError(
            f"{pair.name}: weight surgery needs an affine BatchNorm with running statistics "
            "(γ compensates the scaled conv weights)"
        )


def _bn_tensors(bn: _BatchNorm) -> tuple[torch.Tensor, ...]:
    return (bn.weight.data, bn.bias.data, bn.running_mean, bn.running_var)


def _copy_filters(
    pair: ConvBN, dead: torch.Tensor, live: torch.Tensor, gen: torch.Generator
) -> list[int]:
    """Dead filters become copies of random live ones (distinct while enough are live),
    together with the live channels' BN entries, so each new channel twins a live one."""
    if len(dead) <= len(live):
        picks = torch.randperm(len(live), generator=gen)[: len(dead)]
    else:
        picks = torch.randint(len(live), (len(dead),), generator=gen)
    sources = live[picks]
    tensors = [pair.conv.weight.data, *_bn_tensors(pair.bn)]
    if pair.conv.bias is not None:
        tensors.append(pair.conv.bias.data)
    for tensor in tensors:
        tensor[dead.to(tensor.device)] = tensor[sources.to(tensor.device)]
    return sources.tolist()


def _reinit_filters(pair: ConvBN, dead: torch.Tensor, gen: torch.Generator) -> None:
    """Dead filters get torchvision ResNet's own init (Kaiming normal, fan_out, ReLU) and a
    freshly initialised BN channel; drawn on the CPU so every rank and device agrees."""
    weight = pair.conv.weight.data
    fresh = torch.empty(weight.shape, dtype=torch.float32)
    nn.init.kaiming_normal_(fresh, mode="fan_out", nonlinearity="relu", generator=gen)
    index = dead.to(weight.device)
    weight[index] = fresh[dead].to(weight)
    if pair.conv.bias is not None:
        pair.conv.bias.data[index] = 0
    gamma, beta, mean, var = _bn_tensors(pair.bn)
    gamma[index], beta[index], mean[index], var[index] = 1, 0, 0, 1


def _replace_dead_filters(
    pair: ConvBN,
    norms: torch.Tensor,
    mode: str,
    dead_threshold: float,
    gen: torch.Generator,
    change: LayerChange,
) -> None:
    dead = torch.nonzero(norms < dead_threshold).flatten()
    live = torch.nonzero(norms >= dead_threshold).flatten()
    change.dead = dead.tolist()
    if mode == "none" or len(dead) == 0:
        return
    if mode == "random":
        _reinit_filters(pair, dead, gen)
    elif len(live) == 0:
        logger.warning(
            "%s: all %d filters are dead; nothing to copy, left as they are", pair.name, len(dead)
        )
        return
    else:
        change.sources = _copy_filters(pair, dead, live, gen)
    change.replaced = len(dead)


def _scale_factors(pair: ConvBN, mode: str, threshold: float) -> torch.Tensor | None:
    """s per output channel (float64), 1 where a channel is left alone; None: nothing to do."""
    weight = pair.conv.weight
    if mode == "per_layer":
        s = weight.detach().double().norm()
        return s.expand(weight.shape[0]).clone() if s > threshold else None
    norms = filter_norms(weight)
    above = norms > threshold
    return torch.where(above, norms, torch.ones_like(norms)) if above.any() else None


def _scale_pair(pair: ConvBN, s: torch.Tensor, eps_exact: bool) -> None:
    """conv /√s, running mean /√s, running variance /s², γ /√s (or its ε-exact form).

    In eval mode BN computes (conv(x) − μ)/√(v + ε)·γ + β. With the scaled values this is
    (conv(x) − μ)/√s / √(v/s² + ε) · γ', equal to the original for every input iff
    γ' = γ·√s·√(v/s² + ε)/√(v + ε); for ε = 0 that is the paper's γ/√s.
    """
    gamma, _, mean, var = _bn_tensors(pair.bn)
    root = s.to(var.device).sqrt()
    old_var = var.double()
    new_var = old_var / root**4
    if eps_exact:
        eps = pair.bn.eps
        ratio = torch.sqrt(new_var + eps) / torch.sqrt(old_var + eps)
        gamma_factor = torch.where(old_var + eps > 0, root * ratio, 1 / root)
    else:
        gamma_factor = 1 / root
    shape = (-1,) + (1,) * (pair.conv.weight.ndim - 1)
    pair.conv.weight.data.copy_(
        pair.conv.weight.double() / root.to(pair.conv.weight.device).view(shape)
    )
    if pair.conv.bias is not None:
        pair.conv.bias.data.copy_(pair.conv.bias.double() / root.to(pair.conv.bias.device))
    mean.copy_(mean.double() / root)
    var.copy_(new_var)
    gamma.copy_(gamma.double() * gamma_factor)


@torch.no_grad()
def apply_surgery(
    encoder: nn.Module,
    scale: str = DEFAULT_SCALE,
    filters: str = "copy",
    threshold: float = 1.0,
    dead_threshold: float = 0.1,
    seed: int = 0,
    eps_exact: bool = True,
) -> SurgeryReport:
    """Scale exploding weights and replace dead filters of ``encoder`` in place.

    ``scale``: ``"per_filter"`` (one Frobenius norm s per output channel, the default),
    ``"per_layer"`` (one per conv) or ``"none"``; only norms above ``threshold`` are scaled.
    ``filters``: dead filters (norm < ``dead_threshold``) become ``"copy"`` of a random live
    filter of the same layer, ``"random"`` Kaiming-initialised ones, or stay (``"none"``).
    ``eps_exact`` keeps the eval-mode function exact with BN's ε > 0 (see ``_scale_pair``).
    The same ``seed`` gives bit-identical results on every run and rank.
    """
    _check_choice(scale, SCALE_MODES, "scale")
    _check_choice(filters, FILTER_MODES, "filters")
    pairs = find_conv_bn_pairs(encoder)
    if not pairs:
        raise ValueError(
            f"{type(encoder).__name__}: no convolution followed by BatchNorm to operate on"
        )
    for pair in pairs:
        _check_batchnorm(pair)
    norms_before = layer_norms({p.name: p.conv.weight for p in pairs})
    gen = torch.Generator().manual_seed(seed)
    changes = []
    for pair in pairs:
        change = LayerChange(pair.name)
        _replace_dead_filters(pair, norms_before[pair.name], filters, dead_threshold, gen, change)
        s = _scale_factors(pair, scale, threshold) if scale != "none" else None
        if s is not None:
            _scale_pair(pair, s, eps_exact)
            change.scale = float(s.max())
            change.scaled_filters = int((s != 1).sum()) if scale == "per_filter" else len(s)
        changes.append(change)
    norms_after = layer_norms(conv_weights(encoder))
    options = dict(scale=scale, filters=filters, threshold=threshold, dead_threshold=dead_threshold)
    options.update(seed=seed, eps_exact=eps_exact)
    return SurgeryReport(
        options=options,
        before=norm_stats(norms_before, threshold, dead_threshold),
        after=norm_stats(norms_after, threshold, dead_threshold),
        changes=changes,
        norms_before=pooled_norms(norms_before),
        norms_after=pooled_norms(norms_after),
    )


# ---------------------------------------------------------------------------------- ignite
class SurgeryHandler:
    """Applies weight surgery when a fresh second-stage run starts, never on resume.

    Attached to ``Events.STARTED``; a resumed run has ``engine.state.iteration > 0`` there
    (the trainer's state is loaded before ``run``), so its already-trained weights are kept.
    ``model`` is the encoder or a zero-argument callable returning it. ``after`` runs once
    surgery is done, e.g. ``method.reset_momentum_encoders`` so targets see the new weights.
    """

    def __init__(
        self,
        model: nn.Module | Callable[[], nn.Module],
        scale: str = DEFAULT_SCALE,
        filters: str = "copy",
        seed: int = 0,
        output_dir: str | Path | None = None,
        after: Callable[[], None] | None = None,
        **surgery_options,
    ):
        _check_choice(scale, SCALE_MODES, "scale")
        _check_choice(filters, FILTER_MODES, "filters")
        self.model, self.scale, self.filters, self.seed = model, scale, filters, seed
        self.output_dir = Path(output_dir) if output_dir is not None else None
        self.after, self.surgery_options = after, surgery_options
        self.report: SurgeryReport | None = None

    def attach(self, engine: Engine) -> SurgeryHandler:
        engine.add_event_handler(Events.STARTED, self)
        return self

    def _encoder(self) -> nn.Module:
        return self.model if isinstance(self.model, nn.Module) else self.model()

    def __call__(self, engine: Engine) -> None:
        if engine.state.iteration != 0:
            logger.info(
                "resumed at iteration %d: weight surgery not applied again", engine.state.iteration
            )
            return
        self.report = apply_surgery(
            self._encoder(),
            scale=self.scale,
            filters=self.filters,
            seed=self.seed,
            **self.surgery_options,
        )
        logger.info("%s", self.report)
        if self.output_dir is not None and _is_main_process():
            self.report.write_csv(self.output_dir / SURGERY_CSV)
            self.report.plot(self.output_dir / SURGERY_PNG)
        if self.after is not None:
            self.after()


def _is_main_process() -> bool:
    """Every rank applies the (deterministic) surgery; only rank 0 writes the files."""
    import ignite.distributed as idist

    return idist.get_rank() == 0
