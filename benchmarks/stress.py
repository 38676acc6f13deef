"""Fault injection (#21), the long part: ``make stress`` (or ``python benchmarks/stress.py``).

Tries the project the way a hostile user or a damaged hospital archive would, and prints one
table, ``tried / handled / crashed / hung / lost / executed / leaked`` per part:

1. **bad files**: a generator writes >= 200 bad files across every reader (image folders,
   NIfTI, DICOM, whole-slide images): zero-byte, truncated at seven points, bytes flipped,
   wrong extension, absurd headers and decompression bombs, NaN images, stacks, gzip CRC
   failures, odd DICOM geometry, dangling links and link loops, non-UTF-8 names. Each is read
   by the code ``medp2x scan`` runs (skip mode), one file at a time, in a child process under
   a memory cap (``RLIMIT_AS``) and a time limit. *handled*: a bad file named with a reason
   (or read, where it is readable: a NaN background, a DICOM without preamble); *lost*: a bad
   file accepted in silence, or a good one refused; *crashed*: the child died or raised
   something other than the reader's one-line error; *hung*: over the time limit.
   Then ``medp2x scan`` itself on every reader's folder of bad files.
2. **skip-mode pretraining** on folders mixing good and bad files (images, DICOM), under the
   memory cap: the run must finish and count what it skipped.
3. **kill -9** of a pretraining run at >= 10 random points, half of them while a checkpoint is
   being written; every session resumes, and the last one's encoder must equal, bit for bit,
   the encoder of a run that was never interrupted. *lost*: a session that could not resume,
   or a final encoder that differs.
4. **malicious checkpoints** (a pickle that runs ``os.system``) in every container (PyTorch
   zip, legacy PyTorch, plain pickle, protocol-0 pickle, NumPy ``.npy``/``.npz``, a tar) given
   to ``medp2x inspect``, ``surgery``, ``convert``, ``load_encoder`` and a run's resume.
   *executed*: the payload ran (its marker file exists); *handled*: refused in one line.
5. **PHI canary**: DICOM files whose patient name, ID, birth date (invalid, so pydicom's
   warnings would quote it), institution and accession number hold ``PHICANARY``; every
   output of every part (stdout, stderr, every file written) is searched for it. *leaked*:
   outputs that contain it.

6. **wrong settings** (#21, class 6): the bundle run with each wrong override (``--batch_size
   eight``, ``--image_size -8/3.5/0``, ``--lr nan``, ``--amp maybe``, ``--normalization
   bogus``, ``--epochs -1/0``, ``--batchsize``, ``--data_dir @scans``/``$scans``,
   ``--on_error maybe``, an output folder that is a file or lies under one) and the ``medp2x``
   command with unwritable outputs and a poisoned checkpoint. *handled*: exactly one
   ``error:`` line saying what was expected, no traceback, no advice to load unsafely.

All of the last five columns must be 0 (exit code 1 otherwise). The generator (``generate_bad_files``) is used by
``tests/test_hardening_stress.py`` on a small sample too. 509 s on a shared 2-core CPU.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import pickle
import random
import re
import resource
import shutil
import struct
import subprocess
import sys
import tarfile
import tempfile
import time
import warnings
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
CANARY = "PHICANARY"
MEMORY_CAP = 6 << 30  # bytes of address space per child (importing torch alone takes ~3.7 GB)
FILE_TIMEOUT = 60.0  # seconds for one file
TRUNCATIONS = (0.01, 0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95, 0.99)
FLIP_SEEDS = (1, 2, 3, 4, 5, 6)
READERS = ("folder", "nifti", "dicom", "wsi")


@dataclass
class Fault:
    """One generated file (or link) and what a correct reader does with it."""

    reader: str  # folder | nifti | dicom | wsi
    name: str  # fault class, e.g. "truncated 50%"
    path: str
    expect: str  # "refuse" (named with a reason), "read" (samples come back), "either"


@dataclass
class Row:
    part: str
    tried: int = 0
    handled: int = 0
    crashed: int = 0
    hung: int = 0
    lost: int = 0
    executed: int = 0
    leaked: int = 0
    notes: list[str] = field(default_factory=list)


# ----------------------------------------------------------------------------- valid files
def _png_bytes(shape=(32, 32, 3), dtype=np.uint8, seed=0) -> bytes:
    from io import BytesIO

    from PIL import Image

    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, np.iinfo(dtype).max, shape, dtype=dtype)
    buffer = BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def _image_bytes(fmt: str, seed: int = 0) -> bytes:
    from io import BytesIO

    import tifffile
    from PIL import Image

    rng = np.random.default_rng(seed)
    rgb = rng.integers(0, 255, (48, 40, 3), dtype=np.uint8)
    buffer = BytesIO()
    if fmt == "tif":
        tifffile.imwrite(buffer, rgb, photometric="rgb")
    elif fmt == "png16":
        Image.fromarray(rng.integers(0, 65535, (40, 40), dtype=np.uint16)).save(buffer, "PNG")
    else:
        Image.fromarray(rgb).save(buffer, {"jpg": "JPEG", "png": "PNG", "bmp": "BMP"}[fmt])
    return buffer.getvalue()


def _nifti_bytes(data: np.ndarray, gz: bool = False) -> bytes:
    """A NIfTI-1 file of ``data`` as nibabel writes it (vox_offset 352)."""
    import nibabel as nib

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / ("v.nii.gz" if gz else "v.nii")
        nib.save(nib.Nifti1Image(data, np.eye(4)), path)
        return path.read_bytes()


def _nifti_header(shape, dtype=np.uint8, tweak=None) -> bytes:
    import nibabel as nib

    header = nib.Nifti1Header()
    header.set_data_dtype(dtype)
    header.set_data_shape(shape)
    header["vox_offset"] = 352
    block = bytearray(header.binaryblock)
    if tweak:
        tweak(block)
    return bytes(block) + b"\0" * 4 + b"\0" * 64


def _dicom(path: Path, rows=32, cols=32, bits=16, pixels: bytes | None = None, phi=False, **extra):
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = extra.pop("syntax", ExplicitVRLittleEndian)
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = (
        meta.MediaStorageSOPClassUID,
        meta.MediaStorageSOPInstanceUID,
    )
    ds.Modality, ds.Rows, ds.Columns = "DX", rows, cols
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = bits, bits, bits - 1, 0
    if phi:
        ds.PatientName = f"{CANARY}^JANE"
        ds.PatientID = f"{CANARY}123"
        with warnings.catch_warnings():  # writing it, pydicom warns quoting the value
            warnings.simplefilter("ignore")
            ds.add_new(0x00100030, "DA", f"{CANARY}")  # invalid date: pydicom would quote it
        ds.InstitutionName = f"{CANARY} HOSPITAL"
        ds.AccessionNumber = f"{CANARY}42"
    for key, value in extra.items():
        setattr(ds, key, value)
    if pixels is None:
        dtype = np.uint16 if bits == 16 else np.uint8
        pixels = (np.arange(rows * cols) * 37 % 4000).astype(dtype).tobytes()
    ds.PixelData = pixels
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def dcmread_compressed(source: Path, target: Path, syntax) -> bytes:
    """``source`` re-encoded with ``syntax`` (pydicom's own RLE encoder)."""
    from pydicom import dcmread

    ds = dcmread(source)
    ds.compress(syntax)
    ds.save_as(target, enforce_file_format=True)
    return target.read_bytes()


def _slide(path: Path, seed: int = 0) -> Path:
    sys.path.insert(0, str(REPO))
    from medp2x.data.wsi import write_pyramidal_tiff

    rng = np.random.default_rng(seed)
    rgb = np.clip(rng.normal(240, 3, (768, 768, 3)), 0, 255).astype(np.uint8)
    rgb[150:650, 150:650] = np.clip(rng.normal((150, 80, 160), 15, (500, 500, 3)), 0, 255)
    return write_pyramidal_tiff(path, rgb, tile=256, levels=3)


# ----------------------------------------------------------------------------- damage
def _truncated(data: bytes, fraction: float) -> bytes:
    return data[: max(1, int(len(data) * fraction))]


def _flipped(data: bytes, seed: int, count: int = 24) -> bytes:
    rng = random.Random(seed)
    out = bytearray(data)
    for _ in range(count):
        i = rng.randrange(min(len(out), 64), len(out))  # past the magic: damaged, not foreign
        out[i] ^= 1 << rng.randrange(8)
    return bytes(out)


def _png_declaring(width: int, height: int) -> bytes:
    def chunk(kind: bytes, body: bytes) -> bytes:
        return (
            struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + chunk(b"IEND", b"")
    )


def _tiff_declaring(path: Path, width: int, height: int) -> None:
    """A 16 x 16 stripped TIFF whose ImageWidth / ImageLength say ``width`` x ``height``."""
    import tifffile

    tifffile.imwrite(path, np.zeros((16, 16), np.uint8))
    with tifffile.TiffFile(path) as tif:
        tags = {t.code: (t.valueoffset, t.dtype) for t in tif.pages[0].tags.values()}
    with open(path, "r+b") as handle:
        for code, value in ((256, width), (257, height)):
            offset, dtype = tags[code]
            handle.seek(offset)
            handle.write(struct.pack("<H" if int(dtype) == 3 else "<I", value))


def _bmp_declaring(width: int, height: int) -> bytes:
    header = struct.pack("<2sIHHI", b"BM", 62, 0, 0, 54)
    info = struct.pack("<IiiHHIIiiII", 40, width, height, 1, 24, 0, 0, 2835, 2835, 0, 0)
    return header + info + b"\0" * 8


# ----------------------------------------------------------------------------- the generator
def generate_bad_files(root: Path, quick: bool = False) -> list[Fault]:
    """Write the bad files (and a few readable oddities) under ``root/<reader>/<n>/`` - one
    folder per file, so each is read alone - and return what each is. ``quick``: one of each
    fault class (about 70 files), for the fast test."""
    import tifffile

    faults: list[Fault] = []
    cuts = TRUNCATIONS[::3] if quick else TRUNCATIONS
    flips = FLIP_SEEDS[:1] if quick else FLIP_SEEDS

    def put(reader: str, name: str, filename: str, data: bytes | None, expect: str) -> Path:
        folder = root / reader / f"{len(faults):03d}"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / filename
        if data is not None:
            path.write_bytes(data)
        faults.append(Fault(reader, name, str(path), expect))
        return path

    # image folders: every format, every damage
    for fmt in ("png", "jpg", "tif", "bmp", "png16"):
        good = _image_bytes(fmt)
        ext = "png" if fmt == "png16" else fmt
        put("folder", f"{fmt} zero bytes", f"zero.{ext}", b"", "refuse")
        for cut in cuts:
            # a JPEG cut near its end still decodes (libjpeg pads it): either is fine
            expect = "either" if cut >= 0.9 else "refuse"
            put("folder", f"{fmt} truncated {cut:.0%}", f"cut.{ext}", _truncated(good, cut), expect)
        for seed in flips:
            put("folder", f"{fmt} bytes flipped", f"flip.{ext}", _flipped(good, seed), "either")
    put("folder", "text named .png", "notes.png", b"patient list follows\n" * 20, "refuse")
    put(
        "folder",
        "NIfTI named .jpg",
        "scan.jpg",
        _nifti_bytes(np.zeros((8, 8, 8), np.int16)),
        "refuse",
    )
    put("folder", "PNG named .tif", "png.tif", _image_bytes("png"), "read")
    put("folder", "random bytes .bmp", "noise.bmp", os.urandom(4096), "refuse")
    for w, h in ((12000, 12000), (30000, 30000), (65535, 65535), (200000, 1)):
        put("folder", f"PNG bomb {w}x{h}", "bomb.png", _png_declaring(w, h), "refuse")
    for side in (16000, 30000):
        path = put("folder", f"stripped TIFF declaring {side}^2", "bomb.tif", None, "refuse")
        _tiff_declaring(path, side, side)
    put("folder", "BMP declaring 50000^2", "bomb.bmp", _bmp_declaring(50000, 50000), "refuse")
    for name, array, expect in (
        ("all-NaN float TIFF", np.full((16, 16), np.nan, np.float32), "refuse"),
        ("all-inf float TIFF", np.full((16, 16), np.inf, np.float32), "refuse"),
        (
            "NaN-background float TIFF",
            np.where(np.eye(16) > 0, np.nan, 0.5).astype(np.float32),
            "read",
        ),
        ("4-D TIFF", np.zeros((2, 3, 16, 16), np.uint8), "refuse"),
        ("3-D TIFF stack", np.zeros((5, 16, 16), np.uint8), "refuse"),
        ("empty TIFF", np.zeros((0, 16), np.uint8), "refuse"),
    ):
        path = put("folder", name, "odd.tif", None, expect)
        try:
            tifffile.imwrite(path, array)
        except Exception:  # tifffile refuses to write it: keep an empty file as the fault
            path.write_bytes(b"")
    put(
        "folder",
        "non-UTF-8 name, damaged",
        os.fsdecode(b"caf\xe9-\xff.png"),
        b"\x89PNG\r\n\x1a\nbad",
        "refuse",
    )
    link = put("folder", "dangling link", "gone.png", None, "refuse")
    link.symlink_to(link.parent / "missing.png")
    (link.parent / "ok.png").write_bytes(_image_bytes("png"))
    loop = put("folder", "symlink loop", "loop", None, "refuse")
    loop.symlink_to(loop.parent)
    (loop.parent / "ok.png").write_bytes(_image_bytes("png"))
    locked = put(
        "folder", "unreadable file (chmod 000)", "locked.png", _image_bytes("png"), "either"
    )
    locked.chmod(0)

    # NIfTI
    volume = np.random.default_rng(0).random((16, 16, 8)).astype(np.float32) * 100
    for gz in (False, True):
        ext = "nii.gz" if gz else "nii"
        good = _nifti_bytes(volume, gz)
        put("nifti", f".{ext} zero bytes", f"zero.{ext}", b"", "refuse")
        for cut in cuts:
            put(
                "nifti",
                f".{ext} truncated {cut:.0%}",
                f"cut.{ext}",
                _truncated(good, cut),
                "refuse",
            )
        for seed in flips:
            # flipped voxel bytes of an uncompressed file are undetectable: either
            put(
                "nifti",
                f".{ext} bytes flipped",
                f"flip.{ext}",
                _flipped(good, seed),
                "refuse" if gz else "either",
            )
        for shape in ((30000, 30000, 30000), (2000, 2000, 2000), (32767, 32767, 1)):
            put(
                "nifti",
                f".{ext} header declaring {shape}",
                f"bomb.{ext}",
                gzip.compress(_nifti_header(shape)) if gz else _nifti_header(shape),
                "refuse",
            )
        for shape in ((16, 0, 8), (0, 0, 0)):
            put(
                "nifti",
                f".{ext} zero dimension {shape}",
                f"flat.{ext}",
                gzip.compress(_nifti_header(shape)) if gz else _nifti_header(shape),
                "refuse",
            )
    packed = bytearray(_nifti_bytes(volume, gz=True))
    packed[-8] ^= 0xFF
    put("nifti", "gzip CRC failure", "crc.nii.gz", bytes(packed), "refuse")
    bomb = _nifti_bytes(np.zeros((8, 8, 8), np.uint8), gz=False) + b"\0" * (200 << 20)
    put(
        "nifti",
        "gzip bomb behind a small header",
        "gzbomb.nii.gz",
        gzip.compress(bomb, 9),
        "refuse",
    )
    nan_bg = volume.copy()
    nan_bg[:4] = np.nan
    put("nifti", "NaN background (SPM), float32 .nii", "spm.nii", _nifti_bytes(nan_bg), "read")
    put(
        "nifti",
        "all-NaN volume",
        "nan.nii",
        _nifti_bytes(np.full((8, 8, 4), np.nan, np.float32)),
        "refuse",
    )
    put(
        "nifti",
        "all-inf volume",
        "inf.nii",
        _nifti_bytes(np.full((8, 8, 4), np.inf, np.float32)),
        "refuse",
    )
    put("nifti", "2-D image", "slice.nii", _nifti_bytes(np.zeros((16, 16), np.int16)), "refuse")
    put(
        "nifti",
        "complex voxels",
        "complex.nii",
        _nifti_bytes(np.zeros((8, 8, 8), np.complex64)),
        "refuse",
    )

    def negative_dim(block: bytearray) -> None:
        struct.pack_into("<h", block, 42, -5)  # dim[1]

    put(
        "nifti",
        "negative dimension",
        "neg.nii",
        _nifti_header((8, 8, 8), tweak=negative_dim),
        "refuse",
    )
    put("nifti", "PNG named .nii", "png.nii", _image_bytes("png"), "refuse")
    put("nifti", "text named .nii.gz", "text.nii.gz", b"not gzip at all\n", "refuse")

    def inside_header(block: bytearray) -> None:
        struct.pack_into("<f", block, 108, 0.0)  # vox_offset 0: the header read as voxels

    put(
        "nifti",
        "voxel offset inside the header",
        "overlap.nii",
        _nifti_header((8, 8, 4), np.float32, inside_header) + b"\0" * 1024,
        "refuse",
    )

    # DICOM
    scratch = root / "_scratch"
    scratch.mkdir(parents=True, exist_ok=True)
    from pydicom.uid import RLELossless

    good = _dicom(scratch / "good.dcm").read_bytes()
    rle = dcmread_compressed(scratch / "good.dcm", scratch / "rle.dcm", RLELossless)
    put("dicom", "zero bytes", "zero.dcm", b"", "refuse")
    for label, data in (("native", good), ("RLE", rle)):
        for cut in cuts:
            put("dicom", f"{label} truncated {cut:.0%}", "cut.dcm", _truncated(data, cut), "refuse")
        for seed in flips:
            put("dicom", f"{label} bytes flipped", "flip.dcm", _flipped(data, seed), "either")
    put("dicom", "random bytes .dcm", "noise.dcm", os.urandom(2048), "refuse")
    put("dicom", "text .dcm", "notes.dcm", b"DICM? no\n" * 50, "refuse")
    for name, kwargs in (
        ("native frame declaring 65535^2", dict(rows=65535, cols=65535, pixels=b"\0" * 64)),
        (
            "RLE frame declaring 65535^2",
            dict(
                rows=65535,
                cols=65535,
                pixels=b"\xfe\xff\x00\xe0\x00\x00\x00\x00\xfe\xff\xdd\xe0\x00\x00\x00\x00",
                syntax=RLELossless,
            ),
        ),
        ("NumberOfFrames 0", dict(NumberOfFrames=0)),
        ("NumberOfFrames 10^6 (pixels missing)", dict(NumberOfFrames=1000000)),
        ("BitsAllocated 1", dict(bits=1, pixels=b"\xaa" * 128)),
        ("BitsAllocated 12", dict(bits=12, pixels=b"\0" * 1536)),
        ("SamplesPerPixel 4", dict(SamplesPerPixel=4)),
        ("unknown photometric", dict(PhotometricInterpretation="WEIRD")),
        ("Rows 0", dict(rows=0, pixels=b"")),
    ):
        put("dicom", name, "odd.dcm", _dicom(scratch / "odd.dcm", **kwargs).read_bytes(), "refuse")
    from pydicom import dcmread
    from pydicom.dataset import FileMetaDataset

    old = dcmread(scratch / "good.dcm")
    old.file_meta, old.preamble = FileMetaDataset(), None
    old.save_as(scratch / "IM0001", implicit_vr=True, little_endian=True, enforce_file_format=False)
    raw = (scratch / "IM0001").read_bytes()
    put("dicom", "no preamble (ACR-NEMA style)", "IM0001", raw, "read")
    put("dicom", "no preamble, truncated", "IM0002", _truncated(raw, 0.6), "refuse")
    put(
        "dicom",
        "PHI canary, readable",
        "phi.dcm",
        _dicom(scratch / "phi.dcm", phi=True).read_bytes(),
        "read",
    )
    put(
        "dicom",
        "PHI canary, truncated",
        "phi_cut.dcm",
        _truncated(_dicom(scratch / "phi2.dcm", phi=True).read_bytes(), 0.8),
        "refuse",
    )
    put(
        "dicom",
        "non-UTF-8 name, damaged",
        os.fsdecode(b"r\xf6ntgen.dcm"),
        _truncated(good, 0.5),
        "refuse",
    )

    # whole-slide images
    slide = _slide(scratch / "slide.tif").read_bytes()
    put("wsi", "zero bytes .svs", "zero.svs", b"", "refuse")
    for cut in cuts:
        put("wsi", f"slide truncated {cut:.0%}", "cut.tif", _truncated(slide, cut), "refuse")
    for seed in flips:
        put("wsi", "slide bytes flipped", "flip.tif", _flipped(slide, seed, count=400), "either")
    put("wsi", "random bytes .svs", "noise.svs", os.urandom(8192), "refuse")
    put("wsi", "text .ndpi", "notes.ndpi", b"slide? no\n" * 40, "refuse")
    path = put("wsi", "one corrupt tile", "partly.tif", slide, "partial")
    _corrupt_tile(path, 0)
    path = put("wsi", "all level-0 tiles corrupt", "level0.tif", slide, "refuse")
    _corrupt_tile(path, None)
    shutil.rmtree(scratch)
    return faults


def _corrupt_tile(path: Path, index: int | None) -> None:
    """Zero one level-0 tile of a pyramidal TIFF (``None``: all of them): the tissue in the
    middle of the slide is in tile 4 of a 3 x 3 grid."""
    import tifffile

    with tifffile.TiffFile(path) as tif:
        page = tif.pages[0]
        spans = list(zip(page.dataoffsets, page.databytecounts, strict=True))
    with open(path, "r+b") as handle:
        for k, (offset, count) in enumerate(spans):
            if index is None or k == 4:
                handle.seek(offset)
                handle.write(b"\0" * count)


# ----------------------------------------------------------------------------- part 1 worker
def read_one(fault: dict) -> dict:
    """What ``medp2x scan`` does with one file's folder: build the reader in skip mode, read
    every sample strictly. Returns the outcome; raises only on a reader bug."""
    from medp2x.commands.scan import open_dataset, scan_dataset

    args = argparse.Namespace(tile_size=128, mpp=None, min_tissue=0.05, modalities=None, mask=None)
    folder = Path(fault["path"]).parent
    try:
        dataset = open_dataset(fault["reader"], folder, args)
    except ValueError as err:  # "no images under ...": nothing readable in the folder
        if fault["path"] in str(err) or str(folder) in str(err):
            return {"named": True, "read": 0, "message": str(err)[:300]}
        raise
    report = scan_dataset(dataset)
    problems = dict(report.index_errors) | report.errors
    named = any(
        fault["path"] == p or fault["path"].startswith(p.rstrip("/") + "/") for p in problems
    )
    named = named or any(Path(p) == Path(fault["path"]) for p in problems)
    bugs = [r for p, r in problems.items() if p.startswith("sample ")]
    good = 1 if (folder / "ok.png").exists() else 0  # the folder's readable companion
    return {"named": named, "read": report.read - good, "bugs": bugs, "problems": len(problems)}


def worker(tasks_file: str, results_file: str) -> None:
    """Child process: read the faults listed in ``tasks_file`` one by one, appending one JSON
    line per file to ``results_file`` ("start" before, the outcome after)."""
    sys.path.insert(0, str(REPO))
    tasks = json.loads(Path(tasks_file).read_text())
    with open(results_file, "a", encoding="utf-8", errors="surrogateescape") as out:
        for index, fault in tasks:
            out.write(json.dumps({"start": index}) + "\n")
            out.flush()
            try:
                outcome = read_one(fault)
            except MemoryError:
                outcome = {"error": "MemoryError (the memory cap was reached)"}
            except Exception as err:
                outcome = {"error": f"{type(err).__name__}: {str(err)[:300]}"}
            out.write(json.dumps({"done": index, **outcome}, default=str) + "\n")
            out.flush()


def limit_memory() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_CAP, MEMORY_CAP))


def child(args: list[str], log: Path, timeout: float | None = None, env=None) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, __file__, *args],
        stdout=open(log, "ab"),
        stderr=subprocess.STDOUT,
        preexec_fn=limit_memory,
        cwd=str(log.parent),
        env=env,
    )


def judge(fault: Fault, outcome: dict) -> str:
    """handled / lost / crashed for one finished file."""
    if "error" in outcome or outcome.get("bugs"):
        return "crashed"
    named, read = outcome["named"], outcome["read"]
    if fault.expect == "refuse":
        return "handled" if named else "lost"
    if fault.expect == "read":
        return "handled" if read > 0 and not named else "lost"
    if fault.expect == "partial":
        return "handled" if read > 0 and named else "lost"
    return "handled"  # either: read or named, as long as nothing crashed


def run_bad_files(work: Path, faults: list[Fault], rows: list[Row], outputs: list[Path]) -> None:
    row = Row("bad files, read one by one (scan's reader, skip mode)")
    tasks = [(i, asdict(f)) for i, f in enumerate(faults)]
    results: dict[int, dict] = {}
    status: dict[int, str] = {}
    pending = list(tasks)
    log = work / "worker.log"
    outputs.append(log)
    while pending:
        tasks_file, results_file = work / "tasks.json", work / "results.jsonl"
        tasks_file.write_text(json.dumps(pending))
        results_file.unlink(missing_ok=True)
        process = child(["--worker", str(tasks_file), str(results_file)], log)
        current, last_progress = None, time.monotonic()
        seen_lines = 0
        while True:
            time.sleep(0.05)
            lines = (
                results_file.read_text(errors="surrogateescape").splitlines()
                if results_file.exists()
                else []
            )
            for line in lines[seen_lines:]:
                record = json.loads(line)
                if "start" in record:
                    current, last_progress = record["start"], time.monotonic()
                else:
                    results[record["done"]] = record
                    current, last_progress = None, time.monotonic()
            seen_lines = len(lines)
            if process.poll() is not None:
                break
            if current is not None and time.monotonic() - last_progress > FILE_TIMEOUT:
                process.kill()
                process.wait()
                status[current] = "hung"
                break
        if current is not None and current not in results and current not in status:
            status[current] = "crashed"  # the child died while reading it (abort, signal)
            results[current] = {"error": f"child exit code {process.returncode}"}
        done = set(results) | set(status)
        pending = [(i, f) for i, f in pending if i not in done]
    for i, fault in enumerate(faults):
        verdict = status.get(i) or judge(fault, results[i])
        row.tried += 1
        setattr(row, verdict, getattr(row, verdict) + 1)
        if verdict != "handled":
            row.notes.append(
                f"{verdict}: {fault.reader} {fault.name} ({fault.expect}): {results.get(i)}"
            )
    rows.append(row)


def run_scan_cli(work: Path, faults: list[Fault], rows: list[Row], outputs: list[Path]) -> None:
    """``medp2x scan`` on each reader's folder of bad files at once, under the memory cap."""
    row = Row("`medp2x scan` on each reader's folder of bad files")
    for reader in READERS:
        folder = work / "files" / reader
        log = work / f"scan_{reader}.log"
        log.unlink(missing_ok=True)
        outputs.append(log)
        row.tried += 1
        process = subprocess.Popen(
            [sys.executable, "-m", "medp2x", "scan", str(folder), "--kind", reader, "--tile-size", "128"],
            stdout=open(log, "wb"), stderr=subprocess.STDOUT, preexec_fn=limit_memory,
            env={**os.environ, "LC_ALL": "C.UTF-8", "PYTHONUTF8": "0", "PYTHONIOENCODING": "utf-8:strict"},
        )  # fmt: skip
        try:
            rc = process.wait(timeout=FILE_TIMEOUT * 10)
        except subprocess.TimeoutExpired:
            process.kill()
            row.hung += 1
            continue
        text = log.read_bytes().decode("utf-8", "replace")
        expected = [f for f in faults if f.reader == reader and f.expect == "refuse"]
        unnamed = [
            f
            for f in expected
            if Path(f.path)
            .name.encode("utf-8", "surrogateescape")
            .decode("utf-8", "backslashreplace")
            not in text
        ]
        if rc != 1 or "Traceback" in text:
            row.crashed += 1
            row.notes.append(f"scan {reader}: exit {rc}: {text[-400:]}")
        elif unnamed:
            row.lost += 1
            row.notes.append(
                f"scan {reader}: {len(unnamed)} bad file(s) not named, e.g. {unnamed[0].name}"
            )
        else:
            row.handled += 1
    rows.append(row)


# ----------------------------------------------------------------------------- part 2, 3
class Blobs:
    """Deterministic synthetic images for the kill test (as tests/test_engine.py)."""

    def __init__(self, n: int = 24, size: int = 32):
        import torch

        g = torch.Generator().manual_seed(0)
        self.images = [torch.rand(3, size, size, generator=g) for _ in range(n)]

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict:
        return {"image": self.images[i], "label": -1, "meta": {"index": i}}


def widen_checkpoint_writes(torch) -> None:
    """Make each checkpoint write take about half a second (1 MiB at a time, 5 ms apart), so
    that a kill lands inside one reliably: the window a real save on a slow disk has."""
    import io

    real_save = torch.save

    def slow_save(obj, f, *args, **kwargs):
        if isinstance(f, (str, os.PathLike)):
            return real_save(obj, f, *args, **kwargs)
        buffer = io.BytesIO()
        real_save(obj, buffer, *args, **kwargs)
        data = buffer.getvalue()
        for start in range(0, len(data), 1 << 20):
            f.write(data[start : start + (1 << 20)])
            f.flush()
            time.sleep(0.005)

    torch.save = slow_save


def pretrain_child(kind: str, data: str, out: str) -> None:
    """Child: one tiny pretraining run (``kind``: blobs | folder | dicom), skip mode."""
    sys.path.insert(0, str(REPO))
    import torch

    from medp2x.engine import PretrainConfig, pretrain

    torch.set_num_threads(1)
    if kind == "blobs":
        dataset, epochs, every = Blobs(), 12, 1
        if os.environ.get("STRESS_SLOW_SAVE"):
            widen_checkpoint_writes(torch)
    elif kind == "folder":
        from medp2x.data.folder import ImageFolderDataset

        dataset = ImageFolderDataset(data, on_error="skip", image_size=32, resize="cap")
        epochs, every = 1, 0
    else:
        from medp2x.data.dicom import DicomDataset

        dataset = DicomDataset(data, on_error="skip", image_size=32, resize="cap")
        epochs, every = 1, 0
    summary = pretrain(
        PretrainConfig(
            dataset=dataset, output_dir=out, method="simclr", profile="tiny", arch="resnet18",
            image_size=32, batch_size=8, epochs=epochs, progress=False, checkpoint_every=every,
            n_saved=2, amp=False, seed=0,
        )
    )  # fmt: skip
    skipped = getattr(dataset, "skipped", [])
    print(f"finished {summary.iterations} iterations; {len(skipped)} file(s) skipped")
    Path(out, "skipped.json").write_text(
        json.dumps([list(s) for s in getattr(skipped, "skipped", [])])
    )


def run_skip_pretraining(
    work: Path, faults: list[Fault], rows: list[Row], outputs: list[Path]
) -> None:
    row = Row("pretraining in skip mode on good + bad files (memory cap)")
    for kind in ("folder", "dicom"):
        data = work / f"mixed_{kind}"
        data.mkdir()
        if kind == "folder":
            for i in range(16):
                (data / f"good_{i}.png").write_bytes(_image_bytes("png", seed=i))
        else:
            for i in range(16):
                _dicom(data / f"good_{i}.dcm", phi=True)
        bad = [
            f
            for f in faults
            if f.reader == kind and f.expect == "refuse" and not Path(f.path).is_symlink()
        ]
        for n, fault in enumerate(bad):
            source = Path(fault.path)
            if source.is_file() and os.access(source, os.R_OK):
                shutil.copy(source, data / f"bad_{n}_{source.name}")
        out = work / f"run_{kind}"
        log = work / f"run_{kind}.log"
        outputs += [log, out]
        row.tried += 1
        process = child(["--pretrain", kind, str(data), str(out)], log)
        try:
            rc = process.wait(timeout=900)
        except subprocess.TimeoutExpired:
            process.kill()
            row.hung += 1
            continue
        text = log.read_text(errors="replace")
        skipped = (
            json.loads((out / "skipped.json").read_text())
            if (out / "skipped.json").exists()
            else []
        )
        if rc != 0 or "Traceback" in text:
            row.crashed += 1
            row.notes.append(f"skip-mode run {kind}: exit {rc}: {text[-600:]}")
        elif len(skipped) < len(bad):
            row.lost += 1
            row.notes.append(
                f"skip-mode run {kind}: {len(skipped)} of {len(bad)} bad files counted"
            )
        else:
            row.handled += 1
            row.notes.append(f"skip-mode run {kind}: finished, {len(skipped)} bad file(s) counted")
    rows.append(row)


def run_kills(work: Path, rows: list[Row], outputs: list[Path], kills: int, seed: int) -> None:
    import torch

    row = Row(
        f"kill -9 during pretraining ({kills} kills at random points, in checkpoint writes too)"
    )
    rng = random.Random(seed)
    reference, killed = work / "uninterrupted", work / "killed"
    log = work / "kills.log"
    outputs += [log, reference, killed]
    child(["--pretrain", "blobs", "", str(reference)], log).wait()
    checkpoints = killed / "checkpoints"
    writes = 0
    slow_env = {**os.environ, "STRESS_SLOW_SAVE": "1"}  # same bytes, written slowly
    for k in range(kills):
        row.tried += 1
        before = {p.name for p in checkpoints.glob("*.pt")} if checkpoints.exists() else set()
        process = child(["--pretrain", "blobs", "", str(killed)], log, env=slow_env)
        in_write = k % 2 == 1
        deadline = time.monotonic() + 300
        while process.poll() is None and time.monotonic() < deadline:
            names = {p.name for p in checkpoints.iterdir()} if checkpoints.exists() else set()
            if in_write and any(n.startswith("tmp") for n in names):
                break  # a checkpoint is being written right now
            if not in_write and names - before - {n for n in names if n.startswith("tmp")}:
                time.sleep(rng.uniform(0.0, 1.5))  # somewhere after this session's first save
                break
            time.sleep(0.002)
        if process.poll() is not None:
            row.notes.append(
                f"kill {k + 1}: the session ended before it was killed (exit {process.returncode})"
            )
            if process.returncode != 0:
                row.lost += 1  # a session that could not resume
            else:
                row.tried -= 1  # the run finished first: not a kill
            continue
        process.kill()
        process.wait()
        # a temporary file left behind: the kill landed inside a checkpoint write
        writes += any(n.startswith("tmp") for n in os.listdir(checkpoints))
        row.handled += 1
    row.notes.append(f"{writes} of {kills} kills landed while a checkpoint was being written")
    final = child(["--pretrain", "blobs", "", str(killed)], log).wait()
    same = False
    if final == 0 and (killed / "encoder.pt").exists():
        a = torch.load(reference / "encoder.pt", weights_only=True)
        b = torch.load(killed / "encoder.pt", weights_only=True)
        a, b = a.get("state_dict", a), b.get("state_dict", b)
        same = a.keys() == b.keys() and all(
            torch.equal(a[n], b[n]) for n in a if torch.is_tensor(a[n])
        )
    if not same:
        row.lost += 1
        row.handled -= 1
        row.notes.append(
            f"after {kills} kills the final run (exit {final}) did not reproduce the uninterrupted encoder"
        )
    else:
        row.notes.append(
            f"after {kills} kills the resumed run's encoder equals the uninterrupted one bit for bit"
        )
    rows.append(row)


# ----------------------------------------------------------------------------- part 4
class Payload:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def malicious_files(folder: Path, marker: Path) -> list[Path]:
    """The same code-executing object in every container a checkpoint can arrive in."""
    import torch

    folder.mkdir(parents=True, exist_ok=True)
    payload = {"state_dict": {"conv1.weight": torch.zeros(1)}, "evil": Payload(str(marker))}
    files = []
    path = folder / "zip.pth"
    torch.save(payload, path)
    files.append(path)
    path = folder / "legacy.pth"
    torch.save(payload, path, _use_new_zipfile_serialization=False)
    files.append(path)
    for protocol in (0, 2, 5):
        path = folder / f"pickle{protocol}.pkl"
        path.write_bytes(pickle.dumps(payload, protocol=protocol))
        files.append(path)
    path = folder / "object.npy"
    np.save(path, np.array([Payload(str(marker))], dtype=object), allow_pickle=True)
    files.append(path)
    path = folder / "object.npz"
    np.savez(path, w=np.array([Payload(str(marker))], dtype=object))
    files.append(path)
    path = folder / "archive.pth.tar"
    with tarfile.open(path, "w") as tar:
        tar.add(folder / "pickle2.pkl", arcname="pickle")
    files.append(path)
    path = folder / "renamed.pt"  # a pickle under a PyTorch name
    path.write_bytes(pickle.dumps(payload, protocol=2))
    files.append(path)
    return files


def checkpoint_child(which: str, path: str, work: str) -> None:
    """Child: hand one malicious file to one loader; one line on stdout, never a traceback."""
    sys.path.insert(0, str(REPO))
    from medp2x.cli import main

    out = Path(work) / "out.pt"
    if which == "load_encoder":
        from medp2x.checkpoints import load_encoder

        try:
            load_encoder(path)
        except (ValueError, FileNotFoundError) as err:
            print(f"refused: {err}")
            return
        print("LOADED")
        return
    argv = {
        "inspect": ["inspect", path],
        "surgery": ["surgery", path, str(out)],
        "convert": ["convert", path, str(out)],
    }[which]
    rc = main(argv)
    print(f"rc {rc}")


def run_malicious(work: Path, rows: list[Row], outputs: list[Path]) -> None:
    row = Row("malicious checkpoints in every container x every loader")
    marker = work / "EXECUTED"
    files = malicious_files(work / "malicious", marker)
    for path in files:
        for which in ("inspect", "surgery", "convert", "load_encoder"):
            row.tried += 1
            log = work / f"malicious_{path.name}_{which}.log"
            outputs.append(log)
            process = child(["--checkpoint", which, str(path), str(work)], log)
            try:
                process.wait(timeout=300)
            except subprocess.TimeoutExpired:
                process.kill()
                row.hung += 1
                continue
            text = log.read_text(errors="replace")
            if marker.exists():
                row.executed += 1
                row.notes.append(f"EXECUTED: {which} {path.name}")
                marker.unlink()
            elif "Traceback" in text or process.returncode != 0:
                row.crashed += 1
                row.notes.append(f"{which} {path.name}: exit {process.returncode}: {text[-300:]}")
            elif "LOADED" in text or "rc 0" in text:
                row.lost += 1
                row.notes.append(f"{which} {path.name}: accepted")
            else:
                row.handled += 1
    # resume: the poisoned file as a run's newest checkpoint, in each container
    for path in files[:3]:
        row.tried += 1
        run = work / f"resume_{path.stem}"
        log = work / f"resume_{path.stem}.log"
        outputs += [log, run]
        (run / "checkpoints").mkdir(parents=True)
        shutil.copy(path, run / "checkpoints" / "checkpoint_999.pt")
        rc = child(["--pretrain", "blobs", "", str(run)], log).wait()
        text = log.read_text(errors="replace")
        if marker.exists():
            row.executed += 1
            marker.unlink()
        elif rc != 0 or "Traceback" in text:
            row.crashed += 1
            row.notes.append(f"resume {path.name}: exit {rc}: {text[-300:]}")
        elif "checkpoint_999.pt skipped: refused" in text or "skipped:" in text:
            row.handled += 1
        else:
            row.lost += 1
            row.notes.append(f"resume {path.name}: not named")
    rows.append(row)


# ----------------------------------------------------------------------------- part 5
def count_leaks(outputs: list[Path]) -> tuple[int, int, list[str]]:
    """(outputs searched, outputs holding the canary, their names). Files are searched as raw
    bytes; zip members (PyTorch checkpoints) are stored uncompressed, gz files are opened."""
    needle = CANARY.encode()
    searched, leaked, names = 0, 0, []
    files = []
    for output in outputs:
        if output.is_dir():
            files += [p for p in output.rglob("*") if p.is_file()]
        elif output.exists():
            files.append(output)
    for file in files:
        searched += 1
        data = file.read_bytes()
        if file.suffix == ".gz":
            try:
                data += gzip.decompress(data)
            except OSError:
                pass
        if needle in data or needle.lower() in data.lower():
            leaked += 1
            names.append(str(file))
    return searched, leaked, names


# ----------------------------------------------------------------------------- main
# ----------------------------------------------------------------------------- part 6
def settings_cases(work: Path) -> list[tuple[list[str], str]]:
    """(command, what its one line must say): wrong overrides of the bundle, output paths that
    cannot be written, a poisoned checkpoint given to the ``medp2x`` command."""
    base = work / "settings"
    (base / "a_file").write_text("not a folder")
    (base / "folder").mkdir(exist_ok=True)
    bundle = [sys.executable, "-m", "monai.bundle", "run", "--config_file", "bundles/p2x_histo.json",
              "--data_dir", str(base / "no_data"), "--output_dir", str(base / "run")]  # fmt: skip
    medp2x = [sys.executable, "-m", "medp2x"]
    ckpt, poisoned = str(base / "r18.pth"), str(base / "poisoned.pt")
    cases = [
        (["--batch_size", "eight"], "batch_size = 'eight' is not allowed"),
        (["--image_size", "-8"], "image_size = -8 is not allowed"),
        (["--image_size", "3.5"], "image_size = 3.5 is not allowed"),
        (["--image_size", "0"], "image_size = 0 is not allowed"),
        (["--lr", "nan"], "lr = "),
        (["--amp", "maybe"], "amp = 'maybe' is not allowed"),
        (["--normalization", "bogus"], "normalization = 'bogus' is not allowed"),
        (["--epochs", "-1"], "epochs = -1 is not allowed"),
        (["--epochs", "0"], "epochs = 0 is not allowed"),
        (["--batchsize", "8"], "did you mean batch_size?"),
        (["--data_dir", "@scans"], "write './@scans'"),
        (["--data_dir", "$scans"], "write './$scans'"),
        (["--on_error", "maybe"], "on_error = 'maybe' is not allowed"),
        (["--output_dir", str(base / "a_file")], "is a file, not a folder"),
        (["--output_dir", str(base / "a_file" / "run")], "cannot be created"),
    ]
    commands = [(bundle + extra, said) for extra, said in cases]
    commands += [
        (medp2x + ["surgery", ckpt, str(base / "folder")], "cannot write"),
        (medp2x + ["surgery", ckpt, str(base / "a_file" / "out.pth")], "cannot write"),
        (medp2x + ["inspect", poisoned], "refused"),
    ]
    return commands


def run_settings(work: Path, rows: list[Row], outputs: list[Path]) -> None:
    """Each wrong setting or unwritable output: exit 2 and one line naming it, no traceback."""
    (work / "settings").mkdir(parents=True, exist_ok=True)
    base = work / "settings"
    subprocess.run(
        [sys.executable, "-c", "import sys, torch, torchvision\n"
         "torch.save(torchvision.models.resnet18().state_dict(), sys.argv[1])\n"
         "class Evil:\n    def __reduce__(self):\n        return (print, ('EXECUTED',))\n"
         "torch.save({'model': {}, 'x': Evil()}, sys.argv[2])", str(base / "r18.pth"),
         str(base / "poisoned.pt")],
        check=True, cwd=REPO,
    )  # fmt: skip
    row = Row("wrong settings, unwritable outputs, poisoned checkpoint: one line each")
    cases = settings_cases(work)
    logs = [base / f"case_{i}.log" for i in range(len(cases))]
    running: list[tuple[subprocess.Popen, int]] = []
    for i, (command, _) in enumerate(cases):
        while len(running) >= 2:  # two at a time: each is a fresh interpreter importing torch
            running[0][0].wait()
            running.pop(0)
        process = subprocess.Popen(
            command, cwd=REPO, stdout=open(logs[i], "wb"), stderr=subprocess.STDOUT,
            preexec_fn=limit_memory,
        )  # fmt: skip
        running.append((process, i))
    for process, _ in running:
        process.wait()
    for (command, said), log in zip(cases, logs, strict=True):
        outputs.append(log)
        text = log.read_text(errors="replace")
        row.tried += 1
        errors = [line for line in text.splitlines() if re.match(r"(?:[\w ]+: )?error: ", line)]
        what = " ".join(command[10:] if "monai.bundle" in command else command[3:])
        if "Traceback" in text or "EXECUTED" in text:
            row.crashed += "Traceback" in text
            row.executed += "EXECUTED" in text
            row.notes.append(f"{what}: {text[-300:]}")
        elif len(errors) != 1 or said not in errors[0] or "weights_only=False" in text:
            row.lost += 1
            row.notes.append(f"{what}: expected one line with {said!r}, got {errors}")
        else:
            row.handled += 1
    rows.append(row)


def print_table(rows: list[Row]) -> str:
    head = "| part | tried | handled | crashed | hung | lost | executed | leaked |"
    lines = [head, "|---|---:|---:|---:|---:|---:|---:|---:|"]
    total = Row("**total**")
    for row in rows:
        lines.append(
            f"| {row.part} | {row.tried} | {row.handled} | {row.crashed} | {row.hung} | {row.lost} | {row.executed} | {row.leaked} |"
        )
        for key in ("tried", "handled", "crashed", "hung", "lost", "executed", "leaked"):
            setattr(total, key, getattr(total, key) + getattr(row, key))
    lines.append(
        f"| {total.part} | {total.tried} | {total.handled} | {total.crashed} | {total.hung} | {total.lost} | {total.executed} | {total.leaked} |"
    )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--work", help="working folder (default: a temporary one, removed)")
    parser.add_argument("--kills", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="one file per fault class, 2 kills")
    parser.add_argument(
        "--parts",
        default="files,scan,skip,kills,checkpoints,settings",
        help="parts to run, comma-separated",
    )
    parser.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    parser.add_argument("--pretrain", nargs=3, help=argparse.SUPPRESS)
    parser.add_argument("--checkpoint", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(*args.worker)
        return 0
    if args.pretrain:
        pretrain_child(*args.pretrain)
        return 0
    if args.checkpoint:
        checkpoint_child(*args.checkpoint)
        return 0
    sys.path.insert(0, str(REPO))
    work = Path(args.work or tempfile.mkdtemp(prefix="medp2x_stress_"))
    work.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    rows: list[Row] = []
    outputs: list[Path] = []
    with warnings.catch_warnings():  # pydicom warns, quoting the canary, as it writes them
        warnings.simplefilter("ignore")
        faults = generate_bad_files(work / "files", quick=args.quick)
    print(f"generated {len(faults)} bad files in {work / 'files'}", flush=True)
    parts = set(args.parts.split(","))
    if "files" in parts:
        run_bad_files(work, faults, rows, outputs)
        print("bad files read", flush=True)
    if "scan" in parts:
        run_scan_cli(work, faults, rows, outputs)
        print("scans done", flush=True)
    if "skip" in parts:
        run_skip_pretraining(work, faults, rows, outputs)
        print("skip-mode runs done", flush=True)
    if "kills" in parts:
        run_kills(work, rows, outputs, 2 if args.quick else args.kills, args.seed)
        print("kills done", flush=True)
    if "checkpoints" in parts:
        run_malicious(work, rows, outputs)
    if "settings" in parts:
        run_settings(work, rows, outputs)
        print("settings done", flush=True)
    searched, leaked, names = count_leaks(outputs)
    canary = Row(
        "PHI canary in every output (stdout, stderr, every file written)",
        tried=searched,
        handled=searched - leaked,
        leaked=leaked,
    )
    canary.notes += [f"leaked: {n}" for n in names]
    rows.append(canary)
    table = print_table(rows)
    print()
    print(table)
    for row in rows:
        for note in row.notes:
            print(f"- {row.part}: {note}")
    print(f"\n{time.monotonic() - start:.0f} s; work folder {work}")
    (work / "stress.md").write_text(table + "\n")
    bad = sum(r.crashed + r.hung + r.lost + r.executed + r.leaked for r in rows)
    if not args.work:
        for path in work.rglob("*"):
            if not path.is_symlink():
                path.chmod(0o755)
        shutil.rmtree(work, ignore_errors=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
