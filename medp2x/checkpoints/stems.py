"""Gray stems: an RGB ResNet's first convolution turned into one for 1-channel images.

``gray="sum"`` sums the three input filters, folding a per-channel mean/std into the filters and
``bn1`` so the gray network equals the RGB one on a gray image repeated to 3 channels;
``gray="repeat"`` keeps the 3-channel stem for gray images repeated to 3 channels.
"""

from __future__ import annotations

from pathlib import Path

import torch

from medp2x.checkpoints.report import LoadReport

GRAY_MODES = ("sum", "repeat")


def adapt_stem(
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
