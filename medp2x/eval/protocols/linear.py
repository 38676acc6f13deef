"""Linear probe protocol: multinomial logistic regression on standardised frozen features, fitted
full-batch with L-BFGS on the evaluation device.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from medp2x.eval.protocols.scores import (
    PREDICTIONS,
    predicted_classes,
    selection_score,
    test_metrics,
)
from medp2x.eval.settings import EvalSettings


def fit_logistic(
    x: torch.Tensor, y: torch.Tensor, num_classes: int, weight_decay: float, max_iter: int = 200
) -> nn.Linear:
    """Multinomial logistic regression, full batch, L-BFGS with strong-Wolfe line search.

    Why not Adam/SGD epochs or sklearn: the problem is convex, so L-BFGS reaches the optimum
    with no learning rate or epoch count to tune, deterministically, on whatever device holds
    the features (sklearn would move them to the CPU and is slower in the multinomial case).
    """
    layer = nn.Linear(x.shape[1], num_classes).to(device=x.device, dtype=x.dtype)
    nn.init.zeros_(layer.weight)
    nn.init.zeros_(layer.bias)
    opt = torch.optim.LBFGS(
        layer.parameters(),
        lr=1.0,
        max_iter=max_iter,
        history_size=20,
        tolerance_grad=1e-7,
        tolerance_change=1e-10,
        line_search_fn="strong_wolfe",
    )

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(layer(x), y) + 0.5 * weight_decay * layer.weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return layer.requires_grad_(False)


def linear_probe(
    train: tuple[torch.Tensor, torch.Tensor],
    val: tuple[torch.Tensor, torch.Tensor] | None,
    test: tuple[torch.Tensor, torch.Tensor],
    num_classes: int,
    settings: EvalSettings,
) -> tuple[dict, dict]:
    """Fit the probe on ``train`` and report it on ``test``. With ``val``, one probe per L2
    strength of ``settings.linear_weight_decays`` is fitted and the best on ``val`` kept;
    without, one probe with ``settings.linear_weight_decay`` (None: 1 / n, scikit-learn's
    default C = 1). Features are standardised with the training features' statistics."""
    mean, std = train[0].mean(0), train[0].std(0, unbiased=False).clamp_min(1e-6)

    def standardise(x: torch.Tensor) -> torch.Tensor:
        return (x - mean) / std

    def fit(wd: float) -> nn.Linear:
        return fit_logistic(
            standardise(train[0]), train[1], num_classes, wd, settings.linear_max_iter
        )

    if val is None:
        wd = settings.linear_weight_decay
        wd = 1.0 / len(train[0]) if wd is None else wd
        layer, score, selected = fit(wd), math.nan, f"weight_decay={wd:.3g} (fixed)"
    else:
        best = None
        for wd in settings.linear_weight_decays:
            layer = fit(wd)
            score = selection_score(
                layer(standardise(val[0])), val[1], num_classes, settings.select_metric
            )
            if best is None or score > best[0]:
                best = (score, wd, layer)
        score, wd, layer = best
        selected = f"weight_decay={wd:g}"
    scores = layer(standardise(test[0])).softmax(1)
    return test_metrics(scores, test[1], num_classes), {
        "selected": selected,
        "val_score": score,
        PREDICTIONS: predicted_classes(scores),
    }
