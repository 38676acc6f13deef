"""Hardening (#21): hostile files refused before allocating, corrupt data refused, skip mode
that protects a run, splits that keep their own images. Each test fails on the readers before
the fix; every file here is a few hundred bytes, so the whole module takes a few seconds."""

from __future__ import annotations

import gzip
import struct
import sys
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import tifffile
import torch
from PIL import Image
from pydicom import dcmread
from pydicom.dataset import FileMetaDataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import stress  # noqa: E402  (the harness's file writers)

from medp2x.data.base import (
    DEFAULT_PIXEL_BUDGET,
    PIXEL_BUDGET_ENV,
    UnreadableFileError,
    drop_unreadable,
    pixel_budget,
)
from medp2x.data.dicom import DicomDataset, read_dicom_info
from medp2x.data.folder import ImageFileDataset, read_image
from medp2x.data.nifti import NiftiSliceDataset


# ----------------------------------------------------------------------------- builders
def png_declaring(path: Path, width: int, height: int) -> Path:
    """A valid PNG signature and IHDR declaring ``width`` x ``height`` RGB, and one empty
    IDAT: some hundred bytes that would ask the decoder for width x height x 3 bytes."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\0" * 64)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")
    )
    return path


def nifti_declaring(path: Path, shape: tuple[int, ...], dtype=np.uint8) -> Path:
    """A NIfTI header declaring ``shape`` with a few bytes of data after it."""
    header = nib.Nifti1Header()
    header.set_data_dtype(dtype)
    header.set_data_shape(shape)
    header.set_qform(np.eye(4), code=1)
    header["vox_offset"] = 352  # voxels right after the header and its extension flag
    raw = header.binaryblock + b"\0" * 4 + b"\0" * 64  # header, extension flag, a bit of data
    path.write_bytes(gzip.compress(raw) if path.name.endswith(".gz") else raw)
    return path


def write_volume(path: Path, data: np.ndarray) -> Path:
    nib.save(nib.Nifti1Image(data, np.eye(4)), path)
    return path


def dicom_file(path: Path, rows=16, cols=16, pixels: bytes | None = None, **attributes) -> Path:
    """A minimal 8-bit MONOCHROME2 DX file (the stress harness's writer), attributes overridable."""
    if pixels is None:
        pixels = (np.arange(rows * cols) % 251).astype(np.uint8).tobytes()
    return stress._dicom(path, rows, cols, bits=8, pixels=pixels, **attributes)


# ----------------------------------------------------------------------------- 2: bombs
def test_pixel_budget_has_a_stated_default_and_is_configurable(monkeypatch):
    monkeypatch.delenv(PIXEL_BUDGET_ENV, raising=False)
    assert pixel_budget() == DEFAULT_PIXEL_BUDGET == 1 << 27
    monkeypatch.setenv(PIXEL_BUDGET_ENV, "1000")
    assert pixel_budget() == 1000
    monkeypatch.setenv(PIXEL_BUDGET_ENV, "lots")
    with pytest.raises(ValueError, match=PIXEL_BUDGET_ENV):
        pixel_budget()


def test_png_declaring_a_huge_image_is_refused_before_decoding(tmp_path):
    bomb = png_declaring(tmp_path / "bomb.png", 12000, 12000)  # 432 M values, 300 bytes
    with pytest.raises(UnreadableFileError, match=r"bomb\.png: declared image size .*pixel budget"):
        read_image(bomb)


def test_stripped_tiff_over_the_budget_is_refused_with_channels_counted(tmp_path, monkeypatch):
    path = tmp_path / "wide.tif"
    tifffile.imwrite(path, np.zeros((64, 64, 3), np.uint8), photometric="rgb")
    monkeypatch.setenv(PIXEL_BUDGET_ENV, str(64 * 64 * 3 - 1))  # fits as pixels, not as values
    with pytest.raises(UnreadableFileError, match="pixel budget"):
        read_image(path)
    monkeypatch.setenv(PIXEL_BUDGET_ENV, str(64 * 64 * 3))
    assert read_image(path).shape == (64, 64, 3)


def test_nifti_header_declaring_30000_cubed_is_refused(tmp_path):
    nifti_declaring(tmp_path / "bomb.nii", (30000, 30000, 30000))
    with pytest.raises(UnreadableFileError, match=r"bomb\.nii: declared volume size"):
        NiftiSliceDataset(tmp_path)


def test_dicom_declaring_a_65535_square_frame_is_refused_at_indexing(tmp_path):
    path = dicom_file(tmp_path / "bomb.dcm", 65535, 65535, pixels=b"\0" * 16)
    with pytest.raises(UnreadableFileError, match=r"bomb\.dcm: declared frame size"):
        read_dicom_info(path)


# ----------------------------------------------------------------------------- 1, 4: corrupt data
def test_float_nifti_with_nan_background_reads_in_both_modes(tmp_path):
    data = np.random.default_rng(0).random((12, 12, 6)).astype(np.float32)
    data[:2] = np.nan  # SPM-style NaN background in an uncompressed float file (a memory map)
    data[-1, -1] = np.inf
    write_volume(tmp_path / "spm.nii", data)
    for mode in ("raise", "skip"):
        dataset = NiftiSliceDataset(tmp_path, min_foreground=0, on_error=mode)
        images = [dataset[i]["image"] for i in range(len(dataset))]
        assert len(images) == 6 and all(bool(torch.isfinite(x).all()) for x in images)
        assert len(dataset.skipped) == 0


def test_all_nan_volume_and_image_are_refused_not_blanked(tmp_path):
    write_volume(tmp_path / "nan.nii", np.full((8, 8, 4), np.nan, np.float32))
    with pytest.raises(UnreadableFileError, match="NaN"):
        NiftiSliceDataset(tmp_path)
    tifffile.imwrite(tmp_path / "nan.tif", np.full((8, 8), np.nan, np.float32))
    with pytest.raises(UnreadableFileError, match="NaN"):
        read_image(tmp_path / "nan.tif")


def test_nii_gz_failing_the_gzip_crc_is_refused(tmp_path):
    source = write_volume(tmp_path / "v.nii", np.arange(8 * 8 * 8, dtype=np.int16).reshape(8, 8, 8))
    packed = bytearray(gzip.compress(source.read_bytes()))
    packed[-8] ^= 0xFF  # the CRC-32 in the trailer: the deflate stream itself is intact
    source.unlink()
    (tmp_path / "v.nii.gz").write_bytes(bytes(packed))
    with pytest.raises(
        UnreadableFileError, match=r"v\.nii\.gz: corrupt gzip stream \(CRC check failed"
    ):
        NiftiSliceDataset(tmp_path, min_foreground=0)


def test_zero_dimension_nifti_is_refused(tmp_path):
    nifti_declaring(tmp_path / "flat.nii", (16, 0, 8))
    with pytest.raises(UnreadableFileError, match="flat.nii"):
        NiftiSliceDataset(tmp_path)


@pytest.mark.parametrize(
    ("attributes", "reason"),
    [({"NumberOfFrames": 0}, "Number of Frames"), ({"BitsAllocated": 1, "BitsStored": 1}, "1-bit")],
)
def test_dicom_without_frames_or_with_one_bit_pixels_is_refused(tmp_path, attributes, reason):
    path = dicom_file(tmp_path / "odd.dcm", **attributes)
    with pytest.raises(UnreadableFileError, match=reason):
        read_dicom_info(path)


def test_four_d_tiff_is_refused_not_read_as_its_first_plane(tmp_path):
    tifffile.imwrite(tmp_path / "stack.tif", np.zeros((2, 3, 16, 16), np.uint8))
    with pytest.raises(UnreadableFileError, match="stack of 2 images"):
        read_image(tmp_path / "stack.tif")


# ----------------------------------------------------------------------------- 7: old DICOM
def test_dicom_without_preamble_is_found_and_read(tmp_path):
    """ACR-NEMA-style exports: the data set without preamble, ``DICM`` or file meta."""
    full = dicom_file(tmp_path / "full.dcm")
    ds = dcmread(full)
    ds.file_meta, ds.preamble = FileMetaDataset(), None
    raw = tmp_path / "old" / "IM0001"
    raw.parent.mkdir()
    ds.save_as(raw, implicit_vr=True, little_endian=True, enforce_file_format=False)
    body = raw.read_bytes()
    assert body[128:132] != b"DICM" and body[:2] == b"\x08\x00"
    dataset = DicomDataset(raw.parent)
    np.testing.assert_allclose(dataset[0]["image"], DicomDataset(full)[0]["image"])


# ----------------------------------------------------------------------------- 3: splits
def test_bad_test_file_is_dropped_from_its_own_split_never_replaced_across(tmp_path):
    items = []
    for i in range(6):
        path = tmp_path / f"{i}.png"
        Image.fromarray(np.full((8, 8), 40 * i, np.uint8)).save(path)
        items.append((path, i % 2))
    (tmp_path / "3.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")  # in the test split
    dataset = ImageFileDataset(items, on_error="skip")
    train, test = (torch.utils.data.Subset(dataset, idx) for idx in ([0, 1, 2], [3, 4, 5]))
    clean = drop_unreadable(test)
    assert len(clean) == 2 and [p for p, _ in clean.dropped] == [str(tmp_path / "3.png")]
    served = {clean[i]["meta"]["path"] for i in range(len(clean))}
    assert served == {str(tmp_path / "4.png"), str(tmp_path / "5.png")}  # never a train image
    assert len(drop_unreadable(train)) == 3


def test_benchmark_test_split_drops_its_bad_file_and_the_table_says_so(tmp_path):
    from test_paper_datasets import make_busi

    from medp2x.data.paper import eval_data_factory, get
    from medp2x.eval.paper import _note_test_split, _report_dropped
    from medp2x.eval.splits import dataset_labels

    make_busi(tmp_path / "Dataset_BUSI_with_GT")
    _, test = eval_data_factory("us", data_dir=tmp_path)()
    victim = test.dataset.items[test.indices[0]][0]
    test_files = {test.dataset.items[i][0] for i in test.indices}
    victim.write_bytes(b"\x89PNG\r\n\x1a\n damaged")
    factory = eval_data_factory("us", data_dir=tmp_path)
    train, test = factory()
    assert len(test) == 2 and factory.dropped["train"] == []
    assert [path for path, _ in factory.dropped["test"]] == [str(victim)]
    served = {Path(test[i]["meta"]["path"]) for i in range(len(test))}
    assert served <= test_files - {victim}  # never a training image
    assert list(dataset_labels(test)) == [test[i]["label"] for i in range(len(test))]
    counts = _report_dropped(factory.dropped, tmp_path / "out")
    rows = [{}]
    _note_test_split(rows, get("us"), counts)
    assert "1 unreadable test file(s) dropped" in rows[0]["test_source"]
    assert rows[0]["n_dropped_test"] == 1 and rows[0]["n_dropped_train"] == 0
    assert str(victim) in (tmp_path / "out" / "skipped_files.txt").read_text()


def test_seen_files_record_accepts_file_names_that_are_not_utf8(tmp_path):
    """Found by make stress: a skip-mode run on a folder holding 'caf\\xe9.png' finished
    training, then died writing seen_files.json (UnicodeEncodeError)."""
    import os

    from medp2x.data.folder import ImageFolderDataset
    from medp2x.provenance import record_seen_files

    data = tmp_path / "data"
    data.mkdir()
    for name in ("a.png", os.fsdecode(b"caf\xe9.png")):
        Image.fromarray(np.full((8, 8), 99, np.uint8)).save(data / name)
    record_seen_files(tmp_path / "run", ImageFolderDataset(data), None)
    assert (tmp_path / "run" / "seen_files.json").is_file()
