"""DICOM reader: real sample files of every modality, rendering rules checked against
independent computations, generated bad files in both error modes, and a PHI canary."""

from __future__ import annotations

import logging
import pickle
import traceback
import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.pixels import pixel_array
from pydicom.uid import MPEG2MPML, ExplicitVRLittleEndian, generate_uid

from medp2x.data.base import UnreadableFileError
from medp2x.data.dicom import (
    DicomDataset,
    find_dicom_files,
    pydicom_silenced,
    read_dicom_frame,
    read_dicom_info,
)

SAMPLES = Path(__file__).resolve().parents[2] / "shared" / "data" / "dicom_samples"
needs_samples = pytest.mark.skipif(
    not SAMPLES.is_dir(), reason=f"shared DICOM samples not found at {SAMPLES}"
)
COLOUR = {"RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT", "PALETTE COLOR"}
CANARIES = ("PHICANARY", "SECRET", "19010203", "PHICANARY123")


def frames_in_header(path: Path) -> int:
    header = dcmread(path, stop_before_pixels=True)
    return int(header.get("NumberOfFrames") or 1)


def write_dicom(path: Path, pixels: np.ndarray, **attributes) -> Path:
    """A minimal 16-bit MONOCHROME2 DX file written with pydicom, attributes overridable."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = (
        meta.MediaStorageSOPClassUID,
        meta.MediaStorageSOPInstanceUID,
    )
    ds.Modality = "DX"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    for key, value in attributes.items():
        setattr(ds, key, value)
    ds.PixelData = pixels.astype(np.uint16).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def ramp(rows: int = 32, cols: int = 48) -> np.ndarray:
    return (np.arange(rows * cols).reshape(rows, cols) * 4095 // (rows * cols - 1)).astype(
        np.uint16
    )


# --------------------------------------------------------------------------- real samples


@needs_samples
def test_every_sample_file_reads_as_a_sane_image():
    dataset = DicomDataset(SAMPLES)
    files = find_dicom_files(SAMPLES)
    assert dataset.files == files and len(dataset.skipped) == 0
    assert len(dataset) == sum(frames_in_header(f) for f in files)
    first = {}
    for index in range(len(dataset)):  # first and last frame of every file
        file_index = int(dataset._sample_file[index])
        first.setdefault(file_index, []).append(index)
    for file_index, indices in first.items():
        info = dataset.infos[file_index]
        for index in {indices[0], indices[-1]}:
            sample = dataset[index]
            image, name = sample["image"], dataset.files[file_index].name
            channels = 3 if info.photometric in COLOUR else 1
            assert image.dtype == torch.float32, name
            assert tuple(image.shape) == (channels, info.rows, info.columns), name
            assert torch.isfinite(image).all(), name
            assert image.min() >= 0 and image.max() <= 1, name
            p1, p99 = np.percentile(image[:, ::4, ::4].numpy(), (1, 99))
            assert p99 - p1 > 0.2, f"{name}: dynamic range {p1:.3f}..{p99:.3f}"
            assert sample["label"] == -1 and sample["meta"]["frame"] == int(
                dataset._sample_frame[index]
            )
    assert {info.modality for info in dataset.infos} == {"CR", "MG", "XA", "US", "MR", "CT"}


@needs_samples
def test_monochrome1_is_inverted_and_monochrome2_is_not():
    """The displayed image runs against the stored values for MONOCHROME1 (low = white)
    and with them for MONOCHROME2: a rank correlation with the raw pixels tells which."""
    cases = [(p, -1) for p in sorted((SAMPLES / "xray_CR").glob("*.dcm"))]
    cases += [(SAMPLES / "xray_MG" / "fodicom_OutOfBoundsOverlay.dcm", +1)]
    for path, sign in cases:
        assert dcmread(path, stop_before_pixels=True).PhotometricInterpretation == (
            "MONOCHROME1" if sign < 0 else "MONOCHROME2"
        )
        raw = pixel_array(path)[::8, ::8].astype(np.float64).ravel()
        shown = read_dicom_frame(path)[::8, ::8].astype(np.float64).ravel()
        rank = np.corrcoef(np.argsort(np.argsort(raw)), np.argsort(np.argsort(shown)))[0, 1]
        assert sign * rank > 0.5, f"{path.name}: rank correlation {rank:.2f}"


@needs_samples
def test_voi_window_follows_the_dicom_linear_formula():
    """CT with rescale, window 40/100 and padding: PS3.3 C.11.2.1.2.1 computed here."""
    path = SAMPLES / "CT" / "693_UNCR.dcm"
    header = dcmread(path)
    raw = header.pixel_array.astype(np.float64)
    hu = raw * float(header.RescaleSlope) + float(header.RescaleIntercept)
    center, width = float(header.WindowCenter), float(header.WindowWidth)
    expected = np.clip((hu - (center - 0.5)) / (width - 1) + 0.5, 0, 1)
    expected[raw == header.PixelPaddingValue] = 0
    assert (raw == header.PixelPaddingValue).any()
    np.testing.assert_allclose(read_dicom_frame(path), expected, atol=1e-5)


@needs_samples
def test_codecs_agree_with_uncompressed_and_colour_is_rgb():
    us = SAMPLES / "US_single"
    reference = read_dicom_frame(us / "pydicomdata_US1_UNCR.dcm")
    np.testing.assert_array_equal(read_dicom_frame(us / "pydicomdata_US1_J2KR.dcm"), reference)
    assert np.abs(read_dicom_frame(us / "pydicomdata_US1_J2KI.dcm") - reference).mean() < 0.02
    lossless = read_dicom_frame(SAMPLES / "xray_CR" / "RG3_J2KR.dcm")
    assert np.abs(read_dicom_frame(SAMPLES / "xray_CR" / "RG3_J2KI.dcm") - lossless).mean() < 0.02
    multi = SAMPLES / "US_multiframe"
    for frame in (0, 1):  # RLE == native, palette looked up from the LUT data here
        native = read_dicom_frame(multi / "pydicomdata_OBXXXX1A_2frame.dcm", frame)
        rle = read_dicom_frame(multi / "pydicomdata_OBXXXX1A_rle_2frame.dcm", frame)
        np.testing.assert_array_equal(native, rle)
    header = dcmread(multi / "pydicomdata_OBXXXX1A_2frame.dcm")
    indices = header.pixel_array[1]
    for channel, colour in enumerate(("Red", "Green", "Blue")):
        lut = np.frombuffer(header[f"{colour}PaletteColorLookupTableData"].value, "<u2")
        np.testing.assert_allclose(native[..., channel], lut[indices] / 65535, atol=1e-6)
    # JPEG baseline YBR_FULL_422 grey-scale echo: after YBR -> RGB the channels agree
    cine = read_dicom_frame(multi / "fodicom_DIRW0007_US65f.dcm", 30)
    assert cine.shape[-1] == 3 and np.abs(cine[..., 0] - cine[..., 1]).mean() < 0.02


@needs_samples
def test_frame_stride_and_modality_filter():
    dataset = DicomDataset(SAMPLES, modalities=("xa", "US"), frame_stride=10)
    kept = [
        f
        for f in find_dicom_files(SAMPLES)
        if dcmread(f, stop_before_pixels=True).Modality in ("XA", "US")
    ]
    assert dataset.files == kept
    assert len(dataset) == sum(-(-frames_in_header(f) // 10) for f in kept)
    assert dataset.excluded_by_modality == len(find_dicom_files(SAMPLES)) - len(kept)
    assert {int(f) % 10 for f in dataset._sample_frame} == {0}
    xa_frames = [
        int(f)
        for s, f in zip(dataset._sample_file, dataset._sample_frame, strict=True)
        if dataset.infos[s].frames == 96
    ]
    assert xa_frames == list(range(0, 96, 10))
    last = dataset[len(dataset) - 1]
    assert last["meta"]["modality"] in ("XA", "US")


@needs_samples
def test_channels_and_image_size_options():
    colour = SAMPLES / "US_single" / "pydicomdata_US1_UNCR.dcm"
    grey = SAMPLES / "MR" / "MR_small.dcm"
    assert DicomDataset(colour, channels=1)[0]["image"].shape == (1, 480, 640)
    three = DicomDataset(grey, channels=3, image_size=(40, 50))[0]["image"]
    assert three.shape == (3, 40, 50) and torch.equal(three[0], three[2])
    assert DicomDataset(grey, image_size=32)[0]["image"].shape == (1, 32, 32)


# --------------------------------------------------------------------------- synthetic files


def test_monochrome1_and_inverse_presentation_are_exact_inversions(tmp_path):
    pixels = ramp()
    window = {"WindowCenter": 2048, "WindowWidth": 4096}
    plain = read_dicom_frame(write_dicom(tmp_path / "m2.dcm", pixels, **window))
    mono1 = read_dicom_frame(
        write_dicom(tmp_path / "m1.dcm", pixels, PhotometricInterpretation="MONOCHROME1", **window)
    )
    inverse = read_dicom_frame(
        write_dicom(tmp_path / "inv.dcm", pixels, PresentationLUTShape="INVERSE", **window)
    )
    both = read_dicom_frame(
        write_dicom(
            tmp_path / "both.dcm",
            pixels,
            PhotometricInterpretation="MONOCHROME1",
            PresentationLUTShape="INVERSE",
            **window,
        )
    )
    np.testing.assert_allclose(plain, np.clip((pixels - 2047.5) / 4095 + 0.5, 0, 1), atol=1e-6)
    np.testing.assert_allclose(mono1, 1 - plain, atol=1e-6)
    np.testing.assert_allclose(inverse, 1 - plain, atol=1e-6)
    np.testing.assert_allclose(both, mono1, atol=1e-6)  # one instruction, applied once


def test_window_options_without_voi(tmp_path):
    pixels = ramp()
    pixels[0, 0] = 4095  # an outlier that min-max honours and percentiles ignore
    path = write_dicom(tmp_path / "a.dcm", pixels)
    values = pixels.astype(np.float64)
    lo, hi = np.percentile(values, (0.5, 99.5))
    expected = np.clip((values - lo) / (hi - lo), 0, 1)
    np.testing.assert_allclose(read_dicom_frame(path, window="voi"), expected, atol=1e-5)
    np.testing.assert_allclose(read_dicom_frame(path, window="percentile"), expected, atol=1e-5)
    minmax = (values - values.min()) / (values.max() - values.min())
    np.testing.assert_allclose(read_dicom_frame(path, window="minmax"), minmax, atol=1e-5)


def test_listing_suffixless_files_and_ignoring_bookkeeping(tmp_path):
    write_dicom(tmp_path / "IM0001", ramp())
    (tmp_path / "sub").mkdir()
    write_dicom(tmp_path / "sub" / "b.DCM", ramp())
    write_dicom(tmp_path / "DICOMDIR", ramp())
    (tmp_path / "README").write_text("not an image")
    (tmp_path / "notes.txt").write_text("not an image")
    assert find_dicom_files(tmp_path) == [tmp_path / "IM0001", tmp_path / "sub" / "b.DCM"]


def make_bad_files(folder: Path, template: Path) -> dict[str, tuple[Path, str]]:
    """Every way a file can be bad, with a word its reason must contain."""
    good = template.read_bytes()
    bad = {}
    (folder / "zero.dcm").write_bytes(b"")
    bad["zero"] = (folder / "zero.dcm", "empty")
    (folder / "truncated.dcm").write_bytes(good[: len(good) - 500])
    bad["truncated"] = (folder / "truncated.dcm", "truncated")
    from PIL import Image

    Image.new("L", (16, 16)).save(folder / "photo.dcm", format="PNG")
    bad["png"] = (folder / "photo.dcm", "not a DICOM file")
    header_only = dcmread(template)
    del header_only.PixelData
    header_only.save_as(folder / "header_only.dcm")
    bad["header_only"] = (folder / "header_only.dcm", "missing pixel data")
    mpeg = dcmread(template)
    mpeg.file_meta.TransferSyntaxUID = MPEG2MPML
    mpeg.PixelData = encapsulate([b"\x00\x00\x01\xb3" + bytes(60)])
    mpeg.save_as(folder / "mpeg.dcm")
    bad["mpeg"] = (folder / "mpeg.dcm", "unsupported transfer syntax MPEG2")
    return bad


def test_bad_files_raise_with_file_and_reason(tmp_path):
    template = write_dicom(tmp_path / "good.dcm", ramp())
    for path, word in make_bad_files(tmp_path, template).values():
        with pytest.raises(UnreadableFileError) as caught:
            DicomDataset(path, on_error="raise")
        message = str(caught.value)
        assert message.startswith(f"{path}: ") and word in message and "\n" not in message
        with pytest.raises(UnreadableFileError):
            read_dicom_info(path)


def test_bad_files_are_skipped_and_counted(tmp_path):
    template = write_dicom(tmp_path / "good.dcm", ramp())
    bad = make_bad_files(tmp_path, template)
    dataset = DicomDataset(tmp_path, on_error="skip")
    assert dataset.files == [template] and len(dataset) == 1
    assert sorted(p for p, _ in dataset.skipped.skipped) == sorted(str(p) for p, _ in bad.values())
    assert dataset[0]["image"].shape == (1, 32, 48) and len(list(dataset)) == 1
    assert f"{len(bad)} file(s) skipped" in dataset.skipped.summary()


def corrupt_jpeg_stream(source: Path, target: Path) -> Path:
    """Intact DICOM structure, broken JPEG inside: only decoding can find out."""
    data = bytearray(source.read_bytes())
    start = data.index(b"\xff\xd8\xff", data.rindex(b"\xe0\x7f\x10\x00"))
    data[start : start + 4] = b"\x00\x00\x00\x00"
    target.write_bytes(bytes(data))
    return target


@needs_samples
def test_decode_failure_after_indexing_in_both_modes(tmp_path):
    source = SAMPLES / "US_single" / "pydicomdata_JPGLosslessP14SV1_1s_1f_8b.dcm"
    broken = corrupt_jpeg_stream(source, tmp_path / "a_broken.dcm")
    good = write_dicom(tmp_path / "b_good.dcm", ramp())
    with pytest.raises(UnreadableFileError, match="a_broken.dcm: .*pixel data"):
        DicomDataset(tmp_path, on_error="raise")[0]
    dataset = DicomDataset(tmp_path, on_error="skip")
    assert len(dataset) == 2 and len(dataset.skipped) == 0  # the header is fine
    first, second = list(dataset)  # the readable frame stands in; iteration ends
    assert first["meta"]["path"] == second["meta"]["path"] == str(good)
    assert [path for path, _ in dataset.skipped.skipped] == [str(broken)]  # counted once


# --------------------------------------------------------------------------- PHI canary


def test_patient_identifiers_reach_no_output(tmp_path, caplog, capsys):
    phi = {
        "PatientName": "PHICANARY^SECRET",
        "PatientID": "PHICANARY123",
        "PatientBirthDate": "19010203",
        "StudyDate": "19010203",
        "AccessionNumber": "PHICANARY",
        "InstitutionName": "PHICANARY HOSPITAL",
        "ReferringPhysicianName": "PHICANARY^DOCTOR",
        "StudyDescription": "not a date PHICANARY",
        "WindowCenter": 2048,
        "WindowWidth": 4096,
    }
    folder = tmp_path / "study"
    folder.mkdir()
    with warnings.catch_warnings():  # writing the invalid date below warns, with its value
        warnings.simplefilter("ignore")
        good = write_dicom(folder / "good.dcm", ramp(), **phi, SeriesDate="PHICANARY")
        (folder / "broken.dcm").write_bytes(good.read_bytes()[:-700])
        header_only = dcmread(good)
        del header_only.PixelData
        header_only.save_as(folder / "header_only.dcm")
        # decodes badly at load time only
        corrupt = write_dicom(folder / "corrupt.dcm", ramp(), **phi, BitsStored=20, HighBit=19)
    outputs = []
    caplog.clear()  # from here on, only the reader runs
    capsys.readouterr()
    caplog.set_level(logging.DEBUG)
    pydicom.config.debug(True, default_handler=False)  # logs every element read, values too
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            cache = tmp_path / "index.json"
            dataset = DicomDataset(folder, on_error="skip", index_cache=cache)
            samples = [dataset[i] for i in range(len(dataset))]
            DicomDataset(folder, on_error="skip", index_cache=cache)  # from the cache
            for path in (folder / "broken.dcm", folder / "header_only.dcm", corrupt):
                try:
                    DicomDataset(path, on_error="raise")[0]
                except UnreadableFileError as error:
                    outputs.append("".join(traceback.format_exception(error)))
    finally:
        pydicom.config.debug(False)
    assert len(outputs) == 3  # every bad file raised
    outputs += [dataset.skipped.summary(), cache.read_text(), caplog.text]
    outputs += [str(w.message) for w in caught]
    outputs += [repr(s["meta"]) for s in samples]
    outputs.append(pickle.dumps(dataset).decode("latin-1"))  # what DataLoader workers get
    captured = capsys.readouterr()
    outputs += [captured.out, captured.err]
    assert len(samples) >= 1 and len(dataset.skipped) >= 2
    for text in outputs:
        for canary in CANARIES:
            assert canary not in text
    assert logging.getLogger("pydicom").level == logging.WARNING  # the silencing is undone
    assert pydicom.config.settings.reading_validation_mode == pydicom.config.WARN


def test_pydicom_is_silenced_while_reading(tmp_path, caplog):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        path = write_dicom(
            tmp_path / "a.dcm", ramp(), PatientName="PHICANARY^SECRET", StudyDate="PHICANARY"
        )
    caplog.clear()
    caplog.set_level(logging.DEBUG)
    pydicom.config.debug(True, default_handler=False)  # logs every element read, values too
    try:
        with warnings.catch_warnings(record=True) as inside:
            warnings.simplefilter("always")
            with pydicom_silenced():
                str(dcmread(path))  # reads, validates and prints every value
        silenced_log = caplog.text
        str(dcmread(path))
    finally:
        pydicom.config.debug(False)
    assert silenced_log == "" and inside == []
    assert "PHICANARY" in caplog.text  # without the guard pydicom does quote it


def test_index_cache_is_reused_and_invalidated(tmp_path, monkeypatch):
    first = write_dicom(tmp_path / "a.dcm", ramp())
    write_dicom(tmp_path / "b.dcm", ramp(16, 16))
    cache = tmp_path / "cache" / "index.json"
    built = DicomDataset(tmp_path, index_cache=cache)
    import medp2x.data.dicom as dicom_module

    def no_header_reads(path):
        raise AssertionError(f"header of {path} read despite the cache")

    monkeypatch.setattr(dicom_module, "read_dicom_info", no_header_reads)
    reused = DicomDataset(tmp_path, index_cache=cache)
    assert reused.infos == built.infos and len(reused) == len(built) == 2
    monkeypatch.undo()
    write_dicom(first, ramp(8, 8))  # changed on disk: read again
    assert DicomDataset(tmp_path, index_cache=cache).infos[0].rows == 8


def test_pretraining_frames_keep_their_aspect_capped_on_the_shorter_side(tmp_path):
    """A 32 x 48 frame capped at 16 is 16 x 24 (aspect kept, antialiased); under the cap it
    is the stored frame, pixel for pixel."""
    import torchvision.transforms.v2.functional as TF

    path = write_dicom(tmp_path / "a.dcm", ramp(32, 48))
    stored = DicomDataset(path)[0]["image"]
    capped = DicomDataset(path, image_size=16, resize="cap")[0]
    assert capped["image"].shape == (1, 16, 24) and capped["meta"]["height"] == 32
    assert torch.allclose(capped["image"], TF.resize(stored, [16], antialias=True), atol=1e-6)
    assert torch.equal(DicomDataset(path, image_size=64, resize="cap")[0]["image"], stored)
