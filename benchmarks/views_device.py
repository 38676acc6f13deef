"""Batch augmentation on the training device vs per-sample torchvision transforms in workers.

Both paths read the same images and produce the same method's views (same recipe, crop
scales, kernel size). Reference: the originals' way, a ``torchvision.transforms.v2`` pipeline
per image and view inside DataLoader workers. Batch: workers only decode, collate uint8 and
``medp2x.views.BatchAugment`` makes all views of the batch at once on ``--device``.
Reported: source images per second, and the ratio batch / reference measured in the same run.

    python benchmarks/views_device.py                       # 64 px tiny-imagenet, SimCLR
    python benchmarks/views_device.py --method swav --source-size 256 --size 224 --small-size 96 \\
        --in-memory --batch 64 --batches 4
"""

from __future__ import annotations

import argparse
import gc
import json
import resource
import statistics
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
import torchvision.transforms.v2 as T
import torchvision.transforms.v2.functional as TF
from torch.utils.data import DataLoader, Dataset
from torchvision.io import ImageReadMode, decode_image, read_file

from medp2x.methods import METHODS, recipe_for
from medp2x.views import ViewAugment, blur_kernel_size, build_views

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "tiny_imagenet_val"


class Spec:
    """The ViewSpec fields build_views reads (kept local so the benchmark stands alone)."""

    def __init__(self, method: str, size: int, small_size: int, n_small: int | None):
        recipe = recipe_for(method, "full").views
        self.n_large, self.large_size, self.small_size = 2, size, small_size
        self.n_small = n_small if n_small is not None else (6 if method == "swav" else 0)
        self.large_scale, self.small_scale = recipe.large_scale, recipe.small_scale


def torchvision_view(aug: ViewAugment, size: int, scale: tuple[float, float]) -> T.Compose:
    """The same view recipe as a per-image torchvision pipeline (uint8 ops, float at the end)."""
    ops = [
        T.RandomResizedCrop(size, scale=scale, antialias=True),
        T.RandomHorizontalFlip(aug.flip_p),
        T.RandomApply(
            [T.ColorJitter(aug.brightness, aug.contrast, aug.saturation, aug.hue)], p=aug.jitter_p
        ),
        T.RandomGrayscale(aug.gray_p),
        T.RandomApply([T.GaussianBlur(blur_kernel_size(size), aug.blur_sigma)], p=aug.blur_p),
    ]
    if aug.solarize_p > 0:
        ops.append(T.RandomSolarize(int(aug.solarize_threshold * 255), p=aug.solarize_p))
    return T.Compose([*ops, T.ToDtype(torch.float32, scale=True)])


class Images(Dataset):
    """uint8 RGB images from files or from a preloaded tensor, optionally resized."""

    def __init__(self, files: list[Path], source_size: int | None, preload: bool):
        self.files, self.source_size = files, source_size
        self.memory = torch.stack([self.read(i) for i in range(len(files))]) if preload else None

    def read(self, i: int) -> torch.Tensor:
        img = decode_image(read_file(str(self.files[i])), mode=ImageReadMode.RGB)
        if self.source_size:
            img = TF.resize(img, [self.source_size, self.source_size], antialias=True)
        return img

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.memory[i] if self.memory is not None else self.read(i)


class PerSampleViews(Dataset):
    def __init__(self, images: Images, pipelines: list[T.Compose]):
        self.images, self.pipelines = images, pipelines

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> list[torch.Tensor]:
        img = self.images[i]
        return [p(img) for p in self.pipelines]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _cpu_seconds() -> float:
    """CPU time of this process (all threads) and of its finished children (the workers)."""
    me, kids = (
        resource.getrusage(resource.RUSAGE_SELF),
        resource.getrusage(resource.RUSAGE_CHILDREN),
    )
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def measure(batches: Iterable, step: Callable, device: torch.device) -> tuple[float, float]:
    """(images per wall second after a warm-up batch, images per CPU second over the whole
    pass, workers included). The iterable yields exactly the measured images, so workers
    prefetch nothing that is not timed, and they have exited (rusage counted) at the end."""
    cpu0, n, start = _cpu_seconds(), 0, None
    for batch in batches:
        step(batch)
        size = (batch[0] if isinstance(batch, list) else batch).shape[0]
        if start is None:
            _sync(device)
            start, total = time.perf_counter(), size
            n = 0
        else:
            n, total = n + size, total + size
    _sync(device)
    wall = time.perf_counter() - start
    gc.collect()  # let the loader iterator shut its workers down (joins: rusage counts them)
    return n / wall, total / (_cpu_seconds() - cpu0)


def _median(pairs: list[tuple[float, float]], k: int) -> float:
    return statistics.median(p[k] for p in pairs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--method", default="simclr", choices=sorted(METHODS))
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--small-size", type=int, default=32)
    ap.add_argument("--n-small", type=int, default=None)
    ap.add_argument("--source-size", type=int, default=None, help="resize sources (e.g. 256)")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--batches", type=int, default=6, help="timed batches (after one warm-up)")
    ap.add_argument("--repeats", type=int, default=3, help="alternating rounds; medians reported")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--in-memory", action="store_true", help="decode once: time augmentation only")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (main)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    if args.threads:  # OpenMP barriers thrash when the cores are shared with workers/others
        torch.set_num_threads(args.threads)
    if not args.data.is_dir():
        raise SystemExit(f"{args.data}: no such image folder (see ../shared/data/README.md)")
    files = sorted(p for p in args.data.rglob("*") if p.suffix.lower() in {".jpeg", ".jpg", ".png"})
    needed = args.batch * (args.batches + 1)
    if len(files) < needed:
        raise SystemExit(f"{args.data}: {len(files)} images, need {needed} (batch x (batches + 1))")
    files = files[:: len(files) // needed][:needed]  # spread over the classes
    device = torch.device(args.device)
    spec = Spec(args.method, args.size, args.small_size, args.n_small)
    images = Images(files, args.source_size, preload=args.in_memory)
    augment = build_views(args.method, "rgb", spec, device)
    pipelines = [
        torchvision_view(aug, size, scale)
        for aug, size, scale in zip(augment.views, augment.sizes, augment.scales, strict=True)
    ]
    loader_args = dict(
        batch_size=args.batch, shuffle=True, num_workers=args.workers, drop_last=True,
        pin_memory=device.type == "cuda",
    )  # fmt: skip

    def reference():
        loader = DataLoader(PerSampleViews(images, pipelines), **loader_args)
        return measure(loader, lambda views: [v.to(device) for v in views], device)

    def batched():
        if args.in_memory:  # nothing left for workers to do: slice the preloaded tensor
            perm = torch.randperm(needed)
            loader = (images.memory[perm[i : i + args.batch]] for i in range(0, needed, args.batch))
        else:
            loader = DataLoader(images, **loader_args)
        return measure(loader, augment, device)

    ref, ours = [], []
    for _ in range(args.repeats):
        ref.append(reference())
        ours.append(batched())
    result = {
        "method": args.method,
        "views": [f"{s}px" for s in augment.sizes],
        "source": f"{args.source_size or 'native'} px, {'in memory' if args.in_memory else 'JPEG decode'}",
        "batch": args.batch,
        "workers": args.workers,
        "device": str(device) if device.type != "cuda" else torch.cuda.get_device_name(device),
        "cpu_threads": torch.get_num_threads(),
        "per_sample_torchvision_img_s": round(_median(ref, 0), 1),
        "batch_on_device_img_s": round(_median(ours, 0), 1),
        "ratio_img_s": round(_median(ours, 0) / _median(ref, 0), 2),
        "per_sample_torchvision_img_per_cpu_s": round(_median(ref, 1), 1),
        "batch_on_device_img_per_cpu_s": round(_median(ours, 1), 1),
        "ratio_img_per_cpu_s": round(_median(ours, 1) / _median(ref, 1), 2),
        "rounds_img_s": {
            "reference": [round(r[0]) for r in ref],
            "batch": [round(o[0]) for o in ours],
        },
    }
    print(json.dumps(result, indent=1))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
