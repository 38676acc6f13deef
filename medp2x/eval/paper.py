"""One of the paper's ten datasets in, results out: the entry point of bundles/evaluate.json.

One cell group of Tables 2-5 or one panel of Figs. 2-3 on a dataset's downstream task and its
own test split (``medp2x.data.paper`` reads the data; this module evaluates), so the data
package does not depend on evaluation. ``benchmark`` stays the bundle's argument name.
"""

from __future__ import annotations

import logging
import shlex
import sys
from collections.abc import Mapping
from pathlib import Path

import torch

from medp2x.atomic import atomic_write_bytes
from medp2x.data.paper import PaperDataset, eval_data_factory, get
from medp2x.eval.compare import compare_encoders
from medp2x.eval.convergence import convergence_figure
from medp2x.eval.report import format_differences, format_table, write_results
from medp2x.run_folder import SKIPPED_FILES

logger = logging.getLogger("medp2x.evaluate")


def encoder_specs(encoder, random: bool = True) -> dict[str, str]:
    """Encoders to compare, by display name: a path, a list of paths, or {name: path}; plus
    the paper's Random baseline when ``random``."""
    if encoder is None:
        specs = {}
    elif isinstance(encoder, Mapping):
        specs = {str(k): str(v) for k, v in encoder.items()}
    else:
        specs = {}
        for path in [encoder] if isinstance(encoder, (str, Path)) else encoder:
            name = _encoder_name(path)
            specs[name if name not in specs else f"{name} ({len(specs) + 1})"] = str(path)
    if random:
        specs.setdefault("Random", "random")
    if not specs:
        raise ValueError("no encoder to evaluate: set --encoder PATH (or a list / {name: path})")
    return specs


def _encoder_name(path: str | Path) -> str:
    """``runs/p2x_xray/p2x/encoder.pt`` -> ``p2x_xray``: the run folder names the encoder."""
    path = Path(path)
    parts = [p for p in path.parent.parts if p not in (".", "")]
    if path.stem == "encoder" and len(parts) >= 2 and parts[-1] in ("p1x", "p2x", "stage1"):
        return parts[-2]
    return path.stem if path.stem != "encoder" or not parts else parts[-1]


def evaluate_paper_dataset(
    benchmark: str,
    encoder=None,
    output_dir: str | Path = "runs/evaluate",
    data_dir: str | Path | None = None,
    downstream_dir: str | Path | None = None,
    random: bool = True,
    max_samples: int | None = None,
    on_error: str = "skip",
    options: Mapping[str, object] | None = None,
    device: str | None = None,
    series: Mapping[str, str | Path] | None = None,
    x: str = "epoch",
    **compare_kwargs,
) -> list[dict]:
    """One cell group of Tables 2-5, or one panel of Figs. 2-3, on a benchmark's downstream
    task and its own test split; everything lands in ``output_dir``.

    Tables (``encoder``: a path, a list, or {name: path}; plus Random unless ``random`` is
    False): ``results.md`` / ``.csv`` / ``.png``, each encoder's paired difference against
    the reference with its interval. Figures (``series``: {name: pretraining run folder}):
    every kept checkpoint of each run evaluated, ``convergence.png`` / ``.csv`` and
    ``convergence_results.md`` / ``.csv``. Images are read at their own size and shown to
    the encoders through the shape-keeping evaluation view at ``image_size``.
    """
    bench = get(benchmark)
    factory = eval_data_factory(
        benchmark,
        downstream_dir,
        (data_dir or bench.default_data_dir) if bench.same_set else None,
        None,  # no resize in the reader: the evaluation view keeps each image's shape
        max_samples,
        on_error,
        **(options or {}),
    )
    if factory is None:
        raise FileNotFoundError(bench.missing(bench.downstream, None))
    train, test = factory()
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    out = Path(output_dir)
    dropped = _report_dropped(factory.dropped, out)
    command = _bundle_command(benchmark, encoder, output_dir, data_dir, downstream_dir, random,
                              max_samples, options, series, x, compare_kwargs)  # fmt: skip
    kwargs = {"in_channels": 1 if bench.gray else 3, "device": device, **compare_kwargs}
    if series:
        kwargs.pop("reference", None)  # one encoder per checkpoint: nothing to pair
        png, points, rows = convergence_figure(
            {str(k): str(v) for k, v in series.items()}, train, test, out / "convergence.png",
            x=x, reference=None, **kwargs,
        )  # fmt: skip
        _note_test_split(rows, bench, dropped)
        md, _ = write_results(
            rows, out, title=f"{bench.title}: downstream accuracy per pretraining checkpoint",
            command=command, stem="convergence_results", figure=False,
        )  # fmt: skip
        print(f"[evaluate] {bench.title}: wrote {png}, {points} and {md}")
        return rows
    specs = encoder_specs(encoder, random)
    print(
        f"[evaluate] {bench.title}: {', '.join(specs)} on {len(train)} train / {len(test)} test samples ({bench.classes})"
    )
    rows = compare_encoders(specs, train, test, **kwargs)
    _note_test_split(rows, bench, dropped)
    md, _ = write_results(
        rows, out, title=f"{bench.title}: {bench.downstream_data.what}", command=command
    )
    print(format_table(rows))
    differences = format_differences(rows)
    if differences:
        print(f"\nPaired differences (* : 95% interval excludes 0)\n{differences}")
    print(f"results: {md}, {out / 'results.csv'}, {out / 'results.png'}")
    return rows


def _report_dropped(dropped: dict[str, list], out: Path) -> dict[str, int]:
    """Say how many unreadable files each split lost, and write their list (file and reason)
    to ``out/skipped_files.txt``."""
    counts = {name: len(files) for name, files in dropped.items()}
    if not any(counts.values()):
        return counts
    text = "".join(
        f"{name}\t{path}\t{reason}\n" for name, files in dropped.items() for path, reason in files
    )
    listing = atomic_write_bytes(
        out / SKIPPED_FILES, text.encode("utf-8", errors="backslashreplace")
    )
    print(
        f"[evaluate] unreadable files dropped from their own split: {counts['train']} train, "
        f"{counts['test']} test (list: {listing})"
    )
    return counts


def _note_test_split(rows: list[dict], bench: PaperDataset, dropped: dict | None = None) -> None:
    dropped = dropped or {}
    note = f"{bench.downstream_data.what}: {bench.test_split}"
    if dropped.get("test"):
        note += f"; {dropped['test']} unreadable test file(s) dropped (skipped_files.txt)"
    for row in rows:
        row["test_source"] = note
        row["n_dropped_train"], row["n_dropped_test"] = (
            dropped.get("train", 0),
            dropped.get("test", 0),
        )


def _bundle_command(benchmark, encoder, output_dir, data_dir, downstream_dir, random,
                    max_samples, options, series, x, compare_kwargs) -> str:  # fmt: skip
    """The ``bundles/evaluate.json`` command that reproduces this evaluation."""
    given = {
        "benchmark": benchmark, "encoder": encoder, "series": series, "output_dir": output_dir,
        "data_dir": data_dir, "downstream_dir": downstream_dir, "max_samples": max_samples,
        "options": options or None, **compare_kwargs,
    }  # fmt: skip
    if not random:
        given["random"] = False
    if series:
        given["x"] = x
    parts = ["python -m monai.bundle run --config_file bundles/evaluate.json"]
    for key, value in given.items():
        if value is None or key == "progress":
            continue
        text = str(value) if isinstance(value, (str, int, float, Path)) else repr(value)
        parts.append(f"--{key} {_shell_word(text)}")
    return " ".join(parts)


def _shell_word(text: str) -> str:
    """``text`` quoted for a shell, readably: "{'P2X': 'runs/x'}" rather than '"'"' chains."""
    if shlex.quote(text) == text or not any(c in text for c in '"$`\\!'):
        return text if shlex.quote(text) == text else f'"{text}"'
    return shlex.quote(text)


def evaluate_or_exit(**kwargs) -> list[dict]:
    """``evaluate_paper_dataset`` for bundles/evaluate.json: user errors as one line, no traceback."""
    try:
        return evaluate_paper_dataset(**kwargs)
    except (FileNotFoundError, ValueError) as err:
        logger.debug("evaluation failed", exc_info=True)
        sys.exit(f"evaluate {kwargs.get('benchmark')}: error: {err}")
