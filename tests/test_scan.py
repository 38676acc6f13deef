"""``medp2x scan``: exit codes, what it prints, and how it picks the reader."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medp2x.cli import main
from medp2x.commands.scan import detect_kind
from medp2x.data.wsi import write_pyramidal_tiff

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
RNG = np.random.default_rng(0)


def image_folder(root: Path, bad: bool) -> Path:
    for label in ("cats", "dogs"):
        (root / label).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(RNG.integers(0, 256, (16, 20, 3), dtype=np.uint8)).save(
                root / label / f"{i}.png"
            )
    Image.fromarray(RNG.integers(0, 65536, (16, 20), dtype=np.uint16)).save(
        root / "dogs" / "deep.png"
    )
    if bad:
        (root / "dogs" / "broken.jpg").write_text("definitely not a JPEG")
    return root


def test_scan_folder_all_readable(tmp_path, capsys):
    root = image_folder(tmp_path / "data", bad=False)
    assert main(["scan", str(root)]) == 0
    out = capsys.readouterr().out
    assert "kind: folder" in out and "files:    7 (0 unreadable)" in out
    assert "classes:  2 (cats, dogs)" in out and "samples:  7 images" in out
    assert "3x16x20 (7)" in out and "uint16 files" in out and "uint8 files" in out
    assert "all files readable" in out


def test_scan_folder_with_one_bad_file(tmp_path, capsys):
    root = image_folder(tmp_path / "data", bad=True)
    assert main(["scan", str(root)]) == 1
    out = capsys.readouterr().out
    assert "files:    8 (1 unreadable)" in out and "unreadable: 1" in out
    assert "samples:  8 images\n" in out  # all attempted: no "(--limit)"
    assert f"{root / 'dogs' / 'broken.jpg'}: not an image Pillow can identify" in out


def test_scan_limit_reads_a_spread_subset(tmp_path, capsys):
    root = image_folder(tmp_path / "data", bad=False)
    assert main(["scan", str(root), "--limit", "3"]) == 0
    assert "samples:  7 images, 3 read (--limit)" in capsys.readouterr().out


def test_scan_slides_reports_tiles_and_bad_slides(tmp_path, capsys):
    rgb = np.full((512, 512, 3), 240, np.uint8)
    rgb[100:400, 120:420] = (150, 70, 160)
    write_pyramidal_tiff(tmp_path / "good.tif", rgb, levels=2)
    assert main(["scan", str(tmp_path), "--tile-size", "128"]) == 0
    out = capsys.readouterr().out
    assert "kind: wsi" in out and "good.tif: generic-tiff, 512x512, 2 level(s)" in out
    (tmp_path / "empty.svs").write_bytes(b"")
    assert main(["scan", str(tmp_path), "--tile-size", "128", "--kind", "wsi"]) == 1
    out = capsys.readouterr().out
    assert f"{tmp_path / 'empty.svs'}: empty file (0 bytes)" in out


def test_scan_user_errors_exit_2(tmp_path, capsys):
    assert main(["scan", str(tmp_path / "missing")]) == 2
    (tmp_path / "readme.txt").write_text("no images here")
    assert main(["scan", str(tmp_path)]) == 2
    assert "no image, slide, DICOM or NIfTI files" in capsys.readouterr().err


def test_detect_kind_by_extension_and_content(tmp_path):
    slides, images, mri, dicom = (tmp_path / n for n in ("slides", "images", "mri", "dicom"))
    for folder in (slides, images, mri, dicom):
        folder.mkdir()
    rgb = RNG.integers(0, 256, (256, 256, 3), dtype=np.uint8)
    write_pyramidal_tiff(slides / "a.tif", rgb, levels=2)  # tiled TIFF: a slide
    Image.fromarray(rgb).save(images / "a.tif")  # strip TIFF: an image
    Image.fromarray(rgb).save(images / "b.png")
    (mri / "t1.nii.gz").write_bytes(b"\x1f\x8b")
    (dicom / "IM0001").write_bytes(b"\0" * 128 + b"DICM" + b"\0" * 16)  # no extension
    assert detect_kind(slides)[0] == "wsi"
    assert detect_kind(images)[0] == "folder"
    assert detect_kind(mri)[0] == "nifti"
    assert detect_kind(dicom)[0] == "dicom"
    kind, why = detect_kind(tmp_path)
    assert kind == "folder" and "use --kind" in why  # mixed: the most common kind wins


@pytest.mark.parametrize(
    "kind, folder, module",
    [
        ("dicom", "dicom_samples", "medp2x.data.dicom"),
        ("nifti", "nifti_brain", "medp2x.data.nifti"),
    ],
)
def test_scan_reads_shared_dicom_and_nifti(kind, folder, module, capsys):
    if importlib.util.find_spec(module) is None:
        pytest.skip(f"{module} not available")
    if not (SHARED / folder).is_dir():
        pytest.skip(f"shared data {SHARED / folder} not present (only beside the project checkout)")
    code = main(["scan", str(SHARED / folder), "--kind", kind, "--limit", "12"])
    out = capsys.readouterr().out
    assert f"kind: {kind}" in out and "12 read (--limit)" in out
    assert re.search(r"files:\s+[1-9]", out), "no file counted"
    assert code == (0 if "all files readable" in out else 1)


def test_scan_counts_links_and_prints_non_utf8_names_under_strict_utf8(tmp_path, monkeypatch):
    """#21: dangling links and link loops are counted, not dropped; a file name that is not
    UTF-8 is shown escaped instead of ending the scan with UnicodeEncodeError."""
    import io
    import os
    import sys

    root = image_folder(tmp_path / "data", bad=False)
    (root / "dogs" / "gone.png").symlink_to(root / "dogs" / "nowhere.png")
    (root / "cats" / "loop").symlink_to(root)
    bad_name = os.fsdecode(b"caf\xe9.png")  # Latin-1 bytes: not valid UTF-8
    (root / "cats" / bad_name).write_bytes(b"\x89PNG\r\n\x1a\n broken")
    stream = io.TextIOWrapper(io.BytesIO(), encoding="utf-8", errors="strict")
    monkeypatch.setattr(sys, "stdout", stream)
    assert main(["scan", str(root)]) == 1
    stream.flush()
    out = stream.buffer.getvalue().decode("utf-8")
    assert "gone.png: dangling symbolic link" in out
    assert "loop: symbolic link loop" in out
    assert "caf\\xe9.png: not an image" in out
    assert "unreadable: 3" in out
