"""Precision and batch statistics on the device: bf16 autocast only where the hardware has it
natively (emulated bf16 on an AVX2 CPU is many times slower than fp32), and SyncBN per method."""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ignite.distributed as idist
import torch

from medp2x.networks import strided_convs_on_one_pixel

logger = logging.getLogger("medp2x.engine")

AMP_CHOICES = {"auto": "auto", "true": "true", "false": "false", "1": "true", "0": "false"}


@dataclass(frozen=True)
class AmpDecision:
    """Whether this run computes in bf16 autocast, and why (written to run_config.json)."""

    requested: str  # "auto", "true" or "false"
    enabled: bool
    reason: str


def parse_amp(value: bool | str | None) -> str:
    """``amp`` as given in Python (True/False/"auto") or on a bundle's command line ("true")."""
    if isinstance(value, bool):
        return "true" if value else "false"
    choice = AMP_CHOICES.get(str(value).strip().lower())
    if choice is None:
        raise ValueError(f"amp must be true, false or auto, got {value!r}")
    return choice


def cpu_bf16_features(cpuinfo: str | Path = "/proc/cpuinfo") -> list[str]:
    """The native bf16 instructions of this CPU: AVX512_BF16 and/or AMX (oneDNN's fast bf16
    paths). ``torch.backends.cpu.get_cpu_capability()`` says only "AVX512" on such CPUs, so ask
    torch's cpuinfo probes, else read the Linux flags."""
    probes = {"AVX512_BF16": "_is_avx512_bf16_supported", "AMX": "_is_amx_tile_supported"}
    if all(hasattr(torch.cpu, probe) for probe in probes.values()):
        return [name for name, probe in probes.items() if getattr(torch.cpu, probe)()]
    try:
        flags = set(Path(cpuinfo).read_text().split())
    except OSError:
        return []
    return [
        name
        for name, flag in (("AVX512_BF16", "avx512_bf16"), ("AMX", "amx_bf16"))
        if flag in flags
    ]


def native_bf16(device: torch.device) -> tuple[bool, str]:
    """Does ``device`` compute bf16 natively (True), or emulate it, many times slower than fp32?"""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        if torch.cuda.is_bf16_supported(including_emulation=False):
            return True, f"{name} computes bf16 natively"
        return False, f"{name} has no native bf16 (it needs compute capability 8.0 or later)"
    if device.type == "cpu":
        features = cpu_bf16_features()
        if features:
            return True, f"this CPU computes bf16 natively ({' and '.join(features)})"
        return False, (
            f"this CPU ({torch.backends.cpu.get_cpu_capability()}) has neither AVX512_BF16 nor "
            "AMX, so bf16 is emulated and many times slower than fp32"
        )
    return False, f"no native-bf16 check for {device.type} devices"


def resolve_amp(
    amp: bool | str | None,
    device: torch.device,
    encoder: torch.nn.Module,
    views: Any,
    channels: int,
) -> AmpDecision:
    """bf16 autocast: ``auto`` turns it on where the device computes bf16 natively and the crops
    are safe for it; an explicit ``true`` is obeyed (with a warning where bf16 is emulated) but
    still refused where it would give wrong gradients (``check_bf16_view_sizes``)."""
    requested = parse_amp(amp)
    if requested == "false":
        return AmpDecision(requested, False, "amp=false")
    native, why = native_bf16(device)
    if requested == "true":
        if device.type == "cpu":
            check_bf16_view_sizes(encoder, views, channels)
        if not native:
            message = f"amp=true, but {why}: expect a slower run than with amp=false"
            logger.warning(message)
            warnings.warn(message, RuntimeWarning, stacklevel=2)
        return AmpDecision(requested, True, f"amp=true; {why}")
    if native and device.type == "cpu":
        smallest = min(views.sizes())
        bad = strided_convs_on_one_pixel(encoder, smallest, channels)
        if bad:  # the guard of check_bf16_view_sizes, as a reason to stay in fp32
            native, why = (
                False,
                (
                    f"{why}, but its {smallest} px crops give 1 x 1 maps to strided convolutions "
                    f"({', '.join(bad)}), whose bf16 weight gradients are wrong on CPU"
                ),
            )
    decision = AmpDecision(requested, native, f"amp=auto: {'bf16' if native else 'fp32'}, {why}")
    logger.info(decision.reason)
    return decision


def wants_sync_bn(method: torch.nn.Module, device: torch.device) -> bool:
    """SyncBatchNorm across processes where the method's original uses it (SimCLR, BYOL, SwAV;
    not MoCo, whose shuffled BN needs each GPU's own statistics) and where torch has it (CUDA:
    CPU processes each keep their own BN statistics)."""
    wanted = bool(getattr(method, "sync_bn", True)) and idist.get_world_size() > 1
    if wanted and device.type != "cuda":
        logger.info(
            "SyncBatchNorm runs on CUDA only: each of the %d %s processes normalises over its own "
            "batch",
            idist.get_world_size(),
            device.type,
        )
        return False
    return wanted


def check_bf16_view_sizes(encoder: torch.nn.Module, views: Any, channels: int) -> None:
    """bf16 autocast on CPU gets the weight gradients of strided convolutions on 1 x 1 maps
    wrong (``networks.strided_convs_on_one_pixel``): refuse crops that produce them."""
    smallest = min(views.sizes())
    bad = strided_convs_on_one_pixel(encoder, smallest, channels)
    if bad:
        raise ValueError(
            f"amp (bf16 autocast) on CPU computes wrong weight gradients for strided "
            f"convolutions of 1 x 1 feature maps, and {smallest} px crops give those in "
            f"{', '.join(bad)}: use larger crops (views.small_size / image_size) or amp=False"
        )
