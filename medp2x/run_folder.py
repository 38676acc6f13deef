"""The layout of a pretraining run's output folder, known here only.

``<out>/`` of one run (``PretrainConfig.out``; a bundle's ``output_dir/<p1x|p2x>``) holds:

==========================  =================================================================
``checkpoints/``            engine checkpoints ``checkpoint_<iteration>.pt`` (resume, Figs. 2-3)
``encoder.pt``              the final encoder (``checkpoints.save_encoder``)
``run_config.json``         what was run: settings, recipe, epoch plan, bf16 decision, handlers
``loss.csv``                iteration, epoch, loss, spread (consistent across resumes)
``seen_files.json``         content hashes of every pretraining sample (``provenance``)
``skipped_files.txt``       unreadable files, one ``file<TAB>reason`` line each
``surgery_report.csv/.png`` weight surgery's per-layer changes and norms (P2X only)
==========================  =================================================================

Weights files point back at their run: ``encoder.pt`` sits in the run folder, a checkpoint in
its ``checkpoints/`` subfolder (``run_folder_of``).
"""

from __future__ import annotations

from pathlib import Path

CHECKPOINTS = "checkpoints"
ENCODER = "encoder.pt"
RUN_CONFIG = "run_config.json"
LOSS_CSV = "loss.csv"
SEEN_FILES = "seen_files.json"
SKIPPED_FILES = "skipped_files.txt"
SURGERY_CSV = "surgery_report.csv"
SURGERY_PNG = "surgery_norms.png"


def checkpoint_dir(out: str | Path) -> Path:
    return Path(out) / CHECKPOINTS


def run_folder_of(weights: str | Path) -> Path:
    """The run folder a weights file belongs to: the folder above ``checkpoints/`` for a
    checkpoint, else the file's own folder (an ``encoder.pt``, or a file copied elsewhere)."""
    folder = Path(weights).parent
    return folder.parent if folder.name == CHECKPOINTS else folder
