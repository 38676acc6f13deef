"""WSITileDataset, tissue detection and the pyramidal TIFF writer, on generated and real slides."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import openslide
import pytest
import tifffile
import torch
from PIL import Image
from torch.utils.data import DataLoader

from medp2x.data.base import UnreadableFileError
from medp2x.data.tissue import tissue_mask
from medp2x.data.wsi import WSITileDataset, write_pyramidal_tiff

SHARED_WSI = Path(__file__).resolve().parents[2] / "shared" / "data" / "wsi_samples"
SIZE, CENTRE, RADIUS = 1024, (640, 384), 200  # synthetic slide: white glass, one round "tissue"


def synthetic_rgb(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Off-white noisy glass with a purple, textured disk; returns (rgb, disk mask)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:SIZE, :SIZE]
    disk = (xx - CENTRE[0]) ** 2 + (yy - CENTRE[1]) ** 2 <= RADIUS**2
    rgb = np.clip(rng.normal(242, 3, (SIZE, SIZE, 3)), 0, 255)
    stain = np.array([150, 80, 160]) + rng.normal(0, 15, (SIZE, SIZE, 1))
    rgb[disk] = np.clip(stain[disk], 0, 255)
    return rgb.astype(np.uint8), disk


@pytest.fixture(scope="module")
def slide(tmp_path_factory) -> tuple[Path, np.ndarray, np.ndarray]:
    rgb, disk = synthetic_rgb()
    path = write_pyramidal_tiff(tmp_path_factory.mktemp("slides") / "blob.tif", rgb, mpp=0.5)
    return path, rgb, disk


def test_writer_round_trip_through_openslide(slide):
    path, rgb, _ = slide
    assert openslide.OpenSlide.detect_format(str(path)) == "generic-tiff"
    with openslide.OpenSlide(str(path)) as s:
        assert s.level_dimensions == ((1024, 1024), (512, 512), (256, 256))
        assert float(s.properties[openslide.PROPERTY_NAME_MPP_X]) == pytest.approx(0.5)
        assert float(s.properties[openslide.PROPERTY_NAME_MPP_Y]) == pytest.approx(0.5)
        level0 = np.asarray(s.read_region((0, 0), 0, (1024, 1024)))
        level1 = np.asarray(s.read_region((0, 0), 1, (512, 512)))
    assert np.array_equal(level0[..., :3], rgb)  # deflate is lossless
    assert (level0[..., 3] == 255).all()
    box_mean = rgb.reshape(512, 2, 512, 2, 3).astype(float).mean(axis=(1, 3))
    assert np.abs(level1[..., :3] - box_mean).max() <= 1.0


def test_demo_slide_from_scikit_image(tmp_path):
    """The demo's slide: scikit-image's IHC sample as a 3-level pyramid OpenSlide reads."""
    from skimage.data import immunohistochemistry

    rgb = immunohistochemistry()
    path = write_pyramidal_tiff(tmp_path / "ihc.tif", rgb, tile=256, levels=3, mpp=0.5)
    assert openslide.OpenSlide.detect_format(str(path)) == "generic-tiff"
    ds = WSITileDataset(path, tile_size=64, min_tissue=0.5)
    info = ds.slides[0]
    assert (info.vendor, info.level_count, info.mpp) == ("generic-tiff", 3, 0.5)
    assert 0 < len(ds) < 64  # the stained section is kept, the bright empty corner is not
    x, y = ds[0]["meta"]["x"], ds[0]["meta"]["y"]
    assert np.allclose(ds[0]["image"].numpy() * 255, rgb[y : y + 64, x : x + 64].transpose(2, 0, 1))


def test_writer_rejects_non_rgb(tmp_path):
    with pytest.raises(ValueError, match="uint8"):
        write_pyramidal_tiff(tmp_path / "x.tif", np.zeros((64, 64), np.uint8))


def test_tiles_hold_the_slide_pixels(slide):
    path, rgb, _ = slide
    ds = WSITileDataset(path, tile_size=128, min_tissue=0.0)
    assert len(ds) == 64  # the whole 8 x 8 grid
    for i in (0, 27, 63):
        sample = ds[i]
        x, y = sample["meta"]["x"], sample["meta"]["y"]
        image = sample["image"]
        assert image.shape == (3, 128, 128) and image.dtype == torch.float32
        expected = torch.from_numpy(rgb[y : y + 128, x : x + 128].transpose(2, 0, 1) / 255.0)
        assert torch.allclose(image.double(), expected, atol=1e-6)
        assert sample["label"] == -1
        assert sample["meta"]["slide"] == "blob.tif" and sample["meta"]["level"] == 0


def test_tissue_detection_keeps_the_blob_tiles(slide):
    path, _, disk = slide
    ds = WSITileDataset(path, tile_size=128, min_tissue=0.5)
    truth = {
        (x, y): disk[y : y + 128, x : x + 128].mean()
        for y in range(0, SIZE, 128)
        for x in range(0, SIZE, 128)
    }
    kept = {tuple(map(int, xy)) for xy in ds.slides[0].xy}
    assert kept, "no tissue found"
    assert all(truth[t] >= 0.25 for t in kept), "kept a tile that is mostly glass"
    assert all(t in kept for t, frac in truth.items() if frac >= 0.75), "missed a tissue tile"
    for frac, (x, y) in zip(ds.slides[0].tissue, ds.slides[0].xy, strict=True):
        assert abs(frac - truth[(int(x), int(y))]) < 0.2


def test_tissue_mask_brightfield_fluorescence_and_blank():
    rgb, disk = synthetic_rgb(seed=1)
    small = np.asarray(Image.fromarray(rgb).reduce(4))
    truth = disk.reshape(256, 4, 256, 4).mean(axis=(1, 3)) > 0.5
    mask = tissue_mask(small)
    assert (mask & truth).sum() / (mask | truth).sum() > 0.9  # IoU
    # fluorescence: dark background, sparse bright nuclei inside the region
    rng = np.random.default_rng(2)
    fluo = np.zeros((256, 256, 3), np.uint8)
    fluo[..., 2] = 3
    nuclei = truth & (rng.random((256, 256)) < 0.3)
    fluo[nuclei, 2] = 200
    fmask = tissue_mask(fluo)
    assert (fmask & truth).sum() / (fmask | truth).sum() > 0.8
    for blank in (np.full((64, 64, 3), 240, np.uint8), np.zeros((64, 64, 3), np.uint8)):
        noisy = np.clip(blank + rng.integers(0, 3, blank.shape), 0, 255).astype(np.uint8)
        assert not tissue_mask(noisy).any()


def test_index_cache_hit_and_invalidation(slide, tmp_path):
    path, rgb, _ = slide
    copy = write_pyramidal_tiff(tmp_path / "copy.tif", rgb)
    first = WSITileDataset(copy, tile_size=128, cache_dir=tmp_path / "cache")
    assert first.index_stats["computed"] == 1 and first.index_stats["from_cache"] == 0
    second = WSITileDataset(copy, tile_size=128, cache_dir=tmp_path / "cache")
    assert second.index_stats["from_cache"] == 1 and second.index_stats["computed"] == 0
    assert np.array_equal(first.slides[0].xy, second.slides[0].xy)
    assert torch.equal(first[0]["image"], second[0]["image"])
    # other parameters: another cache entry; touched slide: recomputed
    other = WSITileDataset(copy, tile_size=64, cache_dir=tmp_path / "cache")
    assert other.index_stats["computed"] == 1
    stat = copy.stat()
    os.utime(copy, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    touched = WSITileDataset(copy, tile_size=128, cache_dir=tmp_path / "cache")
    assert touched.index_stats["computed"] == 1
    # damaged cache files are rebuilt, not fatal
    for file in (tmp_path / "cache").glob("*.npz"):
        file.write_bytes(b"garbage")
    rebuilt = WSITileDataset(copy, tile_size=128, cache_dir=tmp_path / "cache")
    assert rebuilt.index_stats["computed"] == 1 and len(rebuilt) == len(first)


@pytest.mark.parametrize(
    "mpp, level, read_size",
    [(0.5, 0, 64), (0.505, 0, 64), (1.0, 1, 64), (0.75, 0, 96), (2.0, 2, 64), (4.0, 2, 128)],
)
def test_mpp_picks_level_and_region(slide, mpp, level, read_size):
    path, rgb, _ = slide
    ds = WSITileDataset(path, tile_size=64, mpp=mpp, min_tissue=0.0)
    info = ds.slides[0]
    assert (info.level, info.read_size) == (level, read_size)
    assert info.mpp == pytest.approx(0.5 * 2**level * read_size / 64)
    sample = ds[len(ds) // 2]
    assert sample["image"].shape == (3, 64, 64)
    x, y, span = sample["meta"]["x"], sample["meta"]["y"], read_size * 2**level
    # the tile shows the level-0 area it claims, at the requested scale (box-averaged source)
    source = torch.from_numpy(rgb[y : y + span, x : x + span].transpose(2, 0, 1).astype(np.float32))
    expected = torch.nn.functional.adaptive_avg_pool2d(source, 64)  # area average
    assert (sample["image"] * 255 - expected).abs().mean() < 6


def test_mpp_without_metadata_names_the_file(tmp_path):
    path = tmp_path / "nompp.tif"
    tifffile.imwrite(
        path, synthetic_rgb()[0], tile=(256, 256), photometric="rgb", compression="zlib"
    )
    with pytest.raises(UnreadableFileError, match="nompp.tif: no microns-per-pixel"):
        WSITileDataset(path, mpp=0.5)
    assert len(WSITileDataset(path, level=0, min_tissue=0.0)) == 16


def bad_slides(folder: Path, good: Path) -> dict[str, str]:
    """Zero-byte, truncated and text-as-.svs files; returns name -> expected reason part."""
    (folder / "empty.svs").write_bytes(b"")
    data = good.read_bytes()
    (folder / "truncated.tif").write_bytes(data[: len(data) // 2])
    (folder / "notes.svs").write_text("this is a text file, not a slide\n")
    return {
        "empty.svs": "empty file",
        "truncated.tif": "TIFF that OpenSlide cannot read",
        "notes.svs": "not a whole-slide image",
    }


def test_bad_slides_raise_with_file_and_reason(slide, tmp_path):
    expected = bad_slides(tmp_path, slide[0])
    for name, reason in expected.items():
        with pytest.raises(UnreadableFileError) as info:
            WSITileDataset(tmp_path / name)
        assert str(info.value).startswith(str(tmp_path / name)) and reason in str(info.value)
    with pytest.raises(ValueError, match="no readable slides"):
        WSITileDataset(tmp_path, on_error="skip")


def test_bad_slides_skipped_and_counted(slide, tmp_path):
    expected = bad_slides(tmp_path, slide[0])
    write_pyramidal_tiff(tmp_path / "good.tif", slide[1])
    ds = WSITileDataset(tmp_path, tile_size=128, on_error="skip")
    assert [info.name for info in ds.slides] == ["good.tif"]
    reasons = {Path(p).name: r for p, r in ds.skipped.skipped}
    assert set(reasons) == set(expected)
    assert all(expected[name] in reasons[name] for name in expected)
    assert len(ds) > 0 and ds[0]["image"].shape == (3, 128, 128)


def test_dicom_folder_is_one_slide_and_non_wsi_dicom_is_named(tmp_path):
    series = tmp_path / "case07"
    series.mkdir()
    for name in ("1.dcm", "2.dcm"):  # DICOM preamble, but no whole-slide image inside
        (series / name).write_bytes(b"\0" * 128 + b"DICM" + b"\0" * 64)
    ds = WSITileDataset(tmp_path, on_error="skip", allow_empty=True)
    assert len(ds) == 0 and len(ds.skipped) == 1  # two instances, one slide
    path, reason = ds.skipped.skipped[0]
    assert Path(path).parent == series and "DICOM file that is not a whole-slide image" in reason
    (tmp_path / "nothing").mkdir()
    with pytest.raises(ValueError, match="no slide files"):
        WSITileDataset(tmp_path / "nothing")
    with pytest.raises(ValueError, match="tissue_mode"):
        WSITileDataset(tmp_path, tissue_mode="darkfield")


def corrupt_level0(path: Path) -> None:
    """Zero the compressed tile data of level 0; the low-resolution levels stay intact."""
    with tifffile.TiffFile(path) as tif:
        page = tif.pages[0]
        spans = list(zip(page.dataoffsets, page.databytecounts, strict=True))
    with open(path, "r+b") as handle:
        for offset, count in spans:
            handle.seek(offset)
            handle.write(b"\0" * count)


def corrupt_tile(path: Path, x: int, y: int) -> None:
    """Zero the compressed data of the one level-0 TIFF tile that holds pixel (x, y)."""
    with tifffile.TiffFile(path) as tif:
        page = tif.pages[0]
        across = -(-page.imagewidth // page.tilewidth)
        k = (y // page.tilelength) * across + x // page.tilewidth
        offset, count = page.dataoffsets[k], page.databytecounts[k]
    with open(path, "r+b") as handle:
        handle.seek(offset)
        handle.write(b"\0" * count)


def test_tile_read_failure_is_named_or_replaced(slide, tmp_path):
    rgb = slide[1]
    write_pyramidal_tiff(tmp_path / "a_broken.tif", rgb)
    corrupt_level0(tmp_path / "a_broken.tif")
    write_pyramidal_tiff(tmp_path / "b_good.tif", rgb)
    strict = WSITileDataset(tmp_path, tile_size=128)  # indexing reads level 2 only: passes
    assert [s.name for s in strict.slides] == ["a_broken.tif", "b_good.tif"]
    with pytest.raises(UnreadableFileError, match="a_broken.tif: cannot read tile"):
        strict[0]
    lenient = WSITileDataset(tmp_path, tile_size=128, on_error="skip")
    first_good = len(lenient.slides[0].xy)
    sample = lenient[0]  # every tile of a_broken fails, one by one: b_good's first stands in
    assert sample["meta"]["slide"] == "b_good.tif" and sample["meta"]["skipped"] == first_good
    assert torch.equal(sample["image"], lenient[first_good]["image"])
    assert len(lenient.skipped) == first_good
    assert all("a_broken.tif" in path for path, _ in lenient.skipped.skipped)
    lenient[1]  # the broken tiles are remembered: no second skip entry
    assert len(lenient.skipped) == first_good


def test_slide_with_some_corrupt_tiles_keeps_its_readable_tiles(slide, tmp_path):
    """#21: one damaged tile drops that tile, not the slide."""
    path = write_pyramidal_tiff(tmp_path / "partly.tif", slide[1])
    tiles = WSITileDataset(path, tile_size=128, min_tissue=0, on_error="skip")
    x, y = (int(v) for v in tiles.slides[0].xy[0])
    corrupt_tile(path, x, y)
    tiles = WSITileDataset(path, tile_size=128, min_tissue=0, on_error="skip")
    served = [tiles[i]["meta"] for i in range(len(tiles))]
    positions = {(m["x"], m["y"]) for m in served}
    same_tiff_tile = {
        (int(a), int(b))
        for a, b in tiles.slides[0].xy
        if a // 256 == x // 256 and b // 256 == y // 256
    }
    assert positions == {(int(a), int(b)) for a, b in tiles.slides[0].xy} - same_tiff_tile
    assert len(tiles.skipped) == len(same_tiff_tile) == 4  # four 128 px tiles in a 256 px one
    reasons = " ".join(reason for _, reason in tiles.skipped.skipped)
    assert all(f"({a}, {b})" in reasons for a, b in same_tiff_tile)


def test_max_tiles_per_slide_is_a_seeded_subset(slide):
    path = slide[0]
    full = {tuple(xy) for xy in WSITileDataset(path, tile_size=64).slides[0].xy}
    a = WSITileDataset(path, tile_size=64, max_tiles_per_slide=5, seed=1).slides[0].xy
    b = WSITileDataset(path, tile_size=64, max_tiles_per_slide=5, seed=1).slides[0].xy
    c = WSITileDataset(path, tile_size=64, max_tiles_per_slide=5, seed=2).slides[0].xy
    assert len(a) == 5 and np.array_equal(a, b) and not np.array_equal(a, c)
    assert {tuple(xy) for xy in a} <= full


def test_worker_processes_and_pickling_read_the_same_tiles(slide):
    ds = WSITileDataset(slide[0], tile_size=128)
    reference = torch.stack([ds[i]["image"] for i in range(len(ds))])  # opens a handle here
    loader = DataLoader(ds, batch_size=4, num_workers=2)  # forked workers reopen their own
    batches = list(loader)
    assert torch.equal(torch.cat([b["image"] for b in batches]), reference)
    assert batches[0]["meta"]["x"].dtype == torch.int64  # meta collates
    clone = pickle.loads(pickle.dumps(ds))
    assert torch.equal(clone[len(ds) - 1]["image"], reference[-1])


@pytest.mark.parametrize("name", ["CMU-1-Small-Region.svs", "test3-DAPI-2_387.ndpi"])
def test_shared_slides_give_sane_tissue_tiles(name):
    path = SHARED_WSI / name
    if not path.is_file():
        pytest.skip(f"shared slide {path} not present (only beside the project checkout)")
    ds = WSITileDataset(path, tile_size=256, max_tiles_per_slide=6, seed=0)
    assert len(ds) == 6
    bright = name.endswith(".svs")  # H&E brightfield; the NDPI is DAPI fluorescence
    for i in range(len(ds)):
        image = ds[i]["image"]
        assert image.shape == (3, 256, 256) and torch.isfinite(image).all()
        assert 0.0 <= image.min() and image.max() <= 1.0
        assert image.max() - image.min() > 0.3, "dynamic range unused"
        assert image.std() > 0.03, "tissue tile is blank"
        if bright:
            assert image.mean() < 0.85, "brightfield tissue tile is mostly white glass"
        else:
            assert image[2].mean() > image[0].mean() + 0.05, "DAPI tile without blue signal"
    coarse = WSITileDataset(path, tile_size=128, mpp=2.0, max_tiles_per_slide=2)
    assert coarse[0]["meta"]["mpp"] == pytest.approx(2.0, rel=0.03)
