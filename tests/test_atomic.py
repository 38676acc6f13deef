"""medp2x.atomic: a write appears whole or not at all, and leaves no temporary file behind."""

import os
import stat
from pathlib import Path

import pytest
import torch

from medp2x.atomic import atomic_torch_save, atomic_write, atomic_write_text


def test_a_failed_write_keeps_the_old_file_and_leaves_nothing_else(tmp_path):
    path = atomic_write_text(tmp_path / "run_config.json", "old")

    def half_then_crash(tmp: str) -> None:
        with open(tmp, "w") as f:
            f.write("half a fi")
        raise KeyboardInterrupt  # an interrupted run, not only an exception

    with pytest.raises(KeyboardInterrupt):
        atomic_write(path, half_then_crash)
    assert path.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run_config.json"]


def test_writers_see_the_suffix_and_files_get_the_umask_permissions(tmp_path):
    seen = []

    def write(tmp: str) -> None:
        seen.append(tmp)
        Path(tmp).write_bytes(b"png")

    atomic_write(tmp_path / "sub" / "norms.png", write)
    assert seen[0].endswith(".png")  # savefig and friends pick the format from it
    umask = os.umask(0)
    os.umask(umask)
    mode = stat.S_IMODE((tmp_path / "sub" / "norms.png").stat().st_mode)
    assert mode == 0o666 & ~umask  # not mkstemp's 0600
    state = {"w": torch.arange(3)}
    atomic_torch_save(state, tmp_path / "encoder.pt")
    assert torch.equal(torch.load(tmp_path / "encoder.pt", weights_only=True)["w"], state["w"])
