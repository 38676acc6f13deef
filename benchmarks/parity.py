"""Parity with lightly (issue #14): does medp2x pretrain as well, and as fast, as a trusted peer?

For SimCLR, BYOL, MoCo v2 and SwAV, two implementations pretrain the same torchvision
ResNet-18 (``fc`` removed, the same initial weights) on the same images (Tiny-ImageNet's 10,000
validation JPEGs, 64 px, labels unused), with the same batch, iterations, crop size and dtype:

- **medp2x** through its real engine (``medp2x.engine.pretrain``) with the ``tiny`` recipe,
  overridden only in batch, crop size and schedule length (and no blur, see below);
- **lightly** in a plain PyTorch loop with lightly's own transforms, heads, losses and momentum
  utilities and the learning rates of its small-image benchmark
  (``benchmarks/parity_lightly.py`` names every choice).

Each pretraining runs in its own process (``benchmarks/parity_train.py``), which reports
images/s over its timed iterations and its peak RSS. Then every encoder (both implementations,
random inits of 3 seeds, a colour histogram) is scored by the same linear probe and kNN on
EuroSAT RGB, a labelled set never pretrained on, split once (stratified, seeded). BN statistics
of every network are re-averaged over the probe's training images first (PreciseBN): the issue
asks it for random inits, and one policy for every row keeps the comparison fair
(``--bn-stats saved`` keeps the pretrained encoders' own). Blur is off on both sides: at 32-64
px it erases the image, and both projects' small-image benchmarks drop it.

    python benchmarks/parity.py                                  # default budget, ~50 min (2-core CPU)
    python benchmarks/parity.py --budget long --methods simclr byol
    python benchmarks/parity.py --budget smoke                   # the plumbing, a few minutes

Ablations (docs/methods.md, "The long-budget SimCLR gap, traced to the views"):
``--implementations medp2x`` trains medp2x alone and ``--peer-csv`` joins lightly's rows of an
earlier run of the same settings; ``--medp2x-option`` overrides medp2x's recipe or views;
``--lightly-views medp2x`` feeds lightly's loop medp2x's batch augmentation.

Writes ``benchmarks/results/parity.{csv,md,png}`` (``parity_long.*`` and
``parity_long_curve.{png,csv}`` for ``--budget long``, ``parity_smoke.*`` for the smoke run) and
the run folders (encoders, loss curves, checkpoints) under ``benchmarks/results/runs/``.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import importlib.util
import json
import math
import os
import platform
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from methods_knn import method_options, standard_error
from monai.data import CacheDataset
from probe import Probe, score, split_probe
from torch import nn
from torch.utils.data import Subset

from medp2x import __version__ as MEDP2X_VERSION
from medp2x.baselines import build_baseline
from medp2x.data.folder import ImageFolderDataset
from medp2x.eval.encoders import resolve_encoder
from medp2x.eval.settings import EvalSettings
from medp2x.eval.splits import dataset_labels
from medp2x.methods import recipe_for
from medp2x.networks import build_encoder, strided_convs_on_one_pixel

HERE = Path(__file__).resolve().parent
SHARED = HERE.parent.parent / "shared" / "data"
IMPLEMENTATIONS = ("medp2x", "lightly")
# The issue's four, each written with lightly in parity_lightly.py (medp2x's DINO has no
# counterpart there; its evidence is tests/test_dino.py and docs/methods.md, DINO).
METHODS = ("simclr", "byol", "moco", "swav")
RANDOM_SEEDS = 3
LEARNING_MARGIN = 0.03  # the issue's bar: SimCLR and BYOL beat the best random init by 3 points
MUST_LEARN = ("simclr", "byol")
SOURCE_SIZE = 64  # medp2x crops from images of this side: Tiny-ImageNet's own, as lightly's


@dataclass(frozen=True)
class Budget:
    """Pretraining compute per run; ``iterations`` are whole passes over the 10,000 images at
    ``batch_size`` (156 iterations at batch 64), so both cosine schedules run to their end."""

    iterations: int
    batch_size: int
    crop_size: int
    curve_points: int = 0  # checkpoints on the accuracy-against-iterations curve (long)
    eval_per_class: int | None = None  # a stratified subset of the probe set (smoke only)


# Sized from the per-iteration CPU costs measured on the 2-core EPYC (docs/methods.md, "Parity
# with lightly"): the 8 runs cost ~4.5 CPU-s per iteration, so default (6 passes) is ~50 min in
# all and long (12 passes, 6 curve points) ~1 h 45 min on an idle machine.
BUDGETS = {
    "smoke": Budget(iterations=8, batch_size=16, crop_size=32, curve_points=2, eval_per_class=30),
    "default": Budget(iterations=936, batch_size=64, crop_size=32),
    "long": Budget(iterations=1872, batch_size=64, crop_size=32, curve_points=6),
}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--budget", choices=BUDGETS, default="default")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument(
        "--implementations",
        nargs="+",
        choices=IMPLEMENTATIONS,
        default=list(IMPLEMENTATIONS),
        help="train only these (e.g. medp2x ablations against a published lightly row)",
    )
    parser.add_argument("--iterations", type=int, help="override the budget's iterations")
    parser.add_argument("--batch-size", type=int, help="override the budget's batch")
    parser.add_argument("--crop-size", type=int, help="override the budget's crop size (px)")
    parser.add_argument("--curve-points", type=int, help="override the budget's curve points")
    parser.add_argument("--amp", action="store_true", help="bf16 autocast on both sides")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers, both sides")
    parser.add_argument(
        "--threads", type=int, help="torch threads of each training process (default: torch's)"
    )
    parser.add_argument("--seed", type=int, default=0, help="initial weights, data order, split")
    parser.add_argument(
        "--data", default=str(SHARED / "tiny_imagenet_val"), help="pretraining images"
    )
    parser.add_argument(
        "--eval-data", default=str(SHARED / "eurosat_rgb"), help="labelled probe set"
    )
    parser.add_argument("--eval-size", type=int, default=64, help="probe image size (px)")
    parser.add_argument("--test-fraction", type=float, default=0.5, help="probe test share")
    parser.add_argument(
        "--bn-stats",
        choices=("recomputed", "saved"),
        default="recomputed",
        help="pretrained encoders' BN statistics (random inits are always re-averaged)",
    )
    parser.add_argument(
        "--medp2x-option",
        action="append",
        default=[],
        metavar="[METHOD.]NAME=VALUE",
        help="medp2x recipe override, e.g. moco.symmetric=true (lightly's MoCo is symmetric); "
        "[METHOD.]view.NAME=VALUE sets an augmentation strength, e.g. simclr.view.hue=0.1",
    )
    parser.add_argument(
        "--peer-csv",
        nargs="+",
        default=[],
        metavar="CSV",
        help="with --implementations medp2x: lightly's rows from these earlier results of the "
        "same budget, seed and size (e.g. benchmarks/results/parity.csv; its *_curve.csv too)",
    )
    parser.add_argument(
        "--lightly-views",
        choices=("lightly", "medp2x"),
        default="lightly",
        help="lightly's side makes its views with lightly's transforms (default) or, as an "
        "ablation, with medp2x's batch augmentation (isolates the augmentation pipeline)",
    )
    parser.add_argument(
        "--reuse",
        action="store_true",
        help="keep finished runs whose settings match (re-evaluate without retraining)",
    )
    parser.add_argument("--out", default=str(HERE / "results"))
    return parser.parse_args()


# ------------------------------------------------------------------------------ settings


@dataclass(frozen=True)
class Settings:
    """Everything both implementations share, resolved from the budget and the overrides."""

    budget: str
    iterations: int
    schedule_iterations: int  # the cosine's span: whole passes over the data
    batch_size: int
    crop_size: int
    source_size: int
    small_size: int  # SwAV's small crops (medp2x's tiny recipe, both sides)
    n_small: int
    amp: bool
    workers: int
    threads: int | None
    seed: int
    curve_points: int
    images: int

    @property
    def dtype(self) -> str:
        return "bf16 autocast" if self.amp else "fp32"

    @property
    def checkpoint_every(self) -> int:
        return self.iterations // self.curve_points if self.curve_points else 0


def resolve_settings(args: argparse.Namespace) -> Settings:
    budget = BUDGETS[args.budget]
    images = len(ImageFolderDataset(args.data))
    batch = args.batch_size or budget.batch_size
    iterations = args.iterations or budget.iterations
    per_epoch = images // batch
    if per_epoch < 1:
        raise ValueError(f"{args.data}: {images} images, fewer than one batch of {batch}")
    crop = args.crop_size or budget.crop_size
    views = recipe_for("swav", "tiny", image_size=crop).views
    curve = budget.curve_points if args.curve_points is None else args.curve_points
    if curve and iterations % curve:
        raise ValueError(f"--iterations {iterations} is not a multiple of {curve} curve points")
    return Settings(
        budget=args.budget,
        iterations=iterations,
        schedule_iterations=math.ceil(iterations / per_epoch) * per_epoch,
        batch_size=batch,
        crop_size=crop,
        source_size=SOURCE_SIZE,
        small_size=bf16_safe_size(views.small_size) if args.amp else views.small_size,
        n_small=views.n_small,
        amp=args.amp,
        workers=args.workers,
        threads=args.threads,
        seed=args.seed,
        curve_points=curve,
        images=images,
    )


def bf16_safe_size(size: int) -> int:
    """The smallest crop >= ``size`` that medp2x's bf16 guard accepts on CPU (oneDNN's bf16
    weight gradient is wrong for strided convolutions of 1 x 1 maps): both sides use it."""
    if torch.cuda.is_available():
        return size
    encoder = build_encoder("resnet18")
    while strided_convs_on_one_pixel(encoder, size):
        size += 8
    return size


def native_bf16() -> bool:
    """Whether bf16 runs natively here (a GPU, or a CPU with AVX-512 BF16 / AMX)."""
    if torch.cuda.is_available():
        return True
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def machine() -> str:
    """CPU model (lscpu), cores, torch's CPU capability, GPU if any."""
    model = platform.processor() or "unknown CPU"
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
            if line.startswith("Model name:"):
                model = line.split(":", 1)[1].strip()
    except OSError:
        pass
    text = (
        f"{model}, {os.cpu_count()} cores, torch {torch.__version__} CPU capability "
        f"{torch.backends.cpu.get_cpu_capability()}, native bf16 {'yes' if native_bf16() else 'no'}"
    )
    if torch.cuda.is_available():
        text += f", GPU {torch.cuda.get_device_name(0)}"
    return text


# ------------------------------------------------------------------------------ pretraining


def run_spec(method: str, implementation: str, s: Settings, args: argparse.Namespace) -> dict:
    recipe_pairs = [o for o in args.medp2x_option if not is_view_option(o)]
    view_pairs = [o.replace("view.", "", 1) for o in args.medp2x_option if is_view_option(o)]
    options = method_options(method, recipe_pairs)
    view_options = method_options(method, view_pairs)
    if method == "swav" and s.amp:
        options["views"] = {**options.get("views", {}), "small_size": s.small_size}
    return {
        "implementation": implementation,
        "method": method,
        "data": str(Path(args.data).resolve()),
        "iterations": s.iterations,
        "schedule_iterations": s.schedule_iterations,
        "batch_size": s.batch_size,
        "crop_size": s.crop_size,
        "source_size": s.source_size,
        "small_size": s.small_size,
        "n_small": s.n_small if method == "swav" else 0,
        "seed": s.seed,
        "amp": s.amp,
        "workers": s.workers,
        "threads": s.threads,
        "checkpoint_every": s.checkpoint_every,
        "medp2x_options": options if implementation == "medp2x" else {},
        "medp2x_view_options": view_options if implementation == "medp2x" else {},
        "lightly_views": args.lightly_views if implementation == "lightly" else "lightly",
    }


def is_view_option(pair: str) -> bool:
    """``[METHOD.]view.NAME=VALUE`` sets an augmentation strength (``medp2x.views.ViewAugment``)
    rather than a recipe field."""
    name = pair.partition("=")[0].split(".")
    return len(name) > 1 and name[-2] == "view"


def pretrain_all(s: Settings, args: argparse.Namespace, runs_root: Path) -> dict:
    """Every (method, implementation) pretraining, each in a fresh process; returns their
    ``result.json`` contents keyed by (method, implementation)."""
    results = {}
    jobs = [(m, i) for m in args.methods for i in args.implementations]
    for n, (method, implementation) in enumerate(jobs, 1):
        run_dir = runs_root / f"{method}_{implementation}"
        spec = run_spec(method, implementation, s, args)
        done = run_dir / "result.json"
        if args.reuse and done.exists():
            previous = json.loads(done.read_text())
            if all(previous.get(k) == v for k, v in spec.items()):
                print(f"[{n}/{len(jobs)}] {method} / {implementation}: reusing {run_dir}")
                results[method, implementation] = previous
                continue
        shutil.rmtree(run_dir, ignore_errors=True)  # a fresh run: its time is what we report
        run_dir.mkdir(parents=True)
        (run_dir / "spec.json").write_text(json.dumps(spec, indent=2))
        print(
            f"[{n}/{len(jobs)}] pretraining {method} with {implementation}: {s.iterations} "
            f"iterations of batch {s.batch_size}, {s.crop_size} px, {s.dtype}",
            flush=True,
        )
        child = subprocess.run([sys.executable, str(HERE / "parity_train.py"), str(run_dir)])
        if child.returncode != 0:
            raise RuntimeError(
                f"{method} / {implementation} pretraining failed (exit {child.returncode}); "
                f"its output is above, its run folder {run_dir}"
            )
        results[method, implementation] = json.loads(done.read_text())
        r = results[method, implementation]
        print(
            f"    {r['img_per_s']:.1f} img/s, peak RSS {r['peak_rss_mb']:.0f} MB, "
            f"loss {r['loss_first']:.3f} -> {r['loss_end']:.3f}"
        )
    return results


# ------------------------------------------------------------------------------ evaluation


def probe_splits(args: argparse.Namespace, per_class: int | None) -> Probe:
    data = ImageFolderDataset(args.eval_data)  # resized to --eval-size by the probe's loader
    labels = dataset_labels(data)
    keep = np.arange(len(labels))
    if per_class:  # the smoke budget probes a stratified subset
        rng = np.random.default_rng(args.seed)
        by_class = [
            rng.permutation(np.flatnonzero(labels == c))[:per_class] for c in np.unique(labels)
        ]
        keep = np.sort(np.concatenate(by_class))
    cached = CacheDataset(Subset(data, keep.tolist()), transform=None, progress=False)
    probe = split_probe(cached, labels[keep], args.test_fraction, args.seed)
    probe.num_classes = int(labels.max()) + 1  # every class, even if a subset missed one
    return probe


class ScoreCache:
    """Scores already computed, in ``scores.json`` beside the run folders: a re-run with
    ``--reuse`` (one more method, a changed report) re-scores nothing it has scored. An entry
    is keyed by the probe's settings and by what was scored (an encoder file's path, size and
    modification time; a reference's name and seed)."""

    def __init__(self, path: Path, probe_key: dict):
        self.path = path
        self.probe_key = probe_key
        self.entries = json.loads(path.read_text()) if path.exists() else {}

    def score(self, what: dict, compute) -> dict:
        if "file" in what:
            stat = Path(what["file"]).stat()
            what = {**what, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
        key = json.dumps({**self.probe_key, **what}, sort_keys=True)
        if key not in self.entries and self.path.exists():  # scored meanwhile by another run?
            self.entries = json.loads(self.path.read_text())
        if key not in self.entries:
            scores = compute()
            # merged with what another run scored meanwhile (runs of other methods may share it)
            self.entries = json.loads(self.path.read_text()) if self.path.exists() else {}
            self.entries[key] = scores
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(self.entries, indent=1))
            tmp.replace(self.path)
        return self.entries[key]


def probe_key(args: argparse.Namespace, per_class: int | None) -> dict:
    """Everything that decides a probe's score besides the encoder."""
    return {
        "eval_data": str(Path(args.eval_data).resolve()),
        "eval_size": args.eval_size,
        "test_fraction": args.test_fraction,
        "split_seed": args.seed,
        "per_class": per_class,
        "medp2x": MEDP2X_VERSION,
    }


def load(path: str | Path) -> nn.Module:
    """A pretrained encoder file of either implementation (both train on ImageNet-normalised
    inputs; lightly's are plain torchvision state dicts, read with weights_only=True)."""
    return resolve_encoder(path, normalization="imagenet")


def evaluate_all(
    results: dict,
    s: Settings,
    probe: Probe,
    settings: EvalSettings,
    args: argparse.Namespace,
    cache: ScoreCache,
) -> list[dict]:
    rows = []
    recompute = args.bn_stats == "recomputed"
    for (method, implementation), r in results.items():
        print(f"evaluating {method} / {implementation}", flush=True)
        scores = cache.score(
            {"file": r["encoder"], "bn": args.bn_stats},
            lambda r=r: score(load(r["encoder"]), probe, settings, recompute_bn=recompute),
        )
        rows += table_rows(method, implementation, scores, s, r, args.bn_stats)
    for seed in range(args.seed, args.seed + RANDOM_SEEDS):
        print(f"evaluating random init (seed {seed})", flush=True)
        scores = cache.score(
            {"reference": "random_resnet18", "seed": seed},
            lambda seed=seed: score(
                resolve_encoder("random", "resnet18", seed=seed), probe, settings, True
            ),
        )
        rows += table_rows("random_init", "random", scores, s, None, "recomputed", seed)
    print("evaluating the colour histogram", flush=True)
    scores = cache.score(
        {"reference": "colour_histogram"},
        lambda: score(build_baseline("colour_histogram"), probe, settings, recompute_bn=False),
    )
    rows += table_rows("colour_histogram", "colour_histogram", scores, s, None, "none")
    return rows


def table_rows(
    method: str,
    implementation: str,
    scores: dict,
    s: Settings,
    run: dict | None,
    bn_stats: str,
    seed: int | None = None,
) -> list[dict]:
    """One CSV row per protocol; pretraining columns are empty for references."""
    run = run or {}
    common = {
        "budget": s.budget,
        "method": method,
        "implementation": implementation,
        "iterations": s.iterations if run else 0,
        "batch_size": s.batch_size,
        "crop_size": s.crop_size,
        "dtype": s.dtype,
        "img_per_s": run.get("img_per_s"),
        "img_per_s_median": run.get("img_per_s_median"),
        "peak_rss_mb": run.get("peak_rss_mb"),
        "pretrain_s": run.get("train_s"),
        "cpu_s_per_it": run.get("cpu_s_per_it"),
        "peak_lr": run.get("peak_lr"),
        "seed": seed if seed is not None else (s.seed if run else None),
        "bn_stats": bn_stats,
        "n_test": scores["n_test"],
        "loss_first": run.get("loss_first"),
        "loss_end": run.get("loss_end"),
        "spread": run.get("spread"),
        "prediction_entropy": run.get("prediction_entropy"),
        "rankme": scores["rankme"],
    }
    return [
        {
            **common,
            "protocol": protocol,
            "accuracy": scores[protocol],
            "se": standard_error(scores[protocol], scores["n_test"]),
        }
        for protocol in ("linear", "knn")
    ]


COLUMNS = (
    "budget method implementation protocol accuracy se iterations batch_size crop_size dtype "
    "img_per_s img_per_s_median cpu_s_per_it peak_rss_mb pretrain_s peak_lr seed bn_stats "
    "n_test loss_first loss_end spread prediction_entropy rankme"
).split()


def peer_rows(paths: list[str], s: Settings, methods: list[str], curve: bool) -> list[dict]:
    """lightly's rows for ``methods`` from earlier CSVs (``--peer-csv``), for medp2x-only
    re-runs: only rows of this budget, seed, batch, crop size and dtype are taken."""
    rows = []
    for path in paths:
        path = Path(path)
        if curve:
            path = path.with_name(f"{path.stem}_curve.csv")
            if not path.exists():
                continue
        with open(path, newline="") as f:
            for row in csv.DictReader(f):
                same = (
                    row["implementation"] == "lightly"
                    and row["method"] in methods
                    and row["budget"] == s.budget
                    and int(row["seed"]) == s.seed
                    and int(row["batch_size"]) == s.batch_size
                    and int(row["crop_size"]) == s.crop_size
                    and row["dtype"] == s.dtype
                )
                if same and (curve or int(row["iterations"]) == s.iterations):
                    cells = {k: parse_cell(v) for k, v in row.items()}
                    rows.append({**cells, "earlier_run": path.name})
    return rows


def parse_cell(value: str):
    """A CSV cell back to what ``table_rows`` wrote: int, float, None or text."""
    if value == "":
        return None
    for kind in (int, float):
        try:
            return kind(value)
        except ValueError:
            pass
    return value


# ------------------------------------------------------------------------------ verdicts


def find(rows: list[dict], **match) -> list[dict]:
    return [r for r in rows if all(r[k] == v for k, v in match.items())]


def parity_verdicts(rows: list[dict], methods: list[str]) -> list[dict]:
    """Per method: medp2x's linear accuracy minus lightly's, in standard errors of the
    difference (binomial s.e. of each, treated as independent: on shared test images the
    true s.e. is smaller), and the ratio of images/s (same batch, so of iterations/s), only
    when both were measured in this run (``--peer-csv`` rows were timed at another load)."""
    verdicts = []
    for method in methods:
        ours = find(rows, method=method, implementation="medp2x", protocol="linear")
        peer = find(rows, method=method, implementation="lightly", protocol="linear")
        if not ours or not peer:
            continue
        ours, peer = ours[0], peer[0]
        diff = ours["accuracy"] - peer["accuracy"]
        se = math.hypot(ours["se"], peer["se"])
        timed_together = "earlier_run" not in peer
        ratio = ours["img_per_s"] / peer["img_per_s"] if timed_together else None
        verdicts.append(
            {
                "method": method,
                "diff": diff,
                "se_diff": se,
                "accuracy_ok": diff >= -2 * se,
                "speed_ratio": ratio,
                "speed_ok": None if ratio is None else ratio >= 1.0,
            }
        )
    return verdicts


def learning_verdicts(rows: list[dict]) -> list[dict]:
    """Each pretrained encoder's linear accuracy above the best random init's."""
    best = max(r["accuracy"] for r in find(rows, implementation="random", protocol="linear"))
    out = []
    for r in rows:
        if r["protocol"] == "linear" and r["implementation"] in IMPLEMENTATIONS:
            margin = r["accuracy"] - best
            out.append({**r, "margin": margin, "learns": margin >= LEARNING_MARGIN})
    return out


# ------------------------------------------------------------------------------ report


def pct(x: float | None, digits: int = 1) -> str:
    return "" if x is None else f"{100 * x:.{digits}f}"


def num(x: float | None, digits: int = 2) -> str:
    return "" if x is None else f"{x:.{digits}f}"


def yes_no(ok: bool | None) -> str:
    return "not timed together" if ok is None else ("yes" if ok else "**no**")


def speed_verdict(v: dict) -> str:
    if v["speed_ok"] is None:
        return "speed not judged (lightly's images/s come from an earlier run; compare CPU s/it)"
    verdict = "PASS" if v["speed_ok"] else "FAIL"
    return f"speed {verdict} (medp2x {v['speed_ratio']:.2f}x lightly's images/s)"


def header(s: Settings, probe: Probe, args: argparse.Namespace) -> list[str]:
    swav = f", SwAV small crops {s.small_size} px" if "swav" in args.methods else ""
    bn = {
        "recomputed": "re-averaged over the probe-training images (PreciseBN) for every encoder",
        "saved": "as saved for pretrained encoders, re-averaged for random inits",
    }[args.bn_stats]
    options = "".join(f", medp2x {o}" for o in args.medp2x_option)
    if args.lightly_views != "lightly":
        options += f", lightly's views made by {args.lightly_views}'s augmentation"
    if args.peer_csv:
        options += (
            f"; lightly's rows read from {', '.join(Path(p).name for p in args.peer_csv)} "
            "(an earlier run at these settings: its images/s were measured then, at that load)"
        )
    return [
        f"# Parity with lightly: `{s.budget}` budget",
        "",
        f"- **Pretraining:** {s.iterations} iterations of batch {s.batch_size} "
        f"({s.iterations * s.batch_size / s.images:.2g} passes over {s.images} "
        f"{Path(args.data).name} images at {s.source_size} px), {s.crop_size} px crops{swav}, "
        f"{s.dtype}, cosine over {s.schedule_iterations} iterations, {s.workers} loader "
        f"workers, {s.threads or torch.get_num_threads()} torch threads, seed {s.seed}, torchvision ResNet-18 from the same initial weights{options}.",
        f"- **Probe:** {Path(args.eval_data).name}, never pretrained on: "
        f"{len(probe.fit)} training / {len(probe.val)} validation (L2 "
        f"strength) / {len(probe.test)} test images at {args.eval_size} px, stratified, "
        f"seed {args.seed}; BN statistics {bn}. Linear: logistic regression (L-BFGS) on "
        "standardised features; kNN: k = 20, cosine, T = 0.07. ± is the binomial s.e.",
        f"- **Machine:** {machine()}; {datetime.date.today().isoformat()}; medp2x "
        f"{MEDP2X_VERSION}, lightly {lightly_version()}.",
        "",
    ]


def lightly_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("lightly")
    except PackageNotFoundError:
        return "not installed"


def report(rows: list[dict], s: Settings, probe: Probe, args: argparse.Namespace) -> str:
    lines = header(s, probe, args)
    verdicts = parity_verdicts(rows, args.methods)
    lines += [
        "| method | linear, medp2x | linear, lightly | medp2x − lightly (pt) | ≥ −2 s.e. | "
        "kNN, medp2x | kNN, lightly | img/s, medp2x | img/s, lightly | speed ratio | "
        "not slower | CPU s/it, medp2x / lightly | peak RSS MB, medp2x / lightly |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for v in verdicts:
        m = {impl: find(rows, method=v["method"], implementation=impl) for impl in IMPLEMENTATIONS}
        lin = {i: find(m[i], protocol="linear")[0] for i in IMPLEMENTATIONS}
        knn = {i: find(m[i], protocol="knn")[0] for i in IMPLEMENTATIONS}
        lines.append(
            f"| {v['method']} | {pct(lin['medp2x']['accuracy'])} ± {pct(lin['medp2x']['se'])} "
            f"| {pct(lin['lightly']['accuracy'])} ± {pct(lin['lightly']['se'])} "
            f"| {100 * v['diff']:+.1f} ± {100 * v['se_diff']:.1f} "
            f"| {'yes' if v['accuracy_ok'] else '**no**'} "
            f"| {pct(knn['medp2x']['accuracy'])} ± {pct(knn['medp2x']['se'])} "
            f"| {pct(knn['lightly']['accuracy'])} ± {pct(knn['lightly']['se'])} "
            f"| {num(lin['medp2x']['img_per_s'], 1)} | {num(lin['lightly']['img_per_s'], 1)} "
            f"| {num(v['speed_ratio'])} | {yes_no(v['speed_ok'])} "
            f"| {num(lin['medp2x']['cpu_s_per_it'])} / {num(lin['lightly']['cpu_s_per_it'])} "
            f"| {num(lin['medp2x']['peak_rss_mb'], 0)} / {num(lin['lightly']['peak_rss_mb'], 0)} |"
        )
    lines += ["", "References (no pretraining):", ""]
    lines += ["| encoder | linear | kNN | feature rank (RankMe) |", "|---|---|---|---|"]
    for name, impl in (("random init", "random"), ("colour histogram", "colour_histogram")):
        for r in find(rows, implementation=impl, protocol="linear"):
            k = find(rows, implementation=impl, protocol="knn", seed=r["seed"])[0]
            label = f"{name} (seed {r['seed']})" if impl == "random" else name
            lines.append(
                f"| {label} | {pct(r['accuracy'])} ± {pct(r['se'])} "
                f"| {pct(k['accuracy'])} ± {pct(k['se'])} | {num(r['rankme'], 1)} |"
            )
    learning = learning_verdicts(rows)
    bar = s.budget == "long"
    lines += [
        "",
        "Learning: linear accuracy above the best random init (BN re-averaged); the bar "
        f"(≥ {100 * LEARNING_MARGIN:.0f} points for SimCLR and BYOL) applies to the long budget. "
        "Loss: first iteration → mean of the last tenth; spread: projector outputs' spread "
        "(1 = spread over the sphere, 0 = collapsed); SwAV entropy: its predictions' entropy / "
        "ln K (1 = uniform, nothing learnt).",
        "",
        "| method | implementation | linear | vs best random (pt) | learns (≥ 3 pt) | loss "
        "| spread | SwAV entropy | RankMe | pretraining (s) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in learning:
        needed = bar and r["method"] in MUST_LEARN
        verdict = "yes" if r["learns"] else ("**no**" if needed else "no")
        lines.append(
            f"| {r['method']} | {r['implementation']} | {pct(r['accuracy'])} ± {pct(r['se'])} "
            f"| {100 * r['margin']:+.1f} | {verdict} "
            f"| {num(r['loss_first'], 3)} → {num(r['loss_end'], 3)} | {num(r['spread'])} "
            f"| {num(r['prediction_entropy'], 3)} | {num(r['rankme'], 1)} "
            f"| {num(r['pretrain_s'], 0)} |"
        )
    lines += ["", "Verdicts:", ""]
    for v in verdicts:
        lines.append(
            f"- {v['method']}: accuracy parity {'PASS' if v['accuracy_ok'] else 'FAIL'} "
            f"({100 * v['diff']:+.1f} ± {100 * v['se_diff']:.1f} pt), {speed_verdict(v)}"
        )
    if bar:
        for r in learning:
            if r["method"] in MUST_LEARN and r["implementation"] == "medp2x":
                lines.append(
                    f"- {r['method']} learns (medp2x, ≥ {100 * LEARNING_MARGIN:.0f} pt above "
                    f"the best random init): {'PASS' if r['learns'] else 'FAIL'} "
                    f"({100 * r['margin']:+.1f} pt)"
                )
    return "\n".join(lines) + "\n"


def write_csv(rows: list[dict], path: Path) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def plot_bars(rows: list[dict], methods: list[str], path: Path, title: str) -> None:
    """Accuracy per method and implementation (one s.e. bars), over the band the random inits
    span, with the colour histogram as a dashed line; linear probe and kNN side by side."""
    from medp2x.plots import plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), dpi=120, sharey=True)
    x = np.arange(len(methods))
    for ax, protocol in zip(axes, ("linear", "knn"), strict=True):
        randoms = [
            100 * r["accuracy"] for r in find(rows, implementation="random", protocol=protocol)
        ]
        ax.axhspan(min(randoms), max(randoms), color="grey", alpha=0.25, label="random inits")
        hist = find(rows, implementation="colour_histogram", protocol=protocol)
        if hist:
            ax.axhline(100 * hist[0]["accuracy"], color="tan", ls="--", label="colour histogram")
        for k, impl in enumerate(IMPLEMENTATIONS):
            picked = [find(rows, method=m, implementation=impl, protocol=protocol) for m in methods]
            values = [100 * p[0]["accuracy"] if p else np.nan for p in picked]
            errors = [100 * p[0]["se"] if p else 0 for p in picked]
            bars = ax.bar(x + (k - 0.5) * 0.38, values, 0.38, yerr=errors, label=impl, capsize=3)
            ax.bar_label(bars, fmt="%.1f", label_type="center", color="white", fontsize=7)
        ax.set_xticks(x, methods)
        ax.set_title(f"{'linear probe' if protocol == 'linear' else 'kNN'}", fontsize=9)
    axes[0].set_ylabel("test accuracy (%)")
    axes[1].legend(loc="lower right", fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# ------------------------------------------------------------------------------ curve (long)


def curve_rows(
    results: dict,
    s: Settings,
    probe: Probe,
    settings: EvalSettings,
    bn_stats: str,
    cache: ScoreCache,
) -> list[dict]:
    """Linear-probe (and kNN) accuracy of the checkpoints on the curve's grid, both sides."""
    rows = []
    for (method, implementation), r in results.items():
        saved = {int(it): path for it, path in r["checkpoints"].items()}  # JSON keys are text
        grid = {it: path for it, path in saved.items() if it % s.checkpoint_every == 0}
        grid[s.iterations] = r["encoder"]  # the end of the run: its encoder file
        for iteration, path in sorted(grid.items()):
            print(f"curve: {method} / {implementation} at iteration {iteration}", flush=True)
            scores = cache.score(
                {"file": path, "bn": bn_stats},
                lambda path=path: score(load(path), probe, settings, bn_stats == "recomputed"),
            )
            for row in table_rows(method, implementation, scores, s, r, bn_stats):
                rows.append({**row, "iterations": iteration})
    return rows


def plot_curve(curve: list[dict], rows: list[dict], path: Path, title: str) -> None:
    from medp2x.plots import plt

    fig, ax = plt.subplots(figsize=(8.0, 4.0), dpi=120)
    randoms = [100 * r["accuracy"] for r in find(rows, implementation="random", protocol="linear")]
    ax.axhspan(min(randoms), max(randoms), color="grey", alpha=0.25, label="random inits")
    methods = list(dict.fromkeys(r["method"] for r in curve))
    for c, method in enumerate(methods):
        for impl, style in (("medp2x", "-"), ("lightly", "--")):
            points = find(curve, method=method, implementation=impl, protocol="linear")
            if points:
                xs = [p["iterations"] for p in points]
                ys = [100 * p["accuracy"] for p in points]
                ax.plot(xs, ys, style, marker="o", color=f"C{c}", label=f"{method}, {impl}")
    ax.set_xlabel("pretraining iteration")
    ax.set_ylabel("linear-probe accuracy (%)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # outside the lines
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# ------------------------------------------------------------------------------ main


def main() -> None:
    args = parse_args()
    for path in (args.data, args.eval_data):
        if not Path(path).is_dir():
            raise SystemExit(f"parity: data folder {path} not found (see --data / --eval-data)")
    if importlib.util.find_spec("lightly") is None:
        raise SystemExit("parity: lightly is not installed: pip install -e '.[bench]'")
    if args.amp and not native_bf16():
        print("WARNING: --amp on a CPU without native bf16: autocast is emulated and slow")
    s = resolve_settings(args)
    out = Path(args.out)
    stem = "parity" if s.budget == "default" else f"parity_{s.budget}"
    runs_root = out / "runs" / stem
    results = pretrain_all(s, args, runs_root)

    per_class = BUDGETS[s.budget].eval_per_class
    probe = probe_splits(args, per_class)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    settings = EvalSettings(image_size=args.eval_size, device=device, progress=False)
    cache = ScoreCache(out / "runs" / "scores.json", probe_key(args, per_class))
    rows = evaluate_all(results, s, probe, settings, args, cache)
    rows += peer_rows(args.peer_csv, s, args.methods, curve=False)
    text = report(rows, s, probe, args)
    print(text)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.md").write_text(text)
    write_csv(rows, out / f"{stem}.csv")
    title = f"{s.iterations} it of batch {s.batch_size}, {s.crop_size} px, {s.dtype}"
    plot_bars(rows, args.methods, out / f"{stem}.png", f"EuroSAT probe after pretraining: {title}")
    if s.curve_points:
        curve = curve_rows(results, s, probe, settings, args.bn_stats, cache)
        curve += peer_rows(args.peer_csv, s, args.methods, curve=True)
        write_csv(curve, out / f"{stem}_curve.csv")
        plot_curve(curve, rows, out / f"{stem}_curve.png", f"EuroSAT linear probe: {title}")


if __name__ == "__main__":
    main()
