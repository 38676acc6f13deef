"""P2X leg of the parity benchmark (issue #14, item 7): which weight surgery lets a short
second stage keep, and add to, what the first stage learnt?

First stage: the shared SimCLR ResNet-18 (``../shared/models/stage1_resnet18_simclr64.pth``,
64 px inputs, ImageNet mean/std). Second stage: the project's tiny SimCLR recipe
(``medp2x.engine.pretrain`` with ``ssl_checkpoint``) on the training half of EuroSAT RGB
(labels unused), once per variant: weight scaling ``per_layer`` / ``per_filter`` / ``none`` at
the recipe's learning rate, and ``per_layer`` / ``per_filter`` "gentle" (a one-pass linear
warm-up and a tenth of the peak lr); ``none, gentle`` and ``per_filter, lr/10`` (no warm-up)
on request (``--variants``). docs/surgery.md reads the results.

Every encoder is scored by the parity benchmark's probe: one stratified 50/50 split of
EuroSAT RGB (seed 0), the test half never pretrained on; a linear probe
(``medp2x.eval.protocols.linear.linear_probe`` on frozen features, L2 strength chosen on a stratified 10%
of the training half) and kNN (k = 20, cosine); accuracy +- binomial standard error. Both with
BN statistics as saved and re-averaged over the probe's training images (PreciseBN), since surgery
rewrites the running statistics and a second stage moves them. Random inits (BN re-averaged)
are the floor.

Per variant the table also shows what the surgery does before any step: the mean filter
norm it leaves, and the effective learning-rate factor it implies. A conv followed by BN is
invariant to the scale of each filter, so a step's relative size is lr / ||w||^2: dividing a
filter by sqrt(s) multiplies its effective learning rate by s.

    python benchmarks/p2x_surgery.py [--epochs 8] [--train-size 32] [--seeds 1] [--variants ...]

Writes ``benchmarks/results/p2x_surgery.{csv,md,png}``; the runs (loss curves, surgery
reports) go to ``benchmarks/results/runs/p2x_surgery/``.
"""

from __future__ import annotations

import argparse
import copy
import csv
import math
import platform
import shlex
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from probe import Probe, split_probe
from probe import score as probe_score
from torch import nn
from torch.utils.data import Dataset

from medp2x.checkpoints import load_encoder
from medp2x.data.folder import ImageFolderDataset
from medp2x.engine import PretrainConfig, pretrain, read_loss_log
from medp2x.eval.encoders import load_encoder_file, resolve_encoder
from medp2x.eval.settings import EvalSettings
from medp2x.eval.splits import dataset_labels
from medp2x.methods import recipe_for
from medp2x.networks import IMAGENET_MEAN, IMAGENET_STD, NormalizedEncoder
from medp2x.surgery import apply_surgery, conv_weights, filter_norms

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
FIRST_STAGE = "first stage (no second stage)"
BN_STATS = ("saved", "recomputed")


# ----------------------------------------------------------------------------- the variants
@dataclass(frozen=True)
class Variant:
    """One second stage: the surgery, and how hard the optimiser pushes afterwards."""

    name: str
    scale: str
    filters: str = "copy"
    lr_factor: float = 1.0  # peak lr as a fraction of the tiny recipe's (batch-scaled) peak
    warmup_epochs: float = 0.0  # linear warm-up; the tiny recipe has none


VARIANTS = (
    Variant("per_layer", "per_layer"),
    Variant("per_filter", "per_filter"),
    Variant("none", "none"),
    Variant("per_layer, gentle", "per_layer", lr_factor=0.1, warmup_epochs=1),
    Variant("per_filter, gentle", "per_filter", lr_factor=0.1, warmup_epochs=1),
    Variant("none, gentle", "none", lr_factor=0.1, warmup_epochs=1),
    Variant("per_filter, lr/10", "per_filter", lr_factor=0.1),  # what a bundle's --lr alone does
)
OPTIONAL = ("none, gentle", "per_filter, lr/10")  # on request (--variants): CPU budget


# ----------------------------------------------------------------------------- the probe
class DecodedOnce(Dataset):
    """The folder's samples decoded once (each JPEG would otherwise be decoded on every pass).
    It keeps the folder's ``items`` (file, label), so the engine's seen-files record can name
    the files each run read, and evaluations can check that none was a test image."""

    def __init__(self, folder: ImageFolderDataset):
        self.items = folder.items
        self.samples = [folder[i] for i in range(len(folder))]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict:
        return self.samples[index]


def probe_splits(data: Dataset, labels: np.ndarray, seed: int = 0) -> Probe:
    """The parity benchmark's probe: a stratified 50/50 split, then 10% of the training half
    to choose the L2 strength. The second stages pretrain on the whole training half
    (``probe.pretraining``), so the test half is never seen."""
    return split_probe(data, labels, test_fraction=0.5, seed=seed)


def score(encoder: nn.Module, probe: Probe, settings: EvalSettings, bn_stats: str) -> dict:
    """Linear-probe and kNN test accuracy, BN statistics as saved or re-averaged."""
    scores = probe_score(encoder, probe, settings, recompute_bn=bn_stats == "recomputed")
    return {"linear": scores["linear"], "knn": scores["knn"]}


def standard_error(accuracy: float, n: int) -> float:
    return math.sqrt(accuracy * (1.0 - accuracy) / n)


# ----------------------------------------------------------------------------- what surgery does
def surgery_effect(first_stage: nn.Module, variant: Variant, seed: int) -> tuple[dict, nn.Module]:
    """The surgery's immediate effect on a copy of the first stage, and that copy (the second
    stage's starting weights: surgery is seeded, so the run starts from exactly these).

    ``effective_lr_factor`` is ``variant.lr_factor`` times the mean over filters of (||w|| before /
    ||w|| after)^2: each conv filter feeds its own BN channel, so it is scale-invariant and its
    step relative to its norm grows as 1 / ||w||^2. Replaced (dead) filters are left out.
    """
    encoder = copy.deepcopy(first_stage)
    before = {k: filter_norms(w) for k, w in conv_weights(encoder).items()}
    report = apply_surgery(encoder, scale=variant.scale, filters=variant.filters, seed=seed)
    after = {k: filter_norms(w) for k, w in conv_weights(encoder).items()}
    replaced = {c.layer: set(c.dead) for c in report.changes if c.replaced}
    ratios, norms_before, norms_after = [], [], []
    for layer, norm in before.items():
        keep = [i for i in range(len(norm)) if i not in replaced.get(layer, ())]
        ratios.append((norm[keep] / after[layer][keep]) ** 2)
        norms_before.append(norm[keep])
        norms_after.append(after[layer][keep])
    scales = [c.scale for c in report.changes if c.scale is not None]
    effect = {
        "mean_filter_norm_before": float(torch.cat(norms_before).mean()),
        "mean_filter_norm_after": float(torch.cat(norms_after).mean()),
        "frac_filters_above_1_after": float((torch.cat(norms_after) > 1).double().mean()),
        "largest_s": max(scales) if scales else 1.0,
        "effective_lr_factor": variant.lr_factor * float(torch.cat(ratios).mean()),
        "replaced_filters": sum(c.replaced for c in report.changes),
    }
    return effect, encoder


def relative_weight_change(start: nn.Module, end: nn.Module) -> float:
    """Mean over conv layers of ||w_end - w_start|| / ||w_start||: how far the second stage
    moved the weights, relative to where surgery left them."""
    a, b = conv_weights(start), conv_weights(end)
    if a.keys() != b.keys():
        raise ValueError("the trained encoder's conv layers differ from the first stage's")
    return float(np.mean([float((b[k] - a[k]).norm() / a[k].norm()) for k in a]))


# ----------------------------------------------------------------------------- second stages
def second_stage(variant: Variant, train, out: Path, args: argparse.Namespace, seed: int) -> dict:
    """One fresh run of the tiny SimCLR recipe from the first stage; a previous run of the
    same name is deleted, since its time is what this benchmark reports."""
    recipe = recipe_for("simclr", "tiny", batch_size=args.batch_size)
    peak_lr = recipe.lr(args.batch_size) * variant.lr_factor
    steps = len(train) // args.batch_size
    run_dir = out / "runs" / "p2x_surgery" / f"{variant.name.replace(', ', '_')}_seed{seed}"
    shutil.rmtree(run_dir, ignore_errors=True)
    started, cpu = time.perf_counter(), time.process_time()
    summary = pretrain(
        PretrainConfig(
            dataset=train,
            output_dir=run_dir,
            method="simclr",
            profile="tiny",
            arch="resnet18",
            image_size=args.train_size,
            source_size=args.image_size,
            batch_size=args.batch_size,
            epochs=args.epochs,
            max_iterations=args.epochs * steps,
            lr=peak_lr,
            ssl_checkpoint=args.first_stage,
            scale=variant.scale,
            filters=variant.filters,
            normalization="imagenet",
            amp=False,
            seed=seed,
            progress=False,
            method_options={"warmup_epochs": variant.warmup_epochs},
            view_options={"blur_p": 0.0},  # at 32-64 px blur erases the image (methods_knn)
        )
    )
    seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - cpu
    losses = read_loss_log(run_dir)
    return {
        "summary": summary,
        "peak_lr": peak_lr,
        "warmup_iterations": round(variant.warmup_epochs * steps),
        "seconds": seconds,
        "cpu_seconds": cpu_seconds,
        "img_per_s": summary.iterations * args.batch_size / seconds,
        "loss_first_epoch": float(np.mean(losses[:steps])) if losses else math.nan,
        "loss_last_epoch": float(np.mean(losses[-steps:])) if losses else math.nan,
    }


def encoder_name(variant: Variant, seed: int, seeds: int) -> str:
    return f"P2X {variant.name}" + (f" (seed {seed})" if seeds > 1 else "")


# ----------------------------------------------------------------------------- report
def cpu_model() -> str:
    """The CPU's model name, and whether it has native bf16 (this run is fp32 either way)."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or "unknown CPU"
    model = next(
        (ln.split(":", 1)[1].strip() for ln in info.splitlines() if ln.startswith("model name")),
        platform.processor() or "unknown CPU",
    )
    flags = [f for f in ("avx512_bf16", "amx_bf16") if f" {f}" in info]
    return f"{model} ({', '.join(flags) if flags else 'no native bf16'})"


def _pct(value: float | None, se: float | None = None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    return f"{100 * value:.1f}" + ("" if se is None else f" ± {100 * se:.1f}")


def markdown(records: list[dict], header: str, n_test: int) -> str:
    """One line per encoder: the four accuracies, then what the surgery and the run did."""
    lines = [
        header,
        "",
        "| encoder | peak lr | warm-up (it) | mean filter norm after surgery | effective lr × "
        "| linear, BN saved | kNN, BN saved | linear, BN re-averaged | kNN, BN re-averaged "
        "| conv weights moved | loss 1st → last epoch | time (s, wall / CPU) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in records:
        acc = [r.get(f"{p}_{b}") for b in ("saved", "recomputed") for p in ("linear", "knn")]
        cells = [_pct(a, None if a is None else standard_error(a, n_test)) for a in acc]
        norm = r.get("mean_filter_norm_after")
        lines.append(
            f"| {r['encoder']} | {_num(r.get('peak_lr'), '.4g')} "
            f"| {_num(r.get('warmup_iterations'), 'd')} "
            f"| {'' if norm is None else f'{norm:.2f}'} "
            f"| {_num(r.get('effective_lr_factor'), '.2f')} | {' | '.join(cells)} "
            f"| {_num(r.get('weight_change'), '.2f')} "
            f"| {_losses(r)} | {_times(r)} |"
        )
    return "\n".join(lines)


def _num(value, fmt: str) -> str:
    return "" if value is None else format(value, fmt)


def _times(r: dict) -> str:
    if r.get("seconds") is None:
        return ""
    return f"{r['seconds']:.0f} / {r['cpu_seconds']:.0f}"


def _losses(r: dict) -> str:
    if r.get("loss_first_epoch") is None:
        return ""
    return f"{r['loss_first_epoch']:.2f} → {r['loss_last_epoch']:.2f}"


def short_label(encoder: str) -> str:
    """A bar's label on two short lines."""
    label = "first stage" if encoder == FIRST_STAGE else encoder.removeprefix("P2X ")
    return label.replace(", ", ",\n").replace(" (", "\n(")


def plot(records: list[dict], path: Path, title: str, n_test: int) -> None:
    """Linear and kNN accuracy (BN re-averaged) per encoder, +- 1 s.e., the first stage's
    values as dashed lines: a bar below its line lost first-stage features."""
    from medp2x.plots import plt

    shown = [r for r in records if r.get("linear_recomputed") is not None]
    names = [short_label(r["encoder"]) for r in shown]
    x = np.arange(len(shown))
    fig, ax = plt.subplots(figsize=(max(6.4, 0.9 * len(shown)), 4.0), dpi=120)
    for offset, protocol, colour in ((-0.2, "linear", "C0"), (0.2, "knn", "C1")):
        values = np.array([100 * r[f"{protocol}_recomputed"] for r in shown])
        errors = [100 * standard_error(v / 100, n_test) for v in values]
        ax.bar(x + offset, values, 0.4, yerr=errors, color=colour, label=protocol)
        first = next(r for r in shown if r["encoder"] == FIRST_STAGE)
        ax.axhline(100 * first[f"{protocol}_recomputed"], color=colour, ls="--", lw=0.8)
    ax.set_xticks(x, names, fontsize=7)
    ax.set_ylabel("EuroSAT test-half accuracy (%)")
    low = min(100 * r[f"{p}_recomputed"] for r in shown for p in ("linear", "knn"))
    high = max(100 * r[f"{p}_recomputed"] for r in shown for p in ("linear", "knn"))
    ax.set_ylim(max(0.0, low - 10), min(100.0, high + 8))
    ax.set_title(title, fontsize=8)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


CSV_FIELDS = (
    "encoder", "variant", "seed", "scale", "filters", "peak_lr", "warmup_iterations",
    "iterations", "protocol", "bn_stats", "accuracy", "se", "n_test",
    "mean_filter_norm_before", "mean_filter_norm_after", "frac_filters_above_1_after",
    "largest_s", "effective_lr_factor", "weight_change", "loss_first_epoch",
    "loss_last_epoch", "seconds", "cpu_seconds", "img_per_s",
)  # fmt: skip


def csv_rows(records: list[dict], n_test: int) -> list[dict]:
    """Long form: one row per encoder x protocol x BN choice (accuracy as a fraction)."""
    rows = []
    for r in records:
        for bn_stats in ("saved", "recomputed"):
            for protocol in ("linear", "knn"):
                acc = r.get(f"{protocol}_{bn_stats}")
                if acc is None:
                    continue
                row = {k: r.get(k, "") for k in CSV_FIELDS}
                row.update(protocol=protocol, bn_stats=bn_stats, accuracy=acc, n_test=n_test)
                row["se"] = standard_error(acc, n_test)
                rows.append(row)
    return rows


# ----------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", default=str(SHARED / "data" / "eurosat_rgb"))
    parser.add_argument(
        "--first-stage", default=str(SHARED / "models" / "stage1_resnet18_simclr64.pth")
    )
    parser.add_argument(
        "--variants",
        nargs="+",
        default=[v.name for v in VARIANTS if v.name not in OPTIONAL],
        choices=[v.name for v in VARIANTS],
        metavar="NAME",
        help=f"second stages to run, of: {'; '.join(v.name for v in VARIANTS)} (default: all "
        f"but {'; '.join(OPTIONAL)}, to fit the CPU budget)",
    )
    parser.add_argument("--epochs", type=int, default=8, help="passes over the training half")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--image-size", type=int, default=64, help="evaluation and source size")
    parser.add_argument("--train-size", type=int, default=32, help="pretraining crop size")
    parser.add_argument("--seeds", type=int, default=1, help="second-stage seeds per variant")
    parser.add_argument("--random-seeds", type=int, default=1, help="random-init references")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    parser.add_argument("--threads", type=int, default=2)
    return parser.parse_args(argv)


def check_inputs(args: argparse.Namespace) -> None:
    for what, path in (("--data", args.data), ("--first-stage", args.first_stage)):
        if not Path(path).exists():
            sys.exit(f"{what} {path} does not exist (the shared sample data sits beside the repo)")


def first_stage_encoder(path: str) -> nn.Module:
    """The plain torchvision state dict of the first stage (it carries no normalisation)."""
    encoder, _ = load_encoder(path, arch="resnet18")
    return encoder


def run_second_stages(first: nn.Module, probe: Probe, out: Path, args) -> tuple[list, dict]:
    """Each variant's surgery effect and second stage: (records, {name: trained encoder})."""
    records, trained = [], {}
    for variant in (v for v in VARIANTS if v.name in args.variants):
        for seed in range(args.seeds):
            name = encoder_name(variant, seed, args.seeds)
            effect, start = surgery_effect(first, variant, seed)
            record = {"encoder": name, "variant": variant.name, "seed": seed, **effect}
            record.update(scale=variant.scale, filters=variant.filters)
            records.append(record)
            norm, lr = effect["mean_filter_norm_after"], effect["effective_lr_factor"]
            print(f"{name}: surgery leaves mean filter norm {norm:.2f}, effective lr x{lr:.2f}")
            try:
                run = second_stage(variant, probe.pretraining, out, args, seed)
            except FloatingPointError as err:  # a diverged run is a result, not a crash
                print(f"{name}: diverged ({err})")
                record["iterations"] = "diverged"
                continue
            summary = run.pop("summary")
            end, _ = load_encoder_file(summary.encoder_path)
            record.update(run, iterations=summary.iterations)
            record["weight_change"] = relative_weight_change(start, end)
            trained[name] = resolve_encoder(summary.encoder_path)
            first_loss, last_loss = run["loss_first_epoch"], run["loss_last_epoch"]
            print(
                f"{name}: {summary.iterations} iterations in {run['seconds']:.0f} s, loss "
                f"{first_loss:.3f} -> {last_loss:.3f}"
            )
    return records, trained


def score_all(records: list[dict], encoders: dict, randoms: dict, probe: Probe, args) -> None:
    """Both BN choices for every pretrained encoder; random inits with BN re-averaged only
    (their saved statistics are a fresh layer's 0 and 1, not a measurement)."""
    settings = EvalSettings(image_size=args.image_size, progress=False)
    by_name = {r["encoder"]: r for r in records}
    for name, encoder in {**encoders, **randoms}.items():
        record = by_name.get(name)
        if record is None:
            record = {"encoder": name, "variant": "random init"}
            records.append(record)
        for bn_stats in BN_STATS if name in encoders else ("recomputed",):
            for protocol, acc in score(encoder, probe, settings, bn_stats).items():
                record[f"{protocol}_{bn_stats}"] = acc
        print(f"{name}: scored")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    check_inputs(args)
    torch.set_num_threads(args.threads)
    wall, cpu, load_start = time.perf_counter(), time.process_time(), _load_average()
    data = ImageFolderDataset(args.data, image_size=args.image_size)
    labels = dataset_labels(data)
    probe = probe_splits(DecodedOnce(data), labels)
    n_test, out = len(probe.test), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    first = first_stage_encoder(args.first_stage)
    records, trained = run_second_stages(first, probe, out, args)
    records.insert(0, {"encoder": FIRST_STAGE, "variant": "first stage", "iterations": 0})
    encoders = {FIRST_STAGE: NormalizedEncoder(first, IMAGENET_MEAN, IMAGENET_STD), **trained}
    randoms = {
        f"random init (seed {s})": resolve_encoder("random", "resnet18", seed=s)
        for s in range(args.random_seeds)
    }
    score_all(records, encoders, randoms, probe, args)

    command = shlex.join(
        ["python", "benchmarks/p2x_surgery.py", *(sys.argv[1:] if argv is None else argv)]
    )
    timing = (
        f"whole run {(time.perf_counter() - wall) / 60:.1f} min wall-clock, "
        f"{(time.process_time() - cpu) / 60:.1f} CPU-min (load average {load_start} at the "
        f"start, {_load_average()} at the end; above {args.threads}, other jobs shared the CPU)"
    )
    text = markdown(records, header(args, len(probe.pretraining), n_test, command, timing), n_test)
    print(text)
    (out / "p2x_surgery.md").write_text(text + "\n")
    with open(out / "p2x_surgery.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(CSV_FIELDS))
        writer.writeheader()
        writer.writerows(csv_rows(records, n_test))
    title = (
        f"P2X from the SimCLR ResNet-18 on EuroSAT, {args.epochs} epochs, "
        f"{args.train_size} px crops; BN re-averaged; dashed: first stage"
    )
    plot(records, out / "p2x_surgery.png", title, n_test)


def header(args, n_pretrain: int, n_test: int, command: str, timing: str) -> str:
    return (
        f"P2X surgery benchmark: first stage `{Path(args.first_stage).name}` (SimCLR ResNet-18, "
        f"64 px); second stage: tiny SimCLR recipe, {args.epochs} epochs over the EuroSAT RGB "
        f"training half ({n_pretrain} images, labels unused), batch {args.batch_size}, "
        f"{args.train_size} px crops of the {args.image_size} px images, fp32, "
        f"{args.seeds} seed(s) per variant, filters `copy` (the first stage has no dead "
        f"filters, so `copy` replaces none). Probe (as benchmarks/parity.py): stratified 50/50 "
        f"split (seed 0), {n_test} test images never pretrained on; linear probe (L2 chosen on "
        f"10% of the training half) and kNN (k=20, cosine) on frozen features; accuracy % ± "
        f"binomial s.e. Effective lr ×: peak lr relative to the recipe's times the mean over "
        f"filters of (norm before / norm after surgery)². Conv weights moved: mean over layers "
        f"of ‖w_end − w_start‖ / ‖w_start‖.\n\n"
        f"Command: `{command}`. CPU: {cpu_model()}, {args.threads} threads, torch "
        f"{torch.__version__}; {timing}."
    )


def _load_average() -> str:
    try:
        return f"{Path('/proc/loadavg').read_text().split()[0]}"
    except OSError:
        return "n/a"


if __name__ == "__main__":
    sys.stdout.reconfigure(line_buffering=True)  # progress lines reach a log file as they happen
    main()
