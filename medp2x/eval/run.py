"""Paths in, ``results.md`` / ``results.csv`` / ``results.png`` out: the entry point of
``medp2x evaluate`` and of evaluation bundles (``_target_: medp2x.eval.run.run_evaluation``).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

from torch.utils.data import Dataset, Subset

from medp2x.eval.compare import compare_encoders
from medp2x.eval.encoders import EncoderSpec, encoder_name
from medp2x.eval.report import write_results
from medp2x.eval.splits import dataset_labels, stratified_split

logger = logging.getLogger("medp2x.evaluate")


def load_datasets(
    data: str | Path,
    val_data: str | Path | None = None,
    test_data: str | Path | None = None,
    test_fraction: float = 0.2,
    gray: bool = False,
    on_error: str = "raise",
) -> tuple[Dataset, Dataset | None, Dataset, str]:
    """(train, val or None, test, where the test split comes from) from paths.

    ``data`` is a class-per-folder image set (``medp2x.data.folder``) or a MedMNIST-style
    ``.npz`` (its val/test splits are used unless others are given). The test split is a
    property of the dataset, never of an evaluation's seed: ``test_data``, else the file's
    ``test`` split, else a stratified ``test_fraction`` of each class held out with the
    registry's fixed ``SPLIT_SEED`` (the split the paper datasets' pretraining readers exclude).
    Images are read at their own size; the evaluation view resizes them (shape kept).
    """
    from medp2x.data.paper import SPLIT_SEED

    train, val, test = _read_path(data, "train", gray, on_error), None, None
    note = "given (--test-data)"
    if Path(data).suffix == ".npz":
        from medp2x.data.npz import available_splits

        splits = available_splits(data)
        val = _read_path(data, "val", gray, on_error) if "val" in splits else None
        if "test" in splits:
            test, note = _read_path(data, "test", gray, on_error), "the file's test split"
    if val_data is not None:
        val = _read_path(val_data, "val", gray, on_error)
    if test_data is not None:
        test, note = _read_path(test_data, "test", gray, on_error), "given (--test-data)"
    elif test is None:
        kept, held = stratified_split(dataset_labels(train, True), test_fraction, SPLIT_SEED)
        train, test = Subset(train, kept.tolist()), Subset(train, held.tolist())
        note = (
            f"{100 * test_fraction:g}% of each class held out of --data with the fixed split "
            f"seed {SPLIT_SEED} (as the benchmark registry)"
        )
    return train, val, test, note


def _read_path(path, split: str, gray: bool, on_error: str) -> Dataset:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"data {str(path)!r} does not exist")
    if path.suffix == ".npz":
        from medp2x.data.npz import NpzDataset

        return NpzDataset(path, split)
    if not path.is_dir():
        raise ValueError(f"{path}: expected a class-per-folder directory or a .npz file")
    from medp2x.data.folder import ImageFolderDataset

    return ImageFolderDataset(path, gray=gray, on_error=on_error)


def run_evaluation(
    data: str | Path,
    encoders: Mapping[str, EncoderSpec] | Sequence[EncoderSpec],
    out_dir: str | Path,
    val_data: str | Path | None = None,
    test_data: str | Path | None = None,
    test_fraction: float = 0.2,
    gray: bool = False,
    on_error: str = "raise",
    command: str | None = None,
    **compare_kwargs,
) -> list[dict]:
    """Paths in, ``results.md`` / ``results.csv`` / ``results.png`` out: the CLI's and the
    evaluation bundles' entry point (``_target_: medp2x.eval.run.run_evaluation``)."""
    if not isinstance(encoders, Mapping):
        encoders = {encoder_name(e): e for e in encoders}
    train, val, test, note = load_datasets(data, val_data, test_data, test_fraction, gray, on_error)
    logger.info("test split: %s", note)
    rows = compare_encoders(encoders, train, test, val, **compare_kwargs)
    for row in rows:
        row["test_source"] = note
    write_results(
        rows, out_dir, title=f"Downstream evaluation on {Path(data).name}", command=command
    )
    return rows
