"""NIfTI slice reader: real brain volumes, synthetic volumes with known foreground and
orientation, masks, 4D, augmentation, and generated bad files in both error modes."""

from __future__ import annotations

import functools
import gzip
import pickle
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from medp2x.data.base import UnreadableFileError
from medp2x.data.nifti import (
    NiftiSliceDataset,
    find_nifti_files,
    mri_augmentation,
    pair_masks,
)

BRAIN = Path(__file__).resolve().parents[2] / "shared" / "data" / "nifti_brain"
needs_brain = pytest.mark.skipif(
    not BRAIN.is_dir(), reason=f"shared NIfTI samples not found at {BRAIN}"
)
SHAPE = (20, 24, 16)


def save(path: Path, data: np.ndarray, affine: np.ndarray | None = None) -> Path:
    nib.save(
        nib.Nifti1Image(data.astype(np.float32), np.eye(4) if affine is None else affine), path
    )
    return path


def pyramid() -> np.ndarray:
    """Axial slice z holds a centred square of side 2z (clipped to the slice), values in
    [100, 200) on a zero background: its foreground fraction is known exactly."""
    volume = np.zeros(SHAPE, np.float32)
    rng = np.random.default_rng(0)
    for z in range(SHAPE[2]):
        rows, cols = slice(max(0, 10 - z), 10 + z), slice(max(0, 12 - z), 12 + z)
        volume[rows, cols, z] = rng.uniform(100, 200, volume[rows, cols, z].shape)
    return volume


def expected_fraction(z: int) -> float:
    return min(2 * z, SHAPE[0]) * min(2 * z, SHAPE[1]) / (SHAPE[0] * SHAPE[1])


def shown(plane: np.ndarray) -> np.ndarray:
    """Display convention written out independently: first index -> columns, second ->
    rows from the top down."""
    return plane.T[::-1]


def images(dataset) -> list[np.ndarray]:
    return [dataset[i]["image"][0].numpy() for i in range(len(dataset))]


# --------------------------------------------------------------------------- real volumes


@functools.cache
def canonical_shape(path: Path) -> tuple[int, ...]:
    return nib.as_closest_canonical(nib.load(path)).shape[:3]


@needs_brain
def test_every_brain_volume_gives_sane_slices():
    for axis, root in ((2, BRAIN), (0, BRAIN / "nibabel_tests")):
        files = find_nifti_files(root)
        dataset = NiftiSliceDataset(root, axis=axis)
        assert len(dataset.skipped) == 0
        assert {v.path for v in dataset.volumes} == set(files)
        starts = np.r_[0, np.cumsum([len(v.slices) for v in dataset.volumes])]
        for number, volume in enumerate(dataset.volumes):
            assert len(volume.slices) > 0, volume.path.name
            canonical = canonical_shape(volume.path)
            plane = [n for a, n in enumerate(canonical) if a != axis]
            for k in {0, len(volume.slices) // 2, len(volume.slices) - 1}:
                sample = dataset[int(starts[number] + k)]
                image = sample["image"]
                assert tuple(image.shape) == (1, plane[1], plane[0]), volume.path.name
                assert torch.isfinite(image).all() and 0 <= image.min() and image.max() <= 1
                if k == len(volume.slices) // 2:
                    p1, p99 = np.percentile(image.numpy(), (1, 99))
                    assert p99 - p1 > 0.2, f"{volume.path.name}: {p1:.3f}..{p99:.3f}"
                assert sample["meta"]["slice"] == volume.slices[k]


@needs_brain
def test_matches_nibabel_canonical_and_foreground_percentiles_on_ixi():
    path = BRAIN / "ixi_hdbet" / "hd_bet_IXI002-Guys-0828-T1.nii.gz"
    assert nib.aff2axcodes(nib.load(path).affine) != ("R", "A", "S")  # really reoriented
    canonical = nib.as_closest_canonical(nib.load(path)).get_fdata()
    dataset = NiftiSliceDataset(path, axis=2, foreground="nonzero", min_foreground=0.05)
    lo, hi = np.percentile(canonical[canonical != 0], (1, 99))
    volume = dataset.volumes[0]
    assert (volume.lo, volume.hi) == pytest.approx((lo, hi))
    fraction = (canonical != 0).mean(axis=(0, 1))
    np.testing.assert_array_equal(volume.slices, np.flatnonzero(fraction >= 0.05))
    k = len(dataset) // 2
    expected = np.clip((shown(canonical[:, :, volume.slices[k]]) - lo) / (hi - lo), 0, 1)
    np.testing.assert_allclose(dataset[k]["image"][0].numpy(), expected, atol=1e-6)


@needs_brain
def test_mask_pair_rule_on_ixi():
    masked = NiftiSliceDataset(BRAIN / "ixi_hdbet", mask=("hd_bet_", "hd_bet_mask_"))
    assert [v.path.name for v in masked.volumes] == [
        "hd_bet_IXI002-Guys-0828-T1.nii.gz",
        "hd_bet_IXI002-Guys-0828-T2.nii.gz",
    ]
    mask = nib.as_closest_canonical(
        nib.load(BRAIN / "ixi_hdbet" / "hd_bet_mask_IXI002-Guys-0828-T1.nii.gz")
    ).get_fdata()
    fraction = (mask > 0).mean(axis=(0, 1))
    np.testing.assert_array_equal(masked.volumes[0].slices, np.flatnonzero(fraction >= 0.1))


# --------------------------------------------------------------------------- synthetic volumes


@pytest.mark.parametrize("rule", ["nonzero", "robust", 50.0])
@pytest.mark.parametrize("threshold", [0.0, 0.1, 0.3, 0.8])
def test_slices_with_too_little_foreground_are_left_out(tmp_path, rule, threshold):
    path = save(tmp_path / "p.nii", pyramid())
    dataset = NiftiSliceDataset(path, min_foreground=threshold, foreground=rule)
    if threshold == 0:
        expected = list(range(SHAPE[2]))
    else:
        expected = [z for z in range(SHAPE[2]) if expected_fraction(z) >= threshold]
    assert [s["meta"]["slice"] for s in (dataset[i] for i in range(len(dataset)))] == expected


def test_axis_choice_and_percentile_normalisation(tmp_path):
    volume = pyramid()
    path = save(tmp_path / "p.nii", volume)
    lo, hi = np.percentile(volume[volume != 0], (5, 95))
    for axis in (0, 1, 2):
        dataset = NiftiSliceDataset(
            path, axis=axis, min_foreground=0.0, foreground="nonzero", percentiles=(5, 95)
        )
        assert len(dataset) == SHAPE[axis]
        for index in (3, SHAPE[axis] - 2):
            plane = np.take(volume, index, axis=axis)
            expected = np.clip((shown(plane) - lo) / (hi - lo), 0, 1)
            np.testing.assert_allclose(dataset[index]["image"][0].numpy(), expected, atol=1e-6)
            assert dataset[index]["meta"]["axis"] == axis


def test_flipped_and_permuted_storage_gives_the_same_slices(tmp_path):
    volume = pyramid()
    ras = save(tmp_path / "ras.nii", volume)
    lps = save(tmp_path / "lps.nii.gz", volume[::-1, ::-1, :], np.diag([-1.0, -1.0, 1.0, 1.0]))
    # stored as (z, x, y): file axis 0 is superior, 1 is right, 2 is anterior
    permutation = np.array([[0, 1, 0, 0], [0, 0, 1, 0], [1, 0, 0, 0], [0, 0, 0, 1]], float)
    permuted = save(tmp_path / "zxy.nii", volume.transpose(2, 0, 1), permutation)
    for axis in (0, 1, 2):
        reference = images(NiftiSliceDataset(ras, axis=axis, min_foreground=0.05))
        for other in (lps, permuted):
            candidate = images(NiftiSliceDataset(other, axis=axis, min_foreground=0.05))
            assert len(candidate) == len(reference) > 0
            for a, b in zip(candidate, reference, strict=True):
                np.testing.assert_allclose(a, b, atol=1e-6)


def test_compressed_and_uncompressed_read_alike(tmp_path):
    volume = pyramid()
    plain = NiftiSliceDataset(save(tmp_path / "a.nii", volume), axis=0)
    packed = NiftiSliceDataset(save(tmp_path / "b.nii.gz", volume), axis=0, cache_volumes=1)
    for a, b in zip(images(plain), images(packed), strict=True):
        np.testing.assert_array_equal(a, b)
    assert len(packed._cache) == 1  # the decompressed volume is kept, only one


def test_4d_volumes_as_separate_samples_or_one_chosen(tmp_path):
    volume = pyramid()
    series = np.stack([volume, 2 * volume, 3 * volume], axis=-1)
    path = save(tmp_path / "dwi.nii.gz", series)
    every = NiftiSliceDataset(path, min_foreground=0.2)
    per_volume = len(NiftiSliceDataset(save(tmp_path / "v.nii", volume), min_foreground=0.2))
    assert len(every) == 3 * per_volume and [v.volume for v in every.volumes] == [0, 1, 2]
    pictures = images(every)  # percentile windows make the intensity scale irrelevant
    for k in range(per_volume):
        np.testing.assert_allclose(pictures[k], pictures[k + 2 * per_volume], atol=1e-5)
    chosen = NiftiSliceDataset(path, min_foreground=0.2, volume_index=1)
    assert len(chosen) == per_volume
    assert {chosen[i]["meta"]["volume"] for i in range(len(chosen))} == {1}
    with pytest.raises(UnreadableFileError, match="volume_index 5 out of range"):
        NiftiSliceDataset(path, volume_index=5)
    skipped = NiftiSliceDataset(path, volume_index=5, on_error="skip")
    assert len(skipped) == 0 and len(skipped.skipped) == 1


def test_mask_pattern_chooses_slices_and_window(tmp_path):
    rng = np.random.default_rng(1)
    image = rng.uniform(1, 1000, SHAPE).astype(np.float32)  # foreground everywhere
    mask = np.zeros(SHAPE, np.float32)
    mask[2:18, 2:22, 4:9] = 1
    save(tmp_path / "sub1.nii.gz", image)
    save(tmp_path / "sub1_mask.nii.gz", mask)
    save(tmp_path / "orphan_mask.nii.gz", mask)  # a mask without its image is no image
    assert pair_masks(find_nifti_files(tmp_path), "*_mask.nii.gz") == {
        tmp_path / "sub1.nii.gz": tmp_path / "sub1_mask.nii.gz"
    }
    dataset = NiftiSliceDataset(tmp_path, mask="*_mask.nii.gz", min_foreground=0.5)
    assert [v.path.name for v in dataset.volumes] == ["sub1.nii.gz"]
    assert dataset.volumes[0].slices.tolist() == [4, 5, 6, 7, 8]
    lo, hi = np.percentile(image[mask > 0], (1, 99))
    assert (dataset.volumes[0].lo, dataset.volumes[0].hi) == pytest.approx((lo, hi))
    single = NiftiSliceDataset(tmp_path / "sub1.nii.gz", mask=tmp_path / "sub1_mask.nii.gz")
    assert single.volumes[0].slices.tolist() == [4, 5, 6, 7, 8]


def test_missing_or_mismatched_mask(tmp_path):
    save(tmp_path / "a.nii", pyramid())
    save(tmp_path / "b.nii", pyramid())
    save(tmp_path / "b_mask.nii", np.ones((4, 4, 4)))
    with pytest.raises(UnreadableFileError, match=r"a\.nii: mask not found: a_mask\.nii"):
        NiftiSliceDataset(tmp_path, mask="*_mask.nii")
    dataset = NiftiSliceDataset(tmp_path, mask="*_mask.nii", on_error="skip")
    assert len(dataset) == 0
    reasons = dict(dataset.skipped.skipped)
    assert "mask not found" in reasons[str(tmp_path / "a.nii")]
    assert "has shape (4, 4, 4)" in reasons[str(tmp_path / "b.nii")]


def test_augmentation_profiles_and_callables(tmp_path):
    path = save(tmp_path / "p.nii", pyramid())
    plain = images(NiftiSliceDataset(path))
    seen = []

    def halve(tensor: torch.Tensor) -> torch.Tensor:
        seen.append(tuple(tensor.shape))
        return tensor * 0.5

    halved = images(NiftiSliceDataset(path, augment=halve))
    assert seen[0] == (1, SHAPE[1], SHAPE[0], 1)  # TorchIO's C x W x H x D, one slice deep
    for a, b in zip(halved, plain, strict=True):
        np.testing.assert_allclose(a, 0.5 * b, atol=1e-6)
    assert len(mri_augmentation("light").transforms) == 3
    torch.manual_seed(0)
    strong = images(NiftiSliceDataset(path, augment="strong"))
    assert all(
        a.shape == b.shape and 0 <= a.min() and a.max() <= 1
        for a, b in zip(strong, plain, strict=True)
    )
    assert any(np.abs(a - b).max() > 0.01 for a, b in zip(strong, plain, strict=True))
    with pytest.raises(ValueError, match="profile"):
        mri_augmentation("extreme")


def test_batches_collate_and_dataset_pickles(tmp_path):
    path = save(tmp_path / "p.nii.gz", pyramid())
    dataset = NiftiSliceDataset(path, image_size=32, channels=3)
    batch = next(iter(DataLoader(dataset, batch_size=4)))
    assert batch["image"].shape == (4, 3, 32, 32) and batch["label"].tolist() == [-1] * 4
    clone = pickle.loads(pickle.dumps(dataset))  # what "spawn" DataLoader workers receive
    assert torch.equal(clone[2]["image"], dataset[2]["image"])


# --------------------------------------------------------------------------- bad files


def make_bad_files(folder: Path) -> dict[str, tuple[Path, str]]:
    good = save(folder / "good.nii.gz", pyramid())
    packed = good.read_bytes()
    raw = gzip.decompress(packed)
    bad = {}
    (folder / "zero.nii").write_bytes(b"")
    bad["zero"] = (folder / "zero.nii", "empty")
    (folder / "truncated.nii.gz").write_bytes(packed[: len(packed) // 2])
    bad["truncated_gz"] = (folder / "truncated.nii.gz", "truncated or corrupt image data")
    (folder / "short.nii").write_bytes(raw[: 352 + 100])
    bad["truncated_nii"] = (folder / "short.nii", "truncated or corrupt image data")
    from PIL import Image

    Image.new("L", (16, 16)).save(folder / "photo.nii", format="PNG")
    bad["png"] = (folder / "photo.nii", "not a NIfTI file")
    (folder / "noise.nii").write_bytes(np.random.default_rng(0).bytes(2000))
    bad["corrupt_header"] = (folder / "noise.nii", "not a NIfTI file")
    return bad


def test_bad_files_raise_with_file_and_reason(tmp_path):
    for path, word in make_bad_files(tmp_path).values():
        with pytest.raises(UnreadableFileError) as caught:
            NiftiSliceDataset(path)
        message = str(caught.value)
        assert message.startswith(f"{path}: ") and word in message and "\n" not in message


def test_bad_files_are_skipped_and_counted(tmp_path):
    bad = make_bad_files(tmp_path)
    dataset = NiftiSliceDataset(tmp_path, on_error="skip")
    assert [v.path.name for v in dataset.volumes] == ["good.nii.gz"]
    assert sorted(p for p, _ in dataset.skipped.skipped) == sorted(str(p) for p, _ in bad.values())
    assert len(dataset) > 0 and len(list(dataset)) == len(dataset)  # never raises
    assert f"{len(bad)} file(s) skipped" in dataset.skipped.summary()


def test_file_removed_after_indexing_is_skipped_at_load(tmp_path):
    first = save(tmp_path / "a.nii", pyramid())
    save(tmp_path / "b.nii", pyramid())
    dataset = NiftiSliceDataset(tmp_path, on_error="skip")
    first.write_bytes(b"")
    sample = dataset[0]  # a slice of the readable volume stands in
    assert sample["meta"]["path"] == str(tmp_path / "b.nii")
    assert [p for p, _ in dataset.skipped.skipped] == [str(first)]
    strict = NiftiSliceDataset(tmp_path / "b.nii")
    (tmp_path / "b.nii").write_bytes(b"")
    with pytest.raises(UnreadableFileError, match="b.nii: empty file"):
        strict[0]


def test_pretraining_slices_keep_their_aspect_capped_on_the_shorter_side(tmp_path):
    """Axial slices of a 20 x 24 in-plane volume are 24 x 20 (rows x columns); capped at 10
    they are 12 x 10; under the cap they are the slice itself."""
    import torchvision.transforms.v2.functional as TF

    path = save(tmp_path / "p.nii", pyramid())
    kwargs = dict(min_foreground=0.0, foreground="nonzero")
    stored = NiftiSliceDataset(path, **kwargs)[8]["image"]
    capped = NiftiSliceDataset(path, image_size=10, resize="cap", **kwargs)[8]["image"]
    assert stored.shape == (1, 24, 20) and capped.shape == (1, 12, 10)
    assert torch.allclose(capped, TF.resize(stored, [10], antialias=True), atol=1e-6)
    same = NiftiSliceDataset(path, image_size=32, resize="cap", **kwargs)[8]["image"]
    assert torch.equal(same, stored)
