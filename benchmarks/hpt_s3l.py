"""HPT and S3L at CPU scale (issue #20): does the direction of one claim of each paper hold?

- HPT (Reed et al.): starting the target pretraining from a base model converges faster than
  pretraining on the target alone, and tuning only the BatchNorm layers in the target stage is
  often enough. Arms, MoCo v2 (HPT's method, the tiny recipe) on EuroSAT RGB: *base -> target*
  (from the shared SimCLR ResNet-18, ``../shared/models/stage1_resnet18_simclr64.pth``, all
  parameters), *base -> target, BN-only* (``trainable: bn``), and *target alone* (random init).
- S3L (Cao & Wu): pretraining at a small resolution gives a higher accuracy per unit of compute
  than at full resolution. Arms, MoCo v2 from a random init: *64 px* crops (the images' own
  size; the HPT arm *target alone*), *32 px* crops, and *32 -> 64 px* (S3L's multi-resolution
  schedule: the last fifth of the iterations at 64 px, ``resolution_schedule``).

Every arm is a ``medp2x.chain.ChainJob`` (one stage), checkpointed every ``--every``
iterations; each checkpoint is scored by the parity benchmark's probe (``benchmarks/probe.py``:
a linear probe with its L2 strength chosen on a validation slice, and kNN) at 64 px, on a
stratified probe subset of EuroSAT whose test half no run pretrained on (the runs pretrain on
every other EuroSAT image, labels unused). CPU-seconds are the pretraining process's own CPU
time up to each checkpoint (``time.process_time``, scoring excluded).

    python benchmarks/hpt_s3l.py [--seeds 1] [--iterations 100] [--low-res-iterations 200]

Writes ``benchmarks/results/hpt_s3l.{md,csv,png}``; the runs go to
``benchmarks/results/runs/hpt_s3l/`` (git-ignored).
"""

from __future__ import annotations

import argparse
import csv
import math
import shlex
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from ignite.engine import Events
from p2x_surgery import DecodedOnce, _load_average, cpu_model, standard_error
from probe import score as probe_score
from probe import split_probe
from torch.utils.data import Subset

from medp2x.chain import ChainJob, Stage
from medp2x.data.folder import ImageFolderDataset
from medp2x.data.split import stratified_split
from medp2x.eval.encoders import resolve_encoder
from medp2x.eval.settings import EvalSettings
from medp2x.eval.splits import dataset_labels

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
PROBE_FRACTION = 0.3  # of EuroSAT, stratified: the probe's images (half of them its test split)


@dataclass(frozen=True)
class Arm:
    name: str
    claim: str  # "HPT", "S3L" or "both"
    from_base: bool = False
    trainable: str = "all"
    crop: int = 64
    low_res: bool = False  # runs --low-res-iterations
    switch_to: int | None = None  # resolution schedule: the last fifth at this size


ARMS = (
    Arm("base -> target", "HPT", from_base=True),
    Arm("base -> target, BN-only", "HPT", from_base=True, trainable="bn"),
    Arm("target alone, 64 px", "both"),
    Arm("target alone, 32 px", "S3L", crop=32, low_res=True),
    Arm("target alone, 32 -> 64 px", "S3L", crop=32, low_res=True, switch_to=64),
)


class CpuClock:
    """The process's CPU time at every ``every``-th iteration (and at the end)."""

    def __init__(self, every: int):
        self.every, self.start, self.times = every, time.process_time(), {0: 0.0}

    def attach(self, engine) -> None:
        @engine.on(Events.ITERATION_COMPLETED(every=self.every) | Events.COMPLETED)
        def tick(e):
            self.times[e.state.iteration] = time.process_time() - self.start


# ----------------------------------------------------------------------------- data
def splits(args):
    """(pretraining set, probe): the probe is a stratified PROBE_FRACTION of EuroSAT split
    50/50 (its fit part 10 % validation); the runs pretrain on everything but its test half."""
    folder = ImageFolderDataset(args.data, image_size=64)
    data = DecodedOnce(folder)
    labels = dataset_labels(folder)
    _, chosen = stratified_split(labels, PROBE_FRACTION, seed=0)
    probe = split_probe(Subset(data, chosen.tolist()), labels[chosen], test_fraction=0.5, seed=0)
    test = {chosen[i] for i in probe.test.indices}
    pretraining = Subset(data, [i for i in range(len(data)) if i not in test])
    return pretraining, probe


# ----------------------------------------------------------------------------- runs
def run_arm(arm: Arm, seed: int, pretraining, args) -> tuple[Path, dict[int, float]]:
    iterations = args.low_res_iterations if arm.low_res else args.iterations
    schedule = None
    if arm.switch_to:
        schedule = [[0, arm.crop], [round(0.8 * iterations), arm.switch_to]]
    folder = Path(args.out) / "runs" / "hpt_s3l" / f"{slug(arm.name)}_seed{seed}"
    shutil.rmtree(folder, ignore_errors=True)  # its time is what this benchmark reports
    every = max(1, args.every * iterations // args.iterations)  # as many scores per arm
    clock = CpuClock(every)
    job = ChainJob(
        name=arm.name,
        output_dir=str(folder),
        stages=[
            Stage(
                "target",
                dataset=pretraining,
                init="previous" if arm.from_base else "random",
                epochs=1,  # of `iterations` steps: the cosine schedule ends with the run
                epoch_length=iterations * args.batch_size,
                batch_size=args.batch_size,
                image_size=arm.crop,
                trainable=arm.trainable,
                resolution_schedule=schedule,
                view_options={"blur_p": 0.0},  # at 32-64 px blur erases the image (methods_knn)
            )
        ],
        base_checkpoint=args.base if arm.from_base else None,
        method="moco",
        arch="resnet18",
        normalization="imagenet",  # the base's; random inits get the same
        amp=False,
        seed=seed,
        checkpoint_every=every,
        keep_checkpoints=0,
        progress=False,
        extra_handlers=[clock],
    )
    job.run()
    return folder / "0_target", clock.times


def slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name).strip("_").replace("__", "_")


def score_run(folder: Path, times: dict[int, float], probe, settings) -> list[dict]:
    rows = []
    for it in sorted(times):
        if it == 0:
            continue
        path = folder / "checkpoints" / f"checkpoint_{it}.pt"
        encoder = resolve_encoder(str(path))
        rows.append({"iteration": it, "cpu_seconds": times[it], **score(encoder, probe, settings)})
    return rows


def score(encoder, probe, settings) -> dict:
    s = probe_score(encoder, probe, settings, recompute_bn=False)
    return {"linear": s["linear"], "knn": s["knn"], "n_test": s["n_test"]}


# ----------------------------------------------------------------------------- summary
def mean_se(values: list[float]) -> tuple[float, float]:
    """Mean over seeds and its standard error (nan with one seed)."""
    arr = np.asarray(values, dtype=float)
    se = float(arr.std(ddof=1) / math.sqrt(len(arr))) if len(arr) > 1 else math.nan
    return float(arr.mean()), se


def curves(rows: list[dict]) -> dict[str, list[dict]]:
    """Per arm and iteration: mean linear/kNN accuracy, seed s.e., binomial s.e., CPU-s."""
    out: dict[str, list[dict]] = {}
    for arm in dict.fromkeys(r["arm"] for r in rows):
        points = []
        for it in sorted({r["iteration"] for r in rows if r["arm"] == arm}):
            at = [r for r in rows if r["arm"] == arm and r["iteration"] == it]
            point = {"iteration": it, "n_seeds": len(at)}
            for key in ("linear", "knn", "cpu_seconds"):
                point[key], point[f"{key}_seed_se"] = mean_se([r[key] for r in at])
            n = at[0]["n_test"]
            point["linear_binomial_se"] = standard_error(point["linear"], n)
            points.append(point)
        out[arm] = points
    return out


def first_reaching(points: list[dict], target: float) -> int | None:
    """The first trained checkpoint (iteration > 0) at or above ``target``."""
    return next((p["iteration"] for p in points if p["iteration"] and p["linear"] >= target), None)


def verdicts(c: dict[str, list[dict]]) -> list[str]:
    alone, base = c["target alone, 64 px"], c["base -> target"]
    bn = c["base -> target, BN-only"]
    goal = alone[-1]["linear"]
    reach_alone = first_reaching(alone, goal)  # trained checkpoints: not the random init
    reach_base = 0 if base[0]["linear"] >= goal else first_reaching(base, goal)
    if reach_base is None:
        outcome = "never: the direction does not reproduce"
    elif reach_alone is None or reach_base < reach_alone:
        outcome = "sooner: the direction reproduces"
    else:
        outcome = "not sooner: the direction does not reproduce"
    gain = base[-1]["linear"] - base[0]["linear"]
    lines = [
        f"- **HPT, convergence**: target alone ends at {100 * goal:.1f} % (linear), first reached "
        f"at iteration {reach_alone}; base -> target is at or above it from iteration "
        f"{reach_base} ({outcome}; the base itself scores {100 * base[0]['linear']:.1f} %, a "
        f"random init {100 * alone[0]['linear']:.1f} %). The target stage moves the base by "
        f"{100 * gain:+.1f} points (s.e. {100 * math.hypot(*map(_combined_se, (base[0], base[-1]))):.1f})."
    ]
    full, only = base[-1], bn[-1]
    gap = only["linear"] - full["linear"]
    noise = math.hypot(_combined_se(full), _combined_se(only))
    lines.append(
        f"- **HPT, BN-only**: after {full['iteration']} iterations BN-only "
        f"{100 * only['linear']:.1f} % vs all parameters {100 * full['linear']:.1f} % "
        f"(difference {100 * gap:+.1f} points, s.e. of the difference {100 * noise:.1f}): "
        + ("within 2 s.e. (matches within noise)." if abs(gap) <= 2 * noise else "outside 2 s.e.")
    )
    budget, reference = alone[-1]["cpu_seconds"], alone[-1]["linear"]
    for name in ("target alone, 32 px", "target alone, 32 -> 64 px"):
        within = [p for p in c[name] if p["iteration"] and p["cpu_seconds"] <= budget]
        if not within:
            lines.append(f"- **S3L, {name}**: no checkpoint within {budget:.0f} CPU-s")
            continue
        last = within[-1]  # the last checkpoint the 64 px run's CPU time would have paid for
        gap = last["linear"] - reference
        noise = math.hypot(_combined_se(last), _combined_se(alone[-1]))
        verdict = (
            "higher beyond 2 s.e.: the direction reproduces"
            if gap > 2 * noise
            else "higher, within noise (2 s.e.)"
            if gap > 0
            else "not higher: does not reproduce"
        )
        lines.append(
            f"- **S3L, {name.removeprefix('target alone, ')}**: at iteration "
            f"{last['iteration']} ({last['cpu_seconds']:.0f} CPU-s, within the 64 px run's "
            f"{budget:.0f}) {100 * last['linear']:.1f} % vs 64 px {100 * reference:.1f} % "
            f"({100 * gap:+.1f} points, s.e. {100 * noise:.1f}): {verdict}."
        )
    return lines


def markdown(c: dict[str, list[dict]], header: str) -> str:
    lines = [
        header,
        "",
        "| arm | iteration | CPU-s | linear % (± seed s.e.; ± binomial s.e.) | kNN % (± seed s.e.) |",
        "|---|---|---|---|---|",
    ]
    for arm, points in c.items():
        for p in points:
            lines.append(
                f"| {arm} | {p['iteration']} | {p['cpu_seconds']:.0f} "
                f"| {_pct(p['linear'], p['linear_seed_se'])}; ± {100 * p['linear_binomial_se']:.1f} "
                f"| {_pct(p['knn'], p['knn_seed_se'])} |"
            )
    lines += ["", "Verdicts:", "", *verdicts(c)]
    return "\n".join(lines)


def _pct(value: float, se: float) -> str:
    return f"{100 * value:.1f}" + ("" if math.isnan(se) else f" ± {100 * se:.1f}")


def plot(c: dict[str, list[dict]], path: Path) -> None:
    from medp2x.plots import plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2), dpi=120)
    for arm, points in c.items():
        x = [p["iteration"] for p in points]
        y = [100 * p["linear"] for p in points]
        err = [100 * _combined_se(p) for p in points]
        if arm.startswith(("base", "target alone, 64")):
            left.errorbar(x, y, yerr=err, marker="o", capsize=3, label=arm)
        if not arm.startswith("base"):
            cpu = [p["cpu_seconds"] for p in points]
            right.errorbar(cpu, y, yerr=err, marker="o", capsize=3, label=arm)
    left.set(xlabel="target-stage iteration", ylabel="EuroSAT probe test accuracy, linear (%)",
             title="HPT: base -> target vs target alone (MoCo v2)")  # fmt: skip
    right.set(xlabel="pretraining CPU-seconds", ylabel="EuroSAT probe test accuracy, linear (%)",
              title="S3L: crop resolution, from random init (MoCo v2)")  # fmt: skip
    for ax in (left, right):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _combined_se(p: dict) -> float:
    seed = p["linear_seed_se"]
    return p["linear_binomial_se"] if math.isnan(seed) else max(seed, p["linear_binomial_se"])


# ----------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", default=str(SHARED / "data" / "eurosat_rgb"))
    parser.add_argument("--base", default=str(SHARED / "models" / "stage1_resnet18_simclr64.pth"))
    parser.add_argument("--iterations", type=int, default=100, help="64 px arms")
    parser.add_argument("--low-res-iterations", type=int, default=200, help="32 px arms")
    parser.add_argument("--every", type=int, default=25, help="checkpoint (and score) interval")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    for what, path in (("--data", args.data), ("--base", args.base)):
        if not Path(path).exists():
            sys.exit(f"{what} {path} does not exist (the shared sample data sits beside the repo)")
    torch.set_num_threads(args.threads)
    wall, cpu, load_start = time.perf_counter(), time.process_time(), _load_average()
    pretraining, probe = splits(args)
    settings = EvalSettings(image_size=64, batch_size=128, progress=False)
    base_scores = score(resolve_encoder(args.base, normalization="imagenet"), probe, settings)
    rows = []
    for seed in range(args.seeds):
        random_scores = score(resolve_encoder("random", seed=seed), probe, settings)
        for arm in ARMS:
            print(f"[{arm.name}, seed {seed}] pretraining", flush=True)
            folder, times = run_arm(arm, seed, pretraining, args)
            start = base_scores if arm.from_base else random_scores
            rows.append({"arm": arm.name, "seed": seed, "iteration": 0, "cpu_seconds": 0.0,
                         **start})  # fmt: skip
            for row in score_run(folder, times, probe, settings):
                rows.append({"arm": arm.name, "seed": seed, **row})
            print(f"[{arm.name}, seed {seed}] last: {rows[-1]}", flush=True)
    out = Path(args.out)
    write_csv(rows, out / "hpt_s3l.csv")
    c = curves(rows)
    command = shlex.join(
        ["python", "benchmarks/hpt_s3l.py", *(sys.argv[1:] if argv is None else argv)]
    )
    timing = (
        f"whole run {(time.perf_counter() - wall) / 60:.1f} min wall-clock, "
        f"{(time.process_time() - cpu) / 60:.1f} CPU-min (load average {load_start} at the "
        f"start, {_load_average()} at the end; other jobs shared the 2 cores)"
    )
    text = markdown(c, header(args, len(pretraining), probe, command, timing))
    print(text)
    (out / "hpt_s3l.md").write_text(text + "\n")
    plot(c, out / "hpt_s3l.png")


def header(args, n_pretrain: int, probe, command: str, timing: str) -> str:
    return (
        f"HPT / S3L at CPU scale: MoCo v2 (tiny recipe: batch {args.batch_size}, SGD, queue "
        f"1024, m 0.99), ResNet-18, EuroSAT RGB 64 px; {n_pretrain} pretraining images (labels "
        f"unused; the probe's test half excluded); {args.iterations} iterations at 64 px, "
        f"{args.low_res_iterations} at 32 px; {args.seeds} seed(s). Base: "
        f"`{Path(args.base).name}` (SimCLR ResNet-18, 64 px, natural images). Probe "
        f"(benchmarks/probe.py) at 64 px: {len(probe.fit)} fit / {len(probe.val)} val / "
        f"{len(probe.test)} test images; linear (L2 chosen on val) and kNN (k 20). Iteration 0 "
        f"is the starting encoder (the base, or a random init of the seed).\n\n"
        f"Command: `{command}`. CPU: {cpu_model()}, {args.threads} thread(s), torch "
        f"{torch.__version__}; {timing}."
    )


def write_csv(rows: list[dict], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fields = ["arm", "seed", "iteration", "cpu_seconds", "linear", "knn", "n_test"]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows({k: r[k] for k in fields} for r in rows)


if __name__ == "__main__":
    sys.stdout.reconfigure(line_buffering=True)
    main()
