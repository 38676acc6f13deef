"""Tile throughput: WSITileDataset vs a plain OpenSlide read_region loop vs MONAI PatchWSIDataset.

All three read the same tiles (the dataset's tissue tiles of one slide, level 0), in one
process, each pass from a freshly opened slide so no reader starts with a warm tile cache.
The plain loop does the least work that still yields pixels (``read_region`` + ``np.asarray``:
RGBA uint8); WSITileDataset also converts to float32 3 x H x W in [0, 1]; MONAI's dataset
gives a MetaTensor. Before timing, one tile from each reader is checked to hold the same
pixels, so the readers provably read the same regions.

    python benchmarks/wsi_throughput.py [--slide PATH] [--tile-size 256] [--repeats 15]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import openslide
import torch

from medp2x.data.wsi import WSITileDataset

DEFAULT_SLIDE = (
    Path(__file__).resolve().parents[2]
    / "shared"
    / "data"
    / "wsi_samples"
    / "CMU-1-Small-Region.svs"
)


def plain_loop(slide_path: Path, xy: np.ndarray, size: int):
    def run() -> int:
        slide = openslide.OpenSlide(str(slide_path))  # opening is timed, as in the others
        for x, y in xy:
            np.asarray(slide.read_region((int(x), int(y)), 0, (size, size)))
        slide.close()
        return len(xy)

    return run


def plain_float_loop(slide_path: Path, xy: np.ndarray, size: int):
    """The same loop ending in the float32 C x H x W tensor a model needs (the usual idiom)."""

    def run() -> int:
        slide = openslide.OpenSlide(str(slide_path))
        for x, y in xy:
            region = slide.read_region((int(x), int(y)), 0, (size, size)).convert("RGB")
            torch.from_numpy(np.asarray(region)).permute(2, 0, 1).float() / 255
        slide.close()
        return len(xy)

    return run


def medp2x_loop(slide_path: Path, size: int, min_tissue: float, cache_dir: str):
    # Built from the cached index (a second run); the slide opens lazily on the first tile.
    dataset = WSITileDataset(slide_path, tile_size=size, min_tissue=min_tissue, cache_dir=cache_dir)

    def run() -> int:
        for i in range(len(dataset)):
            dataset[i]
        return len(dataset)

    return run


def monai_dataset(slide_path: Path, xy: np.ndarray, size: int):
    from monai.data import PatchWSIDataset

    data = [{"image": str(slide_path), "location": (int(y), int(x))} for x, y in xy]  # (row, col)
    return PatchWSIDataset(
        data, patch_size=size, patch_level=0, include_label=False, center_location=False,
        reader="OpenSlide",
    )  # fmt: skip


def monai_loop(slide_path: Path, xy: np.ndarray, size: int):
    dataset = monai_dataset(slide_path, xy, size)

    def run() -> int:
        for i in range(len(dataset)):
            dataset[i]
        return len(dataset)

    return run


def check_same_pixels(slide_path: Path, xy: np.ndarray, size: int, dataset: WSITileDataset) -> None:
    """The three readers must return the same RGB pixels for one tile."""
    slide = openslide.OpenSlide(str(slide_path))
    x, y = (int(v) for v in xy[len(xy) // 2])
    plain = np.asarray(slide.read_region((x, y), 0, (size, size)))[..., :3].transpose(2, 0, 1)
    ours = (dataset[len(xy) // 2]["image"].numpy() * 255).round().astype(np.uint8)
    theirs = np.asarray(monai_dataset(slide_path, xy, size)[len(xy) // 2]["image"]).astype(np.uint8)
    assert np.array_equal(plain, ours), "WSITileDataset read different pixels"
    assert np.array_equal(plain, theirs[:3]), "MONAI read different pixels"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slide", type=Path, default=DEFAULT_SLIDE)
    parser.add_argument("--tile-size", type=int, default=256)
    parser.add_argument("--min-tissue", type=float, default=0.5)
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    if not args.slide.is_file():
        raise SystemExit(f"slide {args.slide} not found (pass --slide)")
    torch.set_num_threads(1)
    size = args.tile_size
    with tempfile.TemporaryDirectory() as cache_dir:
        dataset = WSITileDataset(
            args.slide, tile_size=size, min_tissue=args.min_tissue, cache_dir=cache_dir
        )
        xy = np.concatenate([info.xy for info in dataset.slides])
        check_same_pixels(args.slide, xy, size, dataset)
        readers = {
            "plain OpenSlide read_region loop": lambda: plain_loop(args.slide, xy, size),
            "plain loop + float tensor": lambda: plain_float_loop(args.slide, xy, size),
            "medp2x WSITileDataset": lambda: medp2x_loop(
                args.slide, size, args.min_tissue, cache_dir
            ),
            "MONAI PatchWSIDataset (openslide)": lambda: monai_loop(args.slide, xy, size),
        }
        rates: dict[str, list[float]] = {name: [] for name in readers}
        cpu_rates: dict[str, list[float]] = {name: [] for name in readers}
        for _ in range(args.repeats):  # interleaved, so load on a shared machine hits all alike
            for name, prepare in readers.items():
                run = prepare()  # fresh reader: no warm tile cache from the previous pass
                start, cpu_start = time.perf_counter(), time.process_time()
                tiles = run()
                rates[name].append(tiles / (time.perf_counter() - start))
                cpu_rates[name].append(tiles / (time.process_time() - cpu_start))
    print(
        f"{args.slide.name}: {len(xy)} tiles of {size} px at level 0, {args.repeats} passes each, "
        f"1 process, {os.cpu_count()} CPU(s), OpenSlide {openslide.__library_version__}"
    )
    # Wall time is what a run sees; CPU time of this one process is steadier on a shared box.
    plain = statistics.median(rates["plain OpenSlide read_region loop"])
    plain_cpu = statistics.median(cpu_rates["plain OpenSlide read_region loop"])
    print(
        f"{'reader':36s} {'tiles/s':>8s} {'min-max':>9s} {'ratio':>6s} {'CPU tiles/s':>12s} {'ratio':>6s}"
    )
    for name, values in rates.items():
        wall, cpu = statistics.median(values), statistics.median(cpu_rates[name])
        spread = f"{min(values):.0f}-{max(values):.0f}"
        print(
            f"{name:36s} {wall:8.0f} {spread:>9s} {wall / plain:5.2f}x "
            f"{cpu:12.0f} {cpu / plain_cpu:5.2f}x"
        )
    print("ratio: vs the plain loop (median over passes)")


if __name__ == "__main__":
    main()
