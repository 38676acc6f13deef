"""What the MONAI bundles (``bundles/``) declare that needs a Python name, and how the
single-file bundles are made from the model-zoo layout.

The bundle is ``bundles/`` in MONAI's model-zoo layout: ``configs/train.json`` declares one P2X
run (reader, network, SSL method, views, optimiser, trainer, handler list), ``configs/p1x.json``
turns it into P1X, ``configs/benchmarks/<name>.json`` picks a benchmark. The files
``bundles/{p1x,p2x}_<name>.json`` are those overlays merged by MONAI's own merge
(``ConfigParser.load_config_files``), written out so that one ``--config_file`` runs from any
working directory (MONAI reads ``%file`` macros relative to the working directory, so a file
that pulled ``configs/train.json`` in that way would run from one folder only). They are
generated, never edited: ``python -m medp2x.bundle`` rewrites them; a test checks they match.
"""

from __future__ import annotations

import ast
import difflib
import json
import re
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from torch.utils.data import Dataset

BUNDLE_ROOT = Path(__file__).resolve().parents[1] / "bundles"
SCHEDULES = ("p1x", "p2x")
# Chains (medp2x.chain): configs/<chain>.json on train.json, for these benchmarks' readers.
CHAINS = {"hpt": ("histo", "mri", "us", "xray")}


# ----------------------------------------------------------------------------- command line
# ``monai.bundle run``'s own arguments: everything else on its command line is a config override.
MONAI_RUN_ARGS = frozenset(
    {"run_id", "init_id", "final_id", "meta_file", "config_file", "logging_file", "tracking",
     "args_file", "workflow_type", "workflow_name", "properties_path"}
)  # fmt: skip
# Settings that name a file or folder: MONAI reads a value starting with @ as a reference to
# another entry and one starting with $ as Python, so a folder called "@scans" needs "./@scans".
PATH_SETTINGS = ("data_dir", "output_dir", "ssl_checkpoint", "eval_dir", "downstream_dir")
ON_ERROR_CHOICES = ("skip", "raise")


def check_command_line(argv: list[str] | None = None) -> None:
    """First step of a bundle's ``run``: refuse, in one line and before anything is built, an
    override MONAI would silently add to the config (``--batchsize 8``: did you mean
    batch_size?), a file or folder name MONAI would take as a reference or expression, and an
    ``on_error`` other than skip/raise. Does nothing outside ``python -m monai.bundle run``."""
    from medp2x.settings import SettingError

    argv = sys.argv if argv is None else argv
    if not _is_bundle_run(argv):
        return
    try:
        overrides = command_line_overrides(argv[2:])
        check_overrides(overrides, known_ids(overrides.get("config_file")))
    except SettingError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


def _is_bundle_run(argv: list[str]) -> bool:
    main = Path(argv[0]) if argv else Path()
    return main.name == "__main__.py" and main.parent.name == "bundle" and argv[1:2] == ["run"]


def command_line_overrides(args: list[str]) -> dict[str, str]:
    """``--key value`` and ``--key=value`` pairs as python-fire reads them (flags without a
    value are ``"True"``)."""
    pairs, i = {}, 0
    while i < len(args):
        arg = args[i]
        if arg.startswith("--"):
            key, eq, value = arg[2:].partition("=")
            if not eq:
                has_value = i + 1 < len(args) and not args[i + 1].startswith("--")
                value = args[i + 1] if has_value else "True"
                i += has_value
            pairs[key] = value
        i += 1
    return pairs


def known_ids(config_file: str | None) -> set[str] | None:
    """Top-level ids of the bundle's config file(s) as given to ``--config_file`` (one path, or
    a list ``"[a.json,b.json]"``); None where they cannot be read (MONAI then says why)."""
    from monai.bundle import ConfigParser

    if not config_file:
        return None
    text = config_file.strip()
    files = (
        [f.strip(" '\"") for f in text.strip("[]").split(",")] if text.startswith("[") else [text]
    )
    try:
        return set(ConfigParser.load_config_files(files))
    except Exception:  # noqa: BLE001 - a file MONAI cannot read is MONAI's error to report
        return None


def check_overrides(overrides: Mapping[str, str], known: set[str] | None) -> None:
    from medp2x.settings import SettingError

    for key, value in overrides.items():
        top = key.split("#", 1)[0]
        if known is not None and top not in known and top not in MONAI_RUN_ARGS:
            close = difflib.get_close_matches(top, sorted(known | MONAI_RUN_ARGS), n=1)
            hint = f"; did you mean {close[0]}?" if close else ""
            raise SettingError(
                f"--{key}: no such setting in this bundle (MONAI would add it and change "
                f"nothing){hint} (the settings: README.md's override table, 'Your own data')"
            )
        if top in PATH_SETTINGS and "#" not in key:
            check_path_value(top, str(value), known)
        if top == "on_error" and value not in ON_ERROR_CHOICES:
            raise SettingError(
                f"on_error = {value!r} is not allowed: one of {', '.join(ON_ERROR_CHOICES)}"
            )


def _looks_like_code(text: str) -> bool:
    """Python that refers to a setting, calls something or holds a string: ``scans`` or
    ``scans/2024`` parse as Python too, but are folder names."""
    if re.search(r"@\w", text):
        return True
    try:
        tree = ast.parse(text, mode="eval")
    except SyntaxError:
        return False
    return any(
        isinstance(node, ast.Call)
        or (isinstance(node, ast.Constant) and isinstance(node.value, str))
        for node in ast.walk(tree)
    )


def check_path_value(name: str, value: str, known: set[str] | None) -> None:
    """A file or folder name that MONAI would read as ``@reference`` or ``$expression``."""
    from medp2x.settings import SettingError

    if value.startswith("@"):
        if known is not None and value[1:].split("#", 1)[0] in known:
            return  # a genuine reference to another setting
    elif value.startswith("$"):
        if _looks_like_code(value[1:]):
            return  # a genuine expression, e.g. "$'runs/' + @name" or "$os.environ['DATA']"
    else:
        return
    raise SettingError(
        f"{name} = {value!r}: MONAI reads a value starting with {value[0]!r} as "
        f"{'a reference to another setting' if value[0] == '@' else 'a Python expression'}, "
        f"not as a file name; for a file or folder called {value!r} write './{value}' "
        "or its absolute path"
    )


# ----------------------------------------------------------------------------- declared data


def benchmark_reader(
    benchmark: str,
    max_samples: int | None = None,
    on_error: str = "skip",
    options: Mapping[str, Any] | None = None,
) -> BenchmarkReader:
    """The pretraining reader of ``benchmark`` (``medp2x.data.paper.dataset_factory``),
    its options given as one dict so a bundle can override them as one key."""
    from medp2x.data.paper import dataset_factory, get

    factory = dataset_factory(benchmark, max_samples, on_error, **(options or {}))
    return BenchmarkReader(factory, get(benchmark).modality, max_samples, on_error)


class BenchmarkReader:
    """A benchmark's pretraining reader that also takes a private folder of the modality.

    A hospital's own scans are not laid out as the benchmark: where the benchmark's reader finds
    no layout, every file of the modality under the folder is read instead (slides for Histo,
    which reads any folder already; DICOM, else NIfTI slices, else images, like ``medp2x scan``),
    with one line saying so. The benchmark's layout stays required for its own downstream
    evaluation (``benchmark_eval_data``), and a folder with no such file keeps the benchmark's
    message (where its data comes from)."""

    def __init__(self, factory: Callable, modality: str, max_samples: int | None, on_error: str):
        self.factory, self.modality = factory, modality
        self.max_samples, self.on_error = max_samples, on_error
        self.missing_data_hint = getattr(factory, "missing_data_hint", None)

    def __call__(self, data_dir: str | Path, image_size: int) -> Dataset:
        from medp2x.data.paper import limit, read_medical_images

        try:
            return self.factory(data_dir, image_size)
        except FileNotFoundError as layout_error:
            root = Path(data_dir).expanduser()
            if not root.is_dir():
                raise
            try:
                dataset = read_medical_images(
                    root, image_size, gray=self.modality == "gray", on_error=self.on_error
                )
            except FileNotFoundError:
                raise layout_error from None
            print(
                f"[data] {root} is not laid out as the {self.factory.bench.name} benchmark: "
                f"pretraining on the {len(dataset)} samples of the files under it "
                "(the benchmark's evaluation needs its layout)"
            )
            return limit(dataset, self.max_samples)


def benchmark_eval_data(
    benchmark: str,
    downstream_dir: str | None = None,
    data_dir: str | None = None,
    max_samples: int | None = None,
    on_error: str = "skip",
    options: Mapping[str, Any] | None = None,
) -> BenchmarkEvalData | None:
    """The benchmark's labelled train/test reader, or None where no labelled data are given
    (the job then uses ``eval_dir`` or skips the evaluation)."""
    from medp2x.data.paper import eval_data_factory

    factory = eval_data_factory(
        benchmark, downstream_dir, data_dir, max_samples=max_samples, on_error=on_error,
        **(options or {}),
    )  # fmt: skip
    return None if factory is None else BenchmarkEvalData(factory, downstream_dir is not None)


class BenchmarkEvalData:
    """``make_eval_data() -> (train, test)``; ``(None, None)`` with the reason in ``skipped``
    when the labelled set would be read from ``data_dir`` (same-set benchmarks) and that folder
    is not laid out as the benchmark: a private folder pretrains, and the evaluation is skipped
    in one line. A ``downstream_dir`` given explicitly must hold the layout (an error)."""

    def __init__(self, factory: Callable, explicit: bool):
        self.factory, self.explicit = factory, explicit
        self.skipped: str | None = None

    def __call__(self) -> tuple[Dataset | None, Dataset | None]:
        try:
            return self.factory()
        except FileNotFoundError as err:
            if self.explicit:
                raise
            self.skipped = f"no labelled benchmark data ({err})"
            return None, None


class FolderReader:
    """A reader class made into the job's ``make_dataset(data_dir, source_size)``: ``reader``
    is called as ``reader(data_dir, image_size=source_size)``. In a bundle, ``reader`` is a
    ``_mode_: partial`` component with the reader's own options, e.g. a DICOM folder with
    another windowing::

        "dataset": {"_target_": "medp2x.bundle.FolderReader",
                    "reader": {"_target_": "medp2x.data.dicom.DicomDataset", "_mode_": "partial",
                               "window": "percentile", "percentiles": [1, 99], "resize": "cap",
                               "channels": 1, "on_error": "skip"}}
    """

    def __init__(self, reader: Callable[..., Dataset]):
        if not callable(reader):
            raise TypeError(f"dataset#reader must be a reader class or partial, got {reader!r}")
        self.reader = reader

    def __call__(self, data_dir: str | Path, source_size: int) -> Dataset:
        return self.reader(Path(data_dir).expanduser(), image_size=source_size)


# ----------------------------------------------------------------------------- inference


def extract_features(
    encoder: str | Path,
    make_dataset: Callable[[Path, int], Dataset],
    data_dir: str | Path,
    output_dir: str | Path,
    image_size: int = 224,
    batch_size: int = 32,
    num_workers: int = 0,
    normalization: str = "auto",
    device: str | None = None,
) -> Path:
    """Features of every sample under ``data_dir`` from an encoder file (``encoder.pt`` of a
    run, or any checkpoint medp2x reads), written to ``<output_dir>/features.npz``: ``features``
    (N x D float32, in the reader's order) and ``sha256`` of each sample's pixels. No path, file
    name or header is written: those can carry patient identifiers. Each image is resized on its
    shorter side to ``image_size`` and centre-cropped (the evaluation view), and normalised as
    the encoder file says."""
    import numpy as np
    import torch

    from medp2x.data.base import existing_path
    from medp2x.eval.encoders import resolve_encoder
    from medp2x.eval.features import extract_features as features_of
    from medp2x.eval.settings import EvalSettings

    encoder_path = existing_path(encoder, "encoder")
    root = existing_path(data_dir, "data_dir")
    dataset = make_dataset(root, image_size)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    settings = EvalSettings(
        image_size=image_size, batch_size=batch_size, num_workers=num_workers, device=device
    )
    network = resolve_encoder(str(encoder_path), normalization=normalization)
    feats, _ = features_of(network, dataset, settings, desc="features")
    digests = [_pixel_digest(dataset[i]["image"]) for i in range(len(dataset))]
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "features.npz"
    np.savez(path, features=feats.cpu().numpy().astype(np.float32), sha256=np.array(digests))
    print(f"features: {feats.shape[0]} x {feats.shape[1]} from {encoder_path} -> {path}")
    return path


def _pixel_digest(image: Any) -> str:
    import hashlib

    import numpy as np

    array = np.ascontiguousarray(np.asarray(image, dtype=np.float32))
    return hashlib.sha256(array.tobytes()).hexdigest()


# ----------------------------------------------------------------------------- single files


def overlays(benchmark: str, schedule: str, root: Path = BUNDLE_ROOT) -> list[Path]:
    """The model-zoo files that make ``<schedule>_<benchmark>.json``, in merge order."""
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    configs = root / "configs"
    files = [configs / "train.json"]
    if schedule == "p1x":
        files.append(configs / "p1x.json")
    files.append(configs / "benchmarks" / f"{benchmark}.json")
    return files


def merged(files: list[Path]) -> dict:
    """The files merged exactly as ``monai.bundle run --config_file "[...]"`` merges them."""
    from monai.bundle import ConfigParser

    return ConfigParser.load_config_files([str(f) for f in files])


def single_file_bundles(root: Path = BUNDLE_ROOT) -> dict[Path, dict]:
    """Every ``bundles/{p1x,p2x}_<benchmark>.json`` as it must read."""
    benchmarks = sorted(p.stem for p in (root / "configs" / "benchmarks").glob("*.json"))
    return {
        root / f"{schedule}_{name}.json": merged(overlays(name, schedule, root))
        for name in benchmarks
        for schedule in SCHEDULES
    }


def chain_bundles(root: Path = BUNDLE_ROOT) -> dict[Path, dict]:
    """Every ``bundles/<chain>_<benchmark>.json`` (``CHAINS``) as it must read: ``train.json``,
    the chain's overlay (its ``job`` is a ``medp2x.chain.ChainJob``), the benchmark's."""
    configs = root / "configs"
    return {
        root / f"{chain}_{name}.json": merged(
            [
                configs / "train.json",
                configs / f"{chain}.json",
                configs / "benchmarks" / f"{name}.json",
            ]
        )
        for chain, names in CHAINS.items()
        for name in names
    }


def write_single_file_bundles(root: Path = BUNDLE_ROOT) -> list[Path]:
    written = []
    for path, config in {**single_file_bundles(root), **chain_bundles(root)}.items():
        path.write_text(json.dumps(config, indent=2) + "\n")
        written.append(path)
    return written


if __name__ == "__main__":
    for path in write_single_file_bundles(Path(sys.argv[1]) if len(sys.argv) > 1 else BUNDLE_ROOT):
        print(f"wrote {path}")
