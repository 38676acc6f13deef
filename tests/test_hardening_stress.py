"""The fast part of the fault-injection harness (#21): one bad file of every fault class the
stress generator knows (``benchmarks/stress.py``; ``make stress`` runs all of them in child
processes under a memory cap, with kills, malicious checkpoints and the PHI canary), each read
the way ``medp2x scan`` reads it. Every one must be named with its reason (or read, where it
is readable), never crash, never be accepted in silence."""

from __future__ import annotations

import logging
import sys
import warnings
from dataclasses import asdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

import stress  # noqa: E402


def test_every_fault_class_is_named_or_read_never_crashes(tmp_path):
    faults = stress.generate_bad_files(tmp_path, quick=True)
    assert {f.reader for f in faults} == set(stress.READERS) and len(faults) >= 100
    verdicts = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        logging.disable(logging.WARNING)
        try:
            for fault in faults:
                outcome = stress.read_one(asdict(fault))
                verdicts[f"{fault.reader}: {fault.name}"] = (stress.judge(fault, outcome), outcome)
        finally:
            logging.disable(logging.NOTSET)
    failed = {name: v for name, v in verdicts.items() if v[0] != "handled"}
    assert not failed, failed


def test_malicious_containers_are_all_written(tmp_path):
    files = stress.malicious_files(tmp_path, tmp_path / "EXECUTED")
    suffixes = {p.name.split(".", 1)[1] for p in files}
    assert {"pth", "pkl", "npy", "npz", "pth.tar", "pt"} <= suffixes
    assert not (tmp_path / "EXECUTED").exists()  # writing them runs nothing
