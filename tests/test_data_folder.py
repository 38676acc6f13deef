"""ImageFolderDataset and CSVManifestDataset on generated PNG/TIFF files (8/16 bit, gray/RGB)."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image

from medp2x.data.base import UnreadableFileError
from medp2x.data.folder import CSVManifestDataset, ImageFolderDataset

RNG = np.random.default_rng(0)


def rgb8(h=20, w=24):
    return RNG.integers(0, 256, (h, w, 3), dtype=np.uint8)


def gray16(h=20, w=24):
    return RNG.integers(0, 65536, (h, w), dtype=np.uint16)


@pytest.fixture
def class_tree(tmp_path) -> tuple[Path, dict[str, np.ndarray]]:
    """root/benign (RGB 8-bit PNG, 16-bit RGB TIFF), root/malignant (gray 8-bit, 16-bit PNG)."""
    arrays = {
        "benign/a.png": rgb8(),
        "benign/sub/b.tif": RNG.integers(0, 65536, (20, 24, 3), dtype=np.uint16),
        "malignant/c.png": RNG.integers(0, 256, (20, 24), dtype=np.uint8),
        "malignant/d.png": gray16(),
    }
    for rel, array in arrays.items():
        path = tmp_path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.suffix == ".tif":
            tifffile.imwrite(path, array, photometric="rgb")
        else:
            Image.fromarray(array).save(path)
    (tmp_path / ".hidden").mkdir()
    Image.fromarray(rgb8()).save(tmp_path / ".hidden" / "x.png")  # ignored
    (tmp_path / "benign" / "notes.txt").write_text("ignored: not an image extension")
    return tmp_path, arrays


def expected_rgb(array: np.ndarray) -> torch.Tensor:
    scaled = array.astype(np.float64) / np.iinfo(array.dtype).max
    if scaled.ndim == 2:
        scaled = np.repeat(scaled[..., None], 3, axis=-1)
    return torch.from_numpy(scaled.transpose(2, 0, 1))


def test_class_folders_labels_and_exact_pixels(class_tree):
    root, arrays = class_tree
    ds = ImageFolderDataset(root)
    assert ds.classes == ["benign", "malignant"]
    assert [(p.relative_to(root).as_posix(), y) for p, y in ds.items] == [
        ("benign/a.png", 0), ("benign/sub/b.tif", 0), ("malignant/c.png", 1), ("malignant/d.png", 1),
    ]  # fmt: skip
    for i, rel in enumerate(arrays):
        sample = ds[i]
        assert sample["image"].dtype == torch.float32 and sample["image"].shape == (3, 20, 24)
        assert torch.allclose(sample["image"].double(), expected_rgb(arrays[rel]), atol=1e-6)
        assert sample["meta"]["dtype"] == str(arrays[rel].dtype)
    assert ds[1]["image"].max() > 0.99  # 16-bit RGB TIFF kept at 16 bit, scaled by 65535


def test_gray_output_uses_luminance(class_tree):
    root, arrays = class_tree
    ds = ImageFolderDataset(root, gray=True)
    rgb = arrays["benign/a.png"].astype(np.float64) / 255
    luma = rgb @ np.array([0.299, 0.587, 0.114])
    assert ds[0]["image"].shape == (1, 20, 24)
    assert torch.allclose(ds[0]["image"][0].double(), torch.from_numpy(luma), atol=1e-5)
    gray = arrays["malignant/d.png"].astype(np.float64) / 65535
    assert torch.allclose(ds[3]["image"][0].double(), torch.from_numpy(gray), atol=1e-6)


def test_resize_and_flat_unlabelled_folder(tmp_path):
    for i in range(3):
        Image.fromarray(rgb8(30 + i, 40)).save(tmp_path / f"img{i}.jpg")
    ds = ImageFolderDataset(tmp_path, image_size=16)
    assert ds.classes is None and len(ds) == 3
    sample = ds[2]
    assert sample["label"] == -1 and sample["image"].shape == (3, 16, 16)
    assert (sample["meta"]["height"], sample["meta"]["width"]) == (32, 40)
    assert 0.0 <= sample["image"].min() and sample["image"].max() <= 1.0


def test_empty_folder_is_a_clear_error(tmp_path):
    (tmp_path / "a").mkdir()
    with pytest.raises(ValueError, match="no .jpg/.jpeg/.png"):
        ImageFolderDataset(tmp_path)


def write_bad_files(folder: Path) -> dict[str, str]:
    (folder / "b_empty.png").write_bytes(b"")
    good = folder / "a_good.png"
    Image.fromarray(rgb8(64, 64)).save(good)
    (folder / "c_truncated.png").write_bytes(good.read_bytes()[:200])
    (folder / "d_text.jpg").write_text("not an image at all")
    return {"b_empty.png": "empty file", "c_truncated.png": "cannot decode", "d_text.jpg": "Pillow"}


def test_bad_images_raise_naming_file_and_reason(tmp_path):
    expected = write_bad_files(tmp_path)
    ds = ImageFolderDataset(tmp_path)
    names = [p.name for p in ds.files]
    for name, reason in expected.items():
        with pytest.raises(UnreadableFileError) as info:
            ds[names.index(name)]
        assert str(info.value).startswith(str(tmp_path / name)) and reason in str(info.value)


def test_bad_images_replaced_by_next_readable_in_skip_mode(tmp_path):
    expected = write_bad_files(tmp_path)
    wrapping = ImageFolderDataset(tmp_path, on_error="skip")
    sample = wrapping[3]  # d_text.jpg is last and bad: wraps around to a_good.png
    assert sample["meta"]["path"].endswith("a_good.png") and sample["meta"]["skipped"] == 1
    Image.fromarray(rgb8(64, 64)).save(tmp_path / "e_last.png")
    ds = ImageFolderDataset(tmp_path, on_error="skip")
    names = [p.name for p in ds.files]
    sample = ds[names.index("b_empty.png")]  # b, c, d are bad: e stands in
    assert sample["meta"]["path"].endswith("e_last.png") and sample["meta"]["skipped"] == 3
    assert torch.equal(sample["image"], ds[names.index("e_last.png")]["image"])
    assert {Path(p).name for p, _ in ds.skipped.skipped} == set(expected)
    ds[names.index("c_truncated.png")]  # already known bad: not counted twice
    assert len(ds.skipped) == 3
    assert ds[names.index("d_text.jpg")]["meta"]["path"].endswith("e_last.png")
    clone = pickle.loads(pickle.dumps(ds))  # spawned workers pickle the dataset
    assert len(clone.skipped) == 3 and torch.equal(clone[0]["image"], ds[0]["image"])


def test_csv_manifest_string_labels_relative_paths_and_missing(tmp_path):
    images = tmp_path / "imgs"
    images.mkdir()
    for name in ("x.png", "y.png", "z.png"):
        Image.fromarray(rgb8()).save(images / name)
    manifest = tmp_path / "train.csv"
    manifest.write_text(
        "path,label\nimgs/x.png,tumour\nimgs/y.png,normal\nimgs/z.png,\nimgs/gone.png,normal\n"
    )
    with pytest.raises(UnreadableFileError, match="gone.png: listed in train.csv but missing"):
        CSVManifestDataset(manifest)
    ds = CSVManifestDataset(manifest, on_error="skip", gray=True)
    assert ds.classes == ["normal", "tumour"]
    assert [y for _, y in ds.items] == [1, 0, -1]
    assert len(ds.skipped) == 1 and ds[0]["image"].shape == (1, 20, 24)


def test_csv_manifest_integer_labels_root_and_no_label_column(tmp_path):
    Image.fromarray(gray16()).save(tmp_path / "a.png")
    Image.fromarray(rgb8()).save(tmp_path / "b.png")
    elsewhere = tmp_path / "lists"
    elsewhere.mkdir()
    (elsewhere / "m.csv").write_text("Path,Label\na.png,2\nb.png,0\n")
    ds = CSVManifestDataset(elsewhere / "m.csv", root=tmp_path)
    assert [y for _, y in ds.items] == [2, 0] and ds.classes == ["0", "1", "2"]
    assert ds[0]["meta"]["dtype"] == "uint16"
    (elsewhere / "u.csv").write_text("path\n" + str(tmp_path / "b.png") + "\n")  # absolute path
    assert CSVManifestDataset(elsewhere / "u.csv")[0]["label"] == -1
    (elsewhere / "bad.csv").write_text("file,label\na.png,1\n")
    with pytest.raises(ValueError, match="'path' column"):
        CSVManifestDataset(elsewhere / "bad.csv")


# ---------------------------------------------------------------------- sizes (issue #14, item 2)
def stripes_and_ramp(h: int, w: int) -> np.ndarray:
    """Known content: 10-px vertical colour stripes in red, a vertical ramp in green."""
    image = np.zeros((h, w, 3), np.uint8)
    image[..., 0] = np.where((np.arange(w) // 10) % 2 == 0, 255, 0)[None, :]
    image[..., 1] = np.linspace(0, 255, h).astype(np.uint8)[:, None]
    return image


def test_pretraining_sources_keep_their_aspect_capped_on_the_shorter_side(tmp_path):
    """A 300 x 150 (W x H) image capped at 100: 200 x 100, the same content as torchvision's
    shorter-side resize of the decoded image; an image already under the cap is untouched."""
    Image.fromarray(stripes_and_ramp(150, 300)).save(tmp_path / "wide.png")
    Image.fromarray(stripes_and_ramp(40, 60)).save(tmp_path / "small.png")
    full = {p: ImageFolderDataset(tmp_path)[i]["image"] for i, p in enumerate(("small", "wide"))}
    capped = ImageFolderDataset(tmp_path, image_size=100, resize="cap")
    small, wide = capped[0], capped[1]
    assert wide["image"].shape == (3, 100, 200)
    assert (wide["meta"]["height"], wide["meta"]["width"]) == (150, 300)  # as stored
    reference = TF.resize(full["wide"], [100], antialias=True)
    assert torch.allclose(wide["image"], reference, atol=1e-6)
    assert torch.equal(small["image"], full["small"])  # never enlarged
    # the other modes: shorter side exactly N (evaluation), or the square of old
    shorter = ImageFolderDataset(tmp_path, image_size=100, resize="shorter")
    assert shorter[0]["image"].shape == (3, 100, 150)  # enlarged: evaluation's fixed scale
    assert shorter[1]["image"].shape == (3, 100, 200)
    assert ImageFolderDataset(tmp_path, image_size=100)[1]["image"].shape == (3, 100, 100)
    with pytest.raises(ValueError, match="resize must be one of"):
        ImageFolderDataset(tmp_path, image_size=100, resize="crop")


def test_an_extreme_aspect_is_also_capped_on_the_longer_side(tmp_path):
    """A padded batch is as large as its widest and tallest images: the longer side of a
    pretraining source is held to twice the cap as well."""
    Image.fromarray(stripes_and_ramp(60, 600)).save(tmp_path / "panorama.png")
    image = ImageFolderDataset(tmp_path, image_size=50, resize="cap")[0]["image"]
    assert image.shape == (3, 10, 100)


def test_large_jpegs_are_decoded_at_a_reduced_scale_that_still_covers_the_cap(tmp_path):
    Image.fromarray(stripes_and_ramp(400, 640)).resize((1280, 800)).save(
        tmp_path / "big.jpg", quality=95
    )
    sample = ImageFolderDataset(tmp_path, image_size=100, resize="cap")[0]
    assert sample["image"].shape == (3, 100, 160)
    assert (sample["meta"]["height"], sample["meta"]["width"]) == (800, 1280)
    whole = TF.resize(ImageFolderDataset(tmp_path)[0]["image"], [100], antialias=True)
    assert (sample["image"] - whole).abs().mean() < 0.03  # DCT-scaled decode: the same image
