"""One pretraining of the parity benchmark, in a process of its own so that its peak memory is
its own: ``python benchmarks/parity_train.py RUN_DIR`` reads ``RUN_DIR/spec.json`` (written by
``benchmarks/parity.py``), trains with medp2x's engine or with lightly, and writes
``RUN_DIR/result.json``: images/s over the timed iterations, peak RSS, loss and collapse
diagnostics, the encoder and checkpoint files.

CPU time, the same for both: a thread samples this process's CPU clock, so the CPU seconds
between the same two iteration stamps are known too, plus the DataLoader workers' share (their
total, reaped at the end, times the timed fraction of the iterations). On a shared machine
that cost moves far less than wall time does; on an idle 2-core machine wall time is about
CPU time / 2.

Timing, the same for both: the completion time of every iteration is recorded (medp2x: the
wall time its engine stamps on each iteration's TensorBoard scalars; lightly: the loop's
clock); the first ``WARMUP_ITERATIONS`` and everything before them (imports, model and loader
start-up) are left out, and images/s = batch x timed iterations / their wall time. Data
loading is inside the timed window for both.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import math
import os
import resource
import statistics
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch

PROCESS_START = time.time()
WARMUP_ITERATIONS = 3


class CpuClock:
    """(wall time, process CPU time) every ``period`` seconds, from a daemon thread."""

    def __init__(self, period: float = 0.05):
        self.samples = [(time.time(), time.process_time())]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, args=(period,), daemon=True)
        self._thread.start()

    def _sample(self, period: float) -> None:
        while not self._stop.wait(period):
            self.samples.append((time.time(), time.process_time()))

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        self.samples.append((time.time(), time.process_time()))

    def cpu_between(self, start: float, end: float) -> float:
        walls, cpus = zip(*self.samples, strict=True)
        return float(np.interp(end, walls, cpus) - np.interp(start, walls, cpus))


def cpu_cost(clock: CpuClock, times: list[float]) -> dict:
    """CPU seconds per timed iteration: this process over the timed window, plus the
    workers' proportional share (``gc`` first, so that finished loaders reap their workers)."""
    gc.collect()
    clock.stop()
    warmup = min(WARMUP_ITERATIONS, max(len(times) - 2, 0))
    start, end = times[max(warmup - 1, 0)], times[-1]
    steps = len(times) - max(warmup, 1)
    main = clock.cpu_between(start, end)
    finished = os.times()
    workers = (finished.children_user + finished.children_system) * steps / len(times)
    return {
        "cpu_s_per_it": (main + workers) / steps,
        "main_cpu_s_per_it": main / steps,
        "worker_cpu_s_per_it": workers / steps,
    }


def peak_rss_mb() -> float:
    """VmHWM of this process (the training process; DataLoader workers are not counted, for
    either implementation), from /proc, else getrusage."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def throughput(times: list[float], batch_size: int) -> dict:
    """images/s over the iterations after the warm-up: the mean (batch x iterations / wall
    time) and the median-step rate (robust to a stall on a shared machine)."""
    warmup = min(WARMUP_ITERATIONS, max(len(times) - 2, 0))
    window = times[max(warmup - 1, 0) :]
    steps = [b - a for a, b in zip(window[:-1], window[1:], strict=True)]
    if not steps or window[-1] <= window[0]:
        raise ValueError(f"too few iterations ({len(times)}) to time after {warmup} warm-up ones")
    return {
        "timed_iterations": len(steps),
        "img_per_s": batch_size * len(steps) / (window[-1] - window[0]),
        "img_per_s_median": batch_size / statistics.median(steps),
    }


def tail_mean(values: list[float]) -> float | None:
    """Mean over the last tenth of the run (the window of medp2x's collapse monitor)."""
    values = [v for v in values if v is not None and math.isfinite(v)]
    tail = values[-max(1, len(values) // 10) :]
    return sum(tail) / len(tail) if tail else None


def train_medp2x(spec: dict, out: Path) -> dict:
    """medp2x's real engine with the tiny recipe, overridden only in batch, crop size,
    schedule length and blur (``spec`` comes from parity.py)."""
    from medp2x.data.folder import ImageFolderDataset
    from medp2x.engine import PretrainConfig, pretrain

    data = ImageFolderDataset(spec["data"])
    per_epoch = len(data) // spec["batch_size"]
    config = dict(
        dataset=data,
        output_dir=out,
        method=spec["method"],
        profile="tiny",
        arch="resnet18",
        image_size=spec["crop_size"],
        source_size=spec["source_size"],
        batch_size=spec["batch_size"],
        epochs=spec["schedule_iterations"] // per_epoch,
        max_iterations=spec["iterations"],
        normalization="imagenet",
        seed=spec["seed"],
        amp=spec["amp"],
        num_workers=spec["workers"],
        checkpoint_every=spec["checkpoint_every"],
        n_saved=None if spec["checkpoint_every"] else 2,
        method_options=spec["medp2x_options"],
        view_options={"blur_p": 0.0, **spec.get("medp2x_view_options", {})},
    )
    if "epoch_length" in {f.name for f in dataclasses.fields(PretrainConfig)}:
        config["epoch_length"] = per_epoch * spec["batch_size"]  # one pass, as lightly's epochs
    summary = pretrain(PretrainConfig(**config))
    scalars = tensorboard_scalars(out / "tb")
    times = [wall for wall, _ in scalars["train/loss"]]
    checkpoints = {
        int(p.stem.rsplit("_", 1)[-1]): str(p) for p in (out / "checkpoints").glob("*.pt")
    }
    return {
        "peak_lr": max(v for _, v in scalars["train/lr"]),
        "iteration_times": times,
        "first_iteration_time": times[0],
        "epochs": summary.epochs,
        "losses": [v for _, v in scalars["train/loss"]],
        "spread": tail_mean([v for _, v in scalars.get("train/spread", [])]),
        "prediction_entropy": tail_mean(
            [v for _, v in scalars.get("train/prediction_entropy", [])]
        ),
        "encoder": str(summary.encoder_path),
        "checkpoints": checkpoints,
    }


def tensorboard_scalars(log_dir: Path) -> dict[str, list[tuple[float, float]]]:
    """Every (wall time, value) of every scalar tag, in step order (no reservoir sampling)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    events.Reload()
    return {
        tag: [(e.wall_time, e.value) for e in sorted(events.Scalars(tag), key=lambda e: e.step)]
        for tag in events.Tags()["scalars"]
    }


def train_lightly(spec: dict, out: Path) -> dict:
    from parity_lightly import train

    run = train(
        method=spec["method"],
        data=spec["data"],
        out=out,
        iterations=spec["iterations"],
        schedule_iterations=spec["schedule_iterations"],
        batch_size=spec["batch_size"],
        crop_size=spec["crop_size"],
        small_size=spec["small_size"],
        n_small=spec["n_small"],
        seed=spec["seed"],
        amp=spec["amp"],
        workers=spec["workers"],
        checkpoint_every=spec["checkpoint_every"],
        views=spec.get("lightly_views", "lightly"),
    )
    logs = run["diagnostics"]
    checkpoints = {
        int(p.stem.rsplit("_", 1)[-1]): str(p) for p in (out / "checkpoints").glob("*.pt")
    }
    return {
        "peak_lr": run["peak_lr"],
        "iteration_times": run["iteration_times"],
        "first_iteration_time": run["iteration_times"][0],
        "epochs": run["epochs"],
        "losses": [d["loss"] for d in logs],
        "spread": tail_mean([d.get("spread") for d in logs]),
        "prediction_entropy": tail_mean([d.get("prediction_entropy") for d in logs]),
        "encoder": str(out / "encoder.pt"),
        "checkpoints": checkpoints,
    }


def main() -> None:
    out = Path(sys.argv[1])
    spec = json.loads((out / "spec.json").read_text())
    trainer = train_medp2x if spec["implementation"] == "medp2x" else train_lightly
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    clock = CpuClock()
    run = trainer(spec, out)
    losses, times = run.pop("losses"), run.pop("iteration_times")
    first_done = run.pop("first_iteration_time")
    result = {
        **spec,
        **run,
        **throughput(times, spec["batch_size"]),
        **cpu_cost(clock, times),
        "iterations_done": len(times),
        "startup_s": first_done - PROCESS_START,
        "train_s": times[-1] - times[0],
        "peak_rss_mb": peak_rss_mb(),
        "loss_first": losses[0],
        "loss_end": tail_mean(losses),  # mean over the last tenth
    }
    result["torch_threads"] = torch.get_num_threads()
    if torch.cuda.is_available():
        result["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
    (out / "result.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
