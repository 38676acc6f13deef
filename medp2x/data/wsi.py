"""Whole-slide images through OpenSlide: tissue tiles of many slides as one dataset.

Every format OpenSlide reads works (Aperio .svs, Hamamatsu .ndpi/.vms/.vmu, Leica .scn,
MIRAX .mrxs, Philips .tiff, Sakura .svslide, Ventana .bif, Zeiss .czi, generic tiled TIFF and
DICOM-WSI, where a folder of .dcm instances is one slide). The format is decided by
``openslide.OpenSlide.detect_format``, never by the extension.

Construction indexes each slide once: tissue mask on a low-resolution level, tile grid at the
requested level (or microns per pixel), tiles kept by tissue fraction. With ``cache_dir`` the
index is saved per slide, keyed by the slide's path, size, mtime and the tiling parameters, so
the next run starts without touching the pixels. Slide handles are opened lazily in each
DataLoader worker (OpenSlide handles must not cross a fork) and kept open, at most
``MAX_OPEN_SLIDES`` per process, sharing one decoded-tile cache.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import openslide
import torch
from PIL import Image
from torch.utils.data import Dataset

from medp2x.atomic import atomic_write
from medp2x.data.base import (
    SkipLog,
    SkipUnreadable,
    UnreadableFileError,
    check_on_error,
    existing_path,
    handle_bad_file,
    walk_tree,
)
from medp2x.data.readers import TIFF_SUFFIXES, WSI_SUFFIXES
from medp2x.data.tissue import TISSUE_MODES, tile_fractions, tissue_mask

logger = logging.getLogger("medp2x.data")

WSI_EXTENSIONS = (*WSI_SUFFIXES, *TIFF_SUFFIXES, ".dcm")  # tiled TIFFs and DICOM-WSI too
INDEX_VERSION = 1  # bump when the tiling or tissue algorithm changes: old caches are ignored
MAX_MASK_SIDE = 2048  # tissue masks are computed on at most this many pixels a side
MPP_TOLERANCE = 0.02  # 0.499 mpp counts as 0.5: read without resampling
MAX_OPEN_SLIDES = 32  # per process; least recently used handles are closed
TILE_CACHE_BYTES = 64 << 20  # one decoded-tile cache shared by a process's slide handles


@dataclass
class SlideIndex:
    """One slide's tiling: which level is read, how large a region, and where the tiles are."""

    path: Path  # the file OpenSlide opens (for DICOM-WSI: one instance of the slide folder)
    name: str  # file name, or folder name for DICOM-WSI
    vendor: str
    dimensions: tuple[int, int]  # level-0 width, height
    level_count: int
    level: int  # level the tiles are read from
    read_size: int  # side of the region read at ``level`` (resized to tile_size if different)
    mpp: float  # microns per pixel of the returned tiles (nan when the slide does not say)
    background: tuple[int, int, int]
    xy: np.ndarray  # N x 2 int64, level-0 top-left corners of the kept tiles
    tissue: np.ndarray  # N float32 tissue fractions
    from_cache: bool = False


class WSITileDataset(SkipUnreadable, Dataset):
    """Tissue tiles of whole-slide images as samples ``{"image", "label": -1, "meta"}``.

    ``slides``: a slide file, a folder (searched recursively), or a list of either.
    ``tile_size``: output side in pixels. ``level``: pyramid level to tile (0 = full
    resolution), ignored when ``mpp`` is given: then the level closest above that resolution is
    read and resized so tiles have ``mpp`` microns per pixel. ``min_tissue``: minimum tissue
    fraction of a kept tile. ``tissue_level``: level for tissue detection (default: the lowest
    resolution; clipped to the slide's levels). ``tissue_mode``: "auto", "brightfield" or
    "fluorescence" (see ``tissue.py``). ``cache_dir``: where tile indexes are cached.
    ``max_tiles_per_slide``: random subset per slide (``seed``), so huge slides do not dominate.
    ``on_error``: "raise" stops at the first unreadable slide; "skip" records it in
    ``self.skipped`` and goes on (a tile that fails later is recorded with its position and
    replaced by the next readable tile; the slide's other tiles stay in). ``allow_empty``: accept a dataset with no tiles (for ``medp2x scan``).
    """

    def __init__(
        self,
        slides: str | Path | Sequence[str | Path],
        tile_size: int = 256,
        level: int = 0,
        mpp: float | None = None,
        min_tissue: float = 0.5,
        tissue_level: int | None = None,
        tissue_mode: str = "auto",
        cache_dir: str | Path | None = None,
        on_error: str = "raise",
        max_tiles_per_slide: int | None = None,
        seed: int = 0,
        allow_empty: bool = False,
    ):
        if tile_size < 1 or level < 0 or (mpp is not None and mpp <= 0):
            raise ValueError(
                f"need tile_size >= 1, level >= 0, mpp > 0 (got {tile_size}, {level}, {mpp})"
            )
        if not 0.0 <= min_tissue <= 1.0:
            raise ValueError(f"min_tissue must be in [0, 1], not {min_tissue}")
        if tissue_mode not in TISSUE_MODES:
            raise ValueError(f"tissue_mode must be one of {TISSUE_MODES}, not {tissue_mode!r}")
        self.tile_size, self.level, self.mpp = int(tile_size), int(level), mpp
        self.min_tissue, self.tissue_level, self.tissue_mode = min_tissue, tissue_level, tissue_mode
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.on_error = check_on_error(on_error)
        self.skipped = SkipLog()
        self.index_stats = {"slides": 0, "from_cache": 0, "computed": 0, "seconds": 0.0}
        start = time.perf_counter()
        problems: list[tuple[str, str]] = []
        sources = find_slides(slides, problems)
        for path, reason in problems:
            handle_bad_file(path, reason, self.on_error, self.skipped)
        if not sources:
            raise ValueError(f"no slide files ({', '.join(WSI_EXTENSIONS)}) in {slides}")
        self.slides = self._index_all(sources, max_tiles_per_slide, seed)
        self.index_stats["seconds"] = time.perf_counter() - start
        counts = np.array([len(s.xy) for s in self.slides], dtype=np.int64)
        self._ends = np.cumsum(counts)
        self._starts = self._ends - counts
        if len(self) == 0 and not allow_empty:
            raise ValueError(self._empty_reason())
        self._pid, self._handles, self._cache = None, OrderedDict(), None

    # ------------------------------------------------------------------ indexing
    def _index_all(self, sources: list[tuple[Path, str]], max_tiles: int | None, seed: int):
        indexed = []
        for number, (path, name) in enumerate(sources):
            try:
                info = self._index_slide(path, name)
            except UnreadableFileError as err:
                handle_bad_file(err.path, err.reason, self.on_error, self.skipped)
                continue
            self.index_stats["slides"] += 1
            self.index_stats["from_cache" if info.from_cache else "computed"] += 1
            keep = info.tissue >= self.min_tissue
            info.xy, info.tissue = info.xy[keep], info.tissue[keep]
            if max_tiles is not None and len(info.xy) > max_tiles:
                rng = np.random.default_rng((seed, number))
                chosen = np.sort(rng.choice(len(info.xy), size=max_tiles, replace=False))
                info.xy, info.tissue = info.xy[chosen], info.tissue[chosen]
            indexed.append(info)
        return indexed

    def _index_slide(self, path: Path, name: str) -> SlideIndex:
        key = self._cache_key(path)
        cached = self._load_cached(path, name, key)
        if cached is not None:
            return cached
        info = build_slide_index(
            path, name, self.tile_size, self.level, self.mpp, self.tissue_level, self.tissue_mode
        )
        self._save_cached(info, key)
        return info

    def _cache_key(self, path: Path) -> str:
        size, mtime = _fingerprint(path)
        params = {
            "version": INDEX_VERSION, "path": str(path.resolve()), "size": size, "mtime_ns": mtime,
            "tile_size": self.tile_size, "level": None if self.mpp else self.level, "mpp": self.mpp,
            "tissue_level": self.tissue_level, "tissue_mode": self.tissue_mode,
        }  # fmt: skip
        return json.dumps(params, sort_keys=True)

    def _cache_file(self, name: str, key: str) -> Path:
        digest = hashlib.sha256(key.encode()).hexdigest()[:20]
        return self.cache_dir / f"{Path(name).stem[:60]}-{digest}.npz"

    def _load_cached(self, path: Path, name: str, key: str) -> SlideIndex | None:
        if self.cache_dir is None or not (file := self._cache_file(name, key)).is_file():
            return None
        try:
            with np.load(file, allow_pickle=False) as data:
                if str(data["key"]) != key:
                    return None
                meta = json.loads(str(data["meta"]))
                xy, tissue = data["xy"].astype(np.int64), data["tissue"].astype(np.float32)
        except (OSError, ValueError, KeyError) as err:  # damaged cache: rebuild, never fail
            logger.warning("ignoring unreadable tile index cache %s: %s", file, err)
            return None
        return SlideIndex(
            path=path, name=name, xy=xy, tissue=tissue, from_cache=True,
            dimensions=tuple(meta["dimensions"]), background=tuple(meta["background"]),
            **{k: meta[k] for k in ("vendor", "level_count", "level", "read_size", "mpp")},
        )  # fmt: skip

    def _save_cached(self, info: SlideIndex, key: str) -> None:
        if self.cache_dir is None:
            return
        meta = {
            "vendor": info.vendor, "dimensions": list(info.dimensions),
            "level_count": info.level_count, "level": info.level, "read_size": info.read_size,
            "mpp": info.mpp, "background": list(info.background),
        }  # fmt: skip
        target = self._cache_file(info.name, key)

        def write(tmp: str) -> None:  # written whole, then renamed: never half a cache
            with open(tmp, "wb") as handle:
                np.savez(handle, key=key, meta=json.dumps(meta), xy=info.xy, tissue=info.tissue)

        atomic_write(target, write)

    def _empty_reason(self) -> str:
        if not self.slides:
            return f"no readable slides ({self.skipped.summary()})"
        return (
            f"no tile of {len(self.slides)} slide(s) has at least {self.min_tissue:.0%} tissue; "
            "lower min_tissue or check the slides with `medp2x scan`"
        )

    # ------------------------------------------------------------------ reading
    def __len__(self) -> int:
        return int(self._ends[-1]) if len(self._ends) else 0

    def load(self, index: int) -> dict:
        """Tile ``index`` without the skip policy: raises ``UnreadableFileError`` on failure."""
        if not 0 <= index < len(self):
            raise IndexError(f"tile {index} out of range for {len(self)} tiles")
        s = self._slide_of(index)
        info = self.slides[s]
        x, y = (int(v) for v in info.xy[index - int(self._starts[s])])
        try:
            region = self._handle(s).read_region((x, y), info.level, (info.read_size,) * 2)
        except openslide.OpenSlideError as err:
            self._close(s)  # an OpenSlide handle is unusable after an error
            raise UnreadableFileError(
                info.path,
                f"cannot read tile at level {info.level} ({x}, {y}): {err}",
                part=f"tile ({x}, {y})",  # the slide's other tiles stay in
            ) from err
        pixels = np.asarray(region)
        if info.read_size != self.tile_size:
            size = (self.tile_size, self.tile_size)
            rgb = Image.fromarray(_composite(pixels, info.background))
            pixels = np.asarray(rgb.resize(size, Image.Resampling.BILINEAR))
        image = _to_chw_float(pixels, info.background)
        meta = {
            "slide": info.name, "path": str(info.path), "level": info.level, "x": x, "y": y,
            "mpp": info.mpp, "tissue": float(info.tissue[index - int(self._starts[s])]),
            "skipped": 0,
        }  # fmt: skip
        return {"image": image, "label": -1, "meta": meta}

    @property
    def files(self) -> list[Path]:
        """The readable slides (for DICOM-WSI: the instance each slide is opened through)."""
        return [info.path for info in self.slides]

    def source_of(self, index: int) -> int:
        return self._slide_of(index)

    def _slide_of(self, index: int) -> int:
        return int(np.searchsorted(self._ends, index, side="right"))

    def _check_process(self) -> None:
        # Handles inherited through fork share file offsets and OpenSlide's internal state
        # with the parent: each worker process starts its own.
        if self._pid != os.getpid():
            self._pid, self._handles = os.getpid(), OrderedDict()
            self._cache = openslide.OpenSlideCache(TILE_CACHE_BYTES)

    def _handle(self, s: int) -> openslide.OpenSlide:
        self._check_process()
        if s in self._handles:
            self._handles.move_to_end(s)
            return self._handles[s]
        info = self.slides[s]
        try:
            handle = openslide.OpenSlide(str(info.path))
        except (openslide.OpenSlideError, OSError) as err:
            raise UnreadableFileError(info.path, f"cannot open slide: {err}") from err
        handle.set_cache(self._cache)
        self._handles[s] = handle
        if len(self._handles) > MAX_OPEN_SLIDES:
            self._close(next(iter(self._handles)))
        return handle

    def _close(self, s: int) -> None:
        handle = self._handles.pop(s, None)
        if handle is not None:
            handle.close()

    def __getstate__(self) -> dict:  # spawned workers and pickling: no OpenSlide handles
        state = self.__dict__.copy()
        state.update(_pid=None, _handles=OrderedDict(), _cache=None)
        return state


# ---------------------------------------------------------------------- slides on disk
def find_slides(
    slides: str | Path | Sequence[str | Path], problems: list | None = None
) -> list[tuple[Path, str]]:
    """(path OpenSlide opens, display name) per slide, sorted. A folder of ``.dcm`` files is
    one DICOM-WSI slide, opened through one of its instances (OpenSlide finds the others)."""
    entries = [slides] if isinstance(slides, (str, Path)) else list(slides)
    found: dict[Path, str] = {}
    for entry in entries:
        root = existing_path(entry, "slide path")
        files = [root] if root.is_file() else _slide_files(root, problems)
        dicom_dirs = sorted({f.parent for f in files if f.suffix.lower() == ".dcm"})
        for file in files:
            if file.suffix.lower() != ".dcm":
                found[file] = file.name
        for folder in dicom_dirs:
            instances = sorted(f for f in folder.iterdir() if f.suffix.lower() == ".dcm")
            found[_dicom_wsi_instance(instances)] = folder.name
    return sorted(found.items())


def _slide_files(root: Path, problems: list | None = None) -> list[Path]:
    return walk_tree(
        root,
        lambda p: p.suffix.lower() in WSI_EXTENSIONS and not p.name.startswith("."),
        problems,
    )


def _dicom_wsi_instance(instances: list[Path]) -> Path:
    for file in instances:
        if openslide.OpenSlide.detect_format(str(file)) == "dicom":
            return file
    return instances[0]  # none is DICOM-WSI: indexing reports why this one cannot be opened


def _fingerprint(path: Path) -> tuple[int, int]:
    """Size and mtime that change when the slide changes (all instances for DICOM-WSI)."""
    files = [path]
    if path.suffix.lower() == ".dcm":
        files = [f for f in path.parent.iterdir() if f.suffix.lower() == ".dcm"]
    stats = [f.stat() for f in files]
    return sum(s.st_size for s in stats), max(s.st_mtime_ns for s in stats)


# ---------------------------------------------------------------------- one slide's index
def build_slide_index(
    path: Path,
    name: str,
    tile_size: int,
    level: int,
    mpp: float | None,
    tissue_level: int | None = None,
    tissue_mode: str = "auto",
) -> SlideIndex:
    """Open one slide, detect tissue and lay out its full tile grid (all tissue fractions)."""
    slide = open_slide_checked(path)
    try:
        read_level, read_size, tile_mpp = _resolve_read(slide, path, tile_size, level, mpp)
        background = _background(slide)
        xy, footprint = _grid(slide, read_level, read_size)
        t_level = slide.level_count - 1 if tissue_level is None else tissue_level
        t_level = min(max(t_level, 0), slide.level_count - 1)
        try:
            low = read_level_rgb(slide, t_level, background)
        except openslide.OpenSlideError as err:
            raise UnreadableFileError(path, f"cannot read level {t_level}: {err}") from err
        tissue = tile_fractions(tissue_mask(low, tissue_mode), xy, footprint, slide.dimensions)
        return SlideIndex(
            path=path, name=name, vendor=str(openslide.OpenSlide.detect_format(str(path))),
            dimensions=tuple(slide.dimensions), level_count=slide.level_count, level=read_level,
            read_size=read_size, mpp=tile_mpp, background=background, xy=xy, tissue=tissue,
        )  # fmt: skip
    finally:
        slide.close()  # indexing runs before workers fork: no handle may survive it


def open_slide_checked(path: str | Path) -> openslide.OpenSlide:
    """An OpenSlide handle, or ``UnreadableFileError`` saying why the file is not a slide."""
    path = Path(path)
    if not path.exists():
        raise UnreadableFileError(path, "file does not exist")
    if path.stat().st_size == 0:
        raise UnreadableFileError(path, "empty file (0 bytes)")
    if openslide.OpenSlide.detect_format(str(path)) is None:
        raise UnreadableFileError(path, _unrecognised_reason(path))
    try:
        return openslide.OpenSlide(str(path))
    except (openslide.OpenSlideError, OSError) as err:
        raise UnreadableFileError(path, f"OpenSlide cannot open it: {err}") from err


def _unrecognised_reason(path: Path) -> str:
    with open(path, "rb") as handle:
        head = handle.read(132)
    if head[:4] in (b"II*\0", b"MM\0*", b"II+\0", b"MM\0+"):
        return "TIFF that OpenSlide cannot read as a slide (truncated, untiled or unsupported)"
    if head[128:132] == b"DICM":
        return "DICOM file that is not a whole-slide image (or its slide is incomplete)"
    return "not a whole-slide image format OpenSlide recognises"


def slide_mpp(slide: openslide.OpenSlide) -> float:
    """Level-0 microns per pixel, or nan when the slide does not record it."""
    try:
        return float(slide.properties[openslide.PROPERTY_NAME_MPP_X])
    except (KeyError, ValueError):
        return math.nan


def _resolve_read(
    slide: openslide.OpenSlide, path: Path, tile_size: int, level: int, mpp: float | None
) -> tuple[int, int, float]:
    """(level to read, region side at that level, microns per pixel of the output tile)."""
    base = slide_mpp(slide)
    downsamples = slide.level_downsamples
    if mpp is None:
        if level >= slide.level_count:
            raise UnreadableFileError(
                path, f"level {level} requested but the slide has {slide.level_count} level(s)"
            )
        return level, tile_size, base * downsamples[level]
    if math.isnan(base):
        raise UnreadableFileError(
            path, "no microns-per-pixel metadata (openslide.mpp-x); tile by level= instead of mpp="
        )
    # The coarsest level still at least as fine as requested: read there and shrink.
    fine_enough = [i for i, d in enumerate(downsamples) if base * d <= mpp * (1 + MPP_TOLERANCE)]
    chosen = max(fine_enough, key=lambda i: downsamples[i], default=0)
    level_mpp = base * downsamples[chosen]
    scale = mpp / level_mpp
    read_size = tile_size if abs(scale - 1) <= MPP_TOLERANCE else max(1, round(tile_size * scale))
    return chosen, read_size, level_mpp * read_size / tile_size


def _background(slide: openslide.OpenSlide) -> tuple[int, int, int]:
    colour = slide.properties.get(openslide.PROPERTY_NAME_BACKGROUND_COLOR, "ffffff")
    try:
        return tuple(int(colour[i : i + 2], 16) for i in (0, 2, 4))
    except ValueError:
        return (255, 255, 255)


def _grid(slide: openslide.OpenSlide, level: int, read_size: int) -> tuple[np.ndarray, tuple]:
    """Level-0 corners of every whole tile inside the slide's bounds, and the tile footprint."""
    props, down = slide.properties, slide.level_downsamples[level]
    width, height = slide.dimensions
    x0 = int(props.get(openslide.PROPERTY_NAME_BOUNDS_X, 0))
    y0 = int(props.get(openslide.PROPERTY_NAME_BOUNDS_Y, 0))
    bw = int(props.get(openslide.PROPERTY_NAME_BOUNDS_WIDTH, width - x0))
    bh = int(props.get(openslide.PROPERTY_NAME_BOUNDS_HEIGHT, height - y0))
    level_w, level_h = slide.level_dimensions[level]
    nx = min(int(bw / down), level_w) // read_size
    ny = min(int(bh / down), level_h) // read_size
    step = read_size * down
    xs = x0 + np.round(np.arange(nx) * step).astype(np.int64)
    ys = y0 + np.round(np.arange(ny) * step).astype(np.int64)
    xy = np.stack(np.meshgrid(xs, ys, indexing="xy"), axis=-1).reshape(-1, 2)
    return xy, (step, step)


def read_level_rgb(
    slide: openslide.OpenSlide,
    level: int,
    background: tuple[int, int, int] = (255, 255, 255),
    max_side: int = MAX_MASK_SIDE,
) -> np.ndarray:
    """A whole level as H x W x 3 uint8, box-reduced to at most ``max_side`` pixels a side.

    Read in bands of rows so a single-level 100k-pixel slide never needs one huge buffer.
    """
    width, height = slide.level_dimensions[level]
    down = slide.level_downsamples[level]
    factor = max(1, math.ceil(max(width, height) / max_side))
    band = factor * max(1, (1 << 24) // max(width, 1) // factor)  # ~16 M pixels per band
    rows = []
    for top in range(0, height, band):
        rows_here = min(band, height - top)
        region = slide.read_region((0, round(top * down)), level, (width, rows_here))
        rgb = Image.fromarray(_composite(np.asarray(region), background))
        rows.append(np.asarray(rgb.reduce(factor) if factor > 1 else rgb))
    return np.concatenate(rows, axis=0)


def _to_chw_float(pixels: np.ndarray, background: tuple[int, int, int]) -> torch.Tensor:
    """H x W x 3|4 uint8 -> 3 x H x W float32 in [0, 1], compositing any transparency.

    One strided numpy pass straight into the output: slicing RGB out of RGBA first would
    cost three times as long as this whole conversion (measured on 256 px tiles).
    """
    planes = pixels.transpose(2, 0, 1)
    out = np.empty((3,) + pixels.shape[:2], dtype=np.float32)
    if planes.shape[0] == 3 or planes[3].min() == 255:
        np.divide(planes[:3], np.float32(255.0), out=out, dtype=np.float32)
    else:
        alpha = planes[3].astype(np.float32) / 255.0
        colour = np.asarray(background, dtype=np.float32)[:, None, None]
        np.clip((planes[:3] * alpha + colour * (1.0 - alpha)) / 255.0, 0.0, 1.0, out=out)
    return torch.from_numpy(out)


def _composite(rgba: np.ndarray, background: tuple[int, int, int]) -> np.ndarray:
    """RGBA (OpenSlide: transparent outside the scanned area) onto the slide's background."""
    rgb, alpha = rgba[..., :3], rgba[..., 3]
    if alpha.min() == 255:
        return np.ascontiguousarray(rgb)
    a = alpha[..., None].astype(np.float32) / 255.0
    out = rgb * a + np.asarray(background, dtype=np.float32) * (1.0 - a)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


# ---------------------------------------------------------------------- writing a slide
def write_pyramidal_tiff(
    path: str | Path, rgb: np.ndarray, tile: int = 256, levels: int = 3, mpp: float = 0.5
) -> Path:
    """Write an RGB uint8 image as a tiled pyramidal TIFF that OpenSlide opens as generic-tiff.

    Each level halves the previous one (box filter); resolution tags in pixels per centimetre
    let OpenSlide report ``mpp`` microns per pixel at level 0. Deflate compression, because
    tifffile writes it without optional codecs. Written to a temporary file, then renamed.
    """
    import tifffile  # only the writer needs it

    rgb = np.asarray(rgb)
    if rgb.ndim != 3 or rgb.shape[-1] != 3 or rgb.dtype != np.uint8:
        raise ValueError(f"need an H x W x 3 uint8 image, got {rgb.dtype} {rgb.shape}")
    if tile % 16 or tile <= 0:
        raise ValueError(f"TIFF tiles must be a positive multiple of 16, not {tile}")

    def write(tmp: str) -> None:
        image = rgb
        with tifffile.TiffWriter(tmp, bigtiff=rgb.nbytes > 2**31) as writer:
            for i in range(max(1, levels)):
                pixels_per_cm = 1e4 / (mpp * 2**i)
                writer.write(
                    image, tile=(tile, tile), photometric="rgb", compression="zlib",
                    subfiletype=0 if i == 0 else 1, resolution=(pixels_per_cm, pixels_per_cm),
                    resolutionunit="CENTIMETER", metadata=None,
                )  # fmt: skip
                if min(image.shape[:2]) < 2:
                    break
                image = np.asarray(Image.fromarray(image).reduce(2))

    return atomic_write(path, write)


def describe_slides(infos: Iterable[SlideIndex]) -> list[str]:
    """One line per indexed slide: format, size, levels, resolution and kept tiles."""
    lines = []
    for info in infos:
        mpp = "mpp unknown" if math.isnan(info.mpp) else f"{info.mpp:.3f} mpp tiles"
        lines.append(
            f"{info.name}: {info.vendor}, {info.dimensions[0]}x{info.dimensions[1]}, "
            f"{info.level_count} level(s), reading level {info.level} ({info.read_size} px), "
            f"{mpp}, {len(info.xy)} tiles"
        )
    return lines
