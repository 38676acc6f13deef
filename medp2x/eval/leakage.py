"""Test leakage: refuse an encoder whose pretraining run saw a test image (``medp2x.provenance``)."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

from torch import nn
from torch.utils.data import Dataset

from medp2x.baselines import BASELINES
from medp2x.eval.encoders import EncoderSpec

logger = logging.getLogger("medp2x.evaluate")


def check_test_overlap(
    encoders: Mapping[str, EncoderSpec], test: Dataset, allow: bool = False
) -> dict:
    """Per encoder, how many test images its pretraining run saw (``provenance.Overlap``).

    Refuses (ValueError, one line with the count) an encoder whose run saw any, unless
    ``allow``; then logs a warning and the table says so. Test images are hashed only when
    some encoder has a run record."""
    from medp2x.provenance import Overlap, count_test_overlap, find_record, sample_keys

    records = {name: _record_of(spec, find_record) for name, spec in encoders.items()}
    test_keys = sample_keys(test) if any(isinstance(r, Path) for r in records.values()) else None
    overlaps = {}
    for name, record in records.items():
        if isinstance(record, str):  # "not pretrained", "module": nothing to trace
            overlaps[name] = Overlap(record)
            continue
        overlap = count_test_overlap(record, test_keys)
        if overlap.seen:
            message = (
                f"encoder {name!r}: its pretraining run saw {overlap.seen} of the "
                f"{overlap.test_images} test images ({overlap.record})"
            )
            if not allow:
                raise ValueError(f"{message}; refusing to score it (--allow-test-overlap to force)")
            logger.warning("%s; scored anyway (allow_test_overlap)", message)
        overlaps[name] = overlap
    return overlaps


def _record_of(spec: EncoderSpec, find_record) -> Path | str | None:
    """The run record of an encoder file (None: none found), or why there is none to find."""
    if isinstance(spec, nn.Module):
        return "module"
    if str(spec) == "random" or str(spec) in BASELINES:
        return "not pretrained"
    return find_record(spec)
