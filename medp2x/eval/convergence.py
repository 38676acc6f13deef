"""Convergence figures (Figs. 2-3): downstream accuracy against pretraining progress for the
checkpoints of one or more runs.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
from torch import nn
from torch.utils.data import Dataset

from medp2x.eval.compare import compare_encoders
from medp2x.eval.encoders import checkpoint_progress, resolve_encoder
from medp2x.eval.leakage import check_test_overlap
from medp2x.eval.settings import EvalSettings, with_changes
from medp2x.run_folder import CHECKPOINTS, checkpoint_dir


def list_checkpoints(source: str | Path | Sequence[str | Path]) -> list[Path]:
    """Checkpoint files of a run: a list of files, a folder of ``*.pt`` files, or a run's
    output folder (its ``checkpoints/`` subfolder), in the order of their step numbers."""
    if isinstance(source, (str, Path)):
        root = Path(source)
        if not root.exists():
            raise FileNotFoundError(f"checkpoint source {str(root)!r} does not exist")
        if root.is_dir() and checkpoint_dir(root).is_dir():
            root = checkpoint_dir(root)
        files = sorted(root.glob("*.pt")) if root.is_dir() else [root]
    else:
        files = [Path(p) for p in source]
    if not files:
        raise FileNotFoundError(f"no checkpoint files (*.pt) in {source}")
    return sorted(files, key=_step_in_name)


def _step_in_name(path: Path) -> tuple[int, str]:
    """Sort key: the last number in the name (``checkpoint_<iteration>.pt``), then the name;
    avoids reading every (possibly large) checkpoint just to order them."""
    numbers = re.findall(r"\d+", path.stem)
    return (int(numbers[-1]) if numbers else -1, path.name)


def convergence_figure(
    series: Mapping[str, str | Path | Sequence[str | Path]] | str | Path | Sequence[str | Path],
    train: Dataset,
    test: Dataset,
    out_png: str | Path,
    val: Dataset | None = None,
    metric: str = "accuracy",
    x: str = "epoch",
    load: Callable[[Path], nn.Module] | None = None,
    settings: EvalSettings | None = None,
    **changes,
) -> tuple[Path, Path, list[dict]]:
    """Downstream ``metric`` against pretraining progress for the checkpoints of one or more
    runs (Figs. 2-3: e.g. {"P2X scaled": run_a, "P2X unscaled": run_b}), one line per series,
    values written beside the points. Returns (png, csv, rows); rows carry series, iteration
    and epoch besides the metrics (mean over draws is plotted, with its bootstrap interval in
    the rows).

    ``load`` turns a checkpoint file into an encoder (default: ``resolve_encoder``);
    ``settings`` and its keyword ``changes`` (one protocol, label_fraction, draws, image_size,
    ...) are ``compare_encoders``'.
    Every checkpoint's run record is checked against the test split first.
    """
    from medp2x.plots import plot_series

    settings = with_changes(settings, changes)
    if len(settings.protocols) != 1:
        raise ValueError(f"a convergence figure plots one protocol, not {settings.protocols}")
    protocol = settings.protocols[0]
    if x not in ("epoch", "iteration"):
        raise ValueError(f"x must be 'epoch' or 'iteration', not {x!r}")
    if not isinstance(series, Mapping):
        series = {_series_name(series): series}
    files = {name: list_checkpoints(source) for name, source in series.items()}
    overlaps = check_test_overlap(
        {f"{name} @ {path.name}": path for name, paths in files.items() for path in paths},
        test,
        settings.allow_test_overlap,
    )
    load = load or resolve_encoder
    all_rows, points = [], {}
    for name, paths in files.items():
        points[name] = []
        for path in paths:
            progress = checkpoint_progress(path)
            if progress[x] is None:
                raise ValueError(f"{path}: no trainer state, so no {x}; use x='iteration'")
            rows = compare_encoders(
                {f"{name} @ {x} {progress[x]:g}": load(path)},
                train,
                test,
                val,
                settings,
            )
            overlap = overlaps[f"{name} @ {path.name}"]
            for row in rows:
                row.update(series=name, checkpoint=path.name, **progress)
                row.update(test_overlap=overlap.note, test_images_seen=overlap.seen)
            all_rows += rows
            points[name].append((progress[x], 100 * float(np.mean([r[metric] for r in rows]))))
    xlabel = "pretraining epoch" if x == "epoch" else "pretraining iteration"
    png, csv_path = plot_series(
        points, out_png, xlabel=xlabel, ylabel=f"{protocol} {metric} (%)", title="Convergence"
    )
    return png, csv_path, all_rows


def _series_name(source) -> str:
    if isinstance(source, (str, Path)):
        path = Path(source)
        return path.parent.name if path.name == CHECKPOINTS else path.name
    return "run"
