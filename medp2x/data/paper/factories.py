"""What bundles call: ``dataset_factory`` (a P2XJob's ``make_dataset``) and
``eval_data_factory`` (its ``make_eval_data``) for one of the paper's datasets by name.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from torch.utils.data import Dataset

from medp2x.data.base import check_on_error, drop_unreadable
from medp2x.data.paper.common import Splits, limit
from medp2x.data.paper.registry import PaperDataset, get


def _options(bench: PaperDataset, given: Mapping[str, object] | None) -> dict:
    unknown = sorted(set(given or {}) - set(bench.options))
    if unknown:
        known = ", ".join(bench.options) or "none"
        raise ValueError(f"{bench.name}: unknown option(s) {', '.join(unknown)} (known: {known})")
    return {**bench.options, **(given or {})}


def _resolve(path: str | Path) -> Path:
    return Path(path).expanduser()


class DatasetFactory:
    """``make_dataset(data_dir, image_size) -> Dataset`` of one benchmark's pretraining data
    (a class, so the hint below travels with it and it pickles for DataLoader workers)."""

    def __init__(self, bench: PaperDataset, max_samples: int | None, on_error: str, options: dict):
        self.bench, self.max_samples, self.options = bench, max_samples, options
        self.on_error = check_on_error(on_error)
        self.missing_data_hint = bench.missing(bench.pretraining, None)

    def __call__(self, data_dir: str | Path, image_size: int | None) -> Dataset:
        root = _resolve(data_dir)
        if not root.exists():
            raise FileNotFoundError(self.bench.missing(self.bench.pretraining, root))
        kwargs = {"on_error": self.on_error, "max_samples": self.max_samples, **self.options}
        dataset = self.bench.read_pretraining(root, image_size, **kwargs)
        return limit(dataset, self.max_samples)


def dataset_factory(
    benchmark: str, max_samples: int | None = None, on_error: str = "skip", **options
) -> DatasetFactory:
    """The pretraining reader of ``benchmark``, for ``P2XJob.make_dataset``."""
    bench = get(benchmark)
    return DatasetFactory(bench, max_samples, on_error, _options(bench, options))


class EvalDataFactory:
    """``make_eval_data() -> (train, test)`` of one benchmark's downstream task."""

    def __init__(self, bench: PaperDataset, root: Path, image_size, max_samples, on_error, options):
        self.bench, self.root, self.image_size = bench, root, image_size
        self.dropped: dict[str, list] = {}  # per split: (file, reason) left out
        self.max_samples, self.on_error, self.options = (
            max_samples,
            check_on_error(on_error),
            options,
        )

    def __call__(self) -> Splits:
        """(train, test). In skip mode every sample of both splits is read once here and each
        unreadable file is dropped from its own split (``self.dropped``): a bad test image is
        never replaced by a training image with its label, as the reader's own stand-in would."""
        if not self.root.exists():
            raise FileNotFoundError(self.bench.missing(self.bench.downstream, self.root))
        kwargs = {"on_error": self.on_error, "max_samples": self.max_samples, **self.options}
        train, test = self.bench.read_downstream(self.root, self.image_size, **kwargs)
        train, test = limit(train, self.max_samples), limit(test, self.max_samples)
        if self.on_error == "skip":
            train, test = drop_unreadable(train), drop_unreadable(test)
        self.dropped = {name: list(getattr(split, "dropped", [])) for name, split in
                        (("train", train), ("test", test))}  # fmt: skip
        return train, test


def eval_data_factory(
    benchmark: str,
    downstream_dir: str | Path | None = None,
    data_dir: str | Path | None = None,
    image_size: int | None = None,
    max_samples: int | None = None,
    on_error: str = "skip",
    **options,
) -> EvalDataFactory | None:
    """The downstream reader of ``benchmark``, for ``P2XJob.make_eval_data``.

    Same-set benchmarks read ``downstream_dir or data_dir``; the others (Histo: PCam, Xray:
    COVID-19 radiography, CelebA: UTKFace) need ``downstream_dir`` and return None without
    it, so a job falls back to its ``eval_dir`` (or the demo's labelled tiles) or skips.
    """
    bench = get(benchmark)
    options = _options(bench, options)
    root = downstream_dir or (data_dir if bench.same_set else None)
    if root is None:
        if data_dir is not None:
            print(
                f"[note] {bench.name}: no --downstream_dir ({bench.downstream.what}, from {bench.downstream.obtain}): no benchmark evaluation"
            )
        return None
    return EvalDataFactory(bench, _resolve(root), image_size, max_samples, on_error, options)
