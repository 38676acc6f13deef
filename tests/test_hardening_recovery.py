"""Hardening (#21) of resume: a damaged newest checkpoint is named and passed over for the
newest loadable one, a killed save's temporary file is removed, a poisoned checkpoint is
refused in one line without running anything, and ``keep_checkpoints`` holds across restarts.
Tiny runs (ResNet-18 at 32 px, batch 8, 4 iterations a stage)."""

from __future__ import annotations

import os
import pickle

import torch
from test_engine import Blobs

from medp2x.engine import PretrainConfig, pretrain
from medp2x.recovery import checkpoint_files, newest_loadable_checkpoint, recover_checkpoints


def tiny(tmp_path, **kw) -> PretrainConfig:
    base = dict(
        dataset=Blobs(n=16), output_dir=tmp_path / "run", method="simclr", profile="tiny",
        arch="resnet18", image_size=32, batch_size=8, epochs=2, progress=False,
        checkpoint_every=1, n_saved=10, amp=False,
    )  # fmt: skip
    base.update(kw)
    return PretrainConfig(**base)


class Payload:
    def __reduce__(self):
        return (os.system, ("touch EXECUTED",))


def test_resume_passes_over_damaged_checkpoints_and_keeps_keep_checkpoints(tmp_path, capsys):
    pretrain(tiny(tmp_path, max_iterations=3))
    ckpts = tmp_path / "run" / "checkpoints"
    names = [p.name for p in checkpoint_files(ckpts)]
    assert names == ["checkpoint_1.pt", "checkpoint_2.pt", "checkpoint_3.pt"]
    whole = (ckpts / "checkpoint_3.pt").read_bytes()
    (ckpts / "checkpoint_3.pt").write_bytes(whole[: len(whole) // 2])  # killed mid-write
    (ckpts / "checkpoint_9.pt").write_bytes(b"")  # zero bytes
    torch.save({"model": Payload(), "trainer": {}}, ckpts / "checkpoint_8.pt")  # poisoned
    (ckpts / "tmpk2j4x9q1").write_bytes(whole[:100])  # a save that never finished
    capsys.readouterr()
    summary = pretrain(tiny(tmp_path, n_saved=2))  # keep_checkpoints 2 from now on
    out = capsys.readouterr().out
    assert "checkpoint_9.pt skipped: empty file (0 bytes)" in out
    assert "checkpoint_8.pt skipped: refused: it holds posix.system" in out
    assert "checkpoint_3.pt skipped: truncated or damaged" in out
    assert "Resuming from" in out and "checkpoint_2.pt at iteration 2" in out
    assert not (tmp_path / "EXECUTED").exists() and not (ckpts / "tmpk2j4x9q1").exists()
    assert (ckpts / "checkpoint_9.pt.unloadable").is_file()  # kept aside, never tried again
    assert summary.iterations == 4
    # keep_checkpoints counts the first session's checkpoints too (not 1, 2 and 3, 4)
    assert [p.name for p in checkpoint_files(ckpts)] == ["checkpoint_3.pt", "checkpoint_4.pt"]


def test_no_loadable_checkpoint_starts_afresh_and_says_so(tmp_path, capsys):
    ckpts = tmp_path / "checkpoints"
    ckpts.mkdir()
    (ckpts / "checkpoint_5.pt").write_bytes(b"PK\x03\x04 not a zip")
    torch.save({"weights": torch.zeros(1)}, ckpts / "checkpoint_4.pt")  # not a run's state
    recovery = recover_checkpoints(ckpts)
    assert recovery.path is None and len(recovery.skipped) == 2
    out = capsys.readouterr().out
    assert "checkpoint_4.pt skipped: not a run checkpoint" in out and "afresh" in out
    assert newest_loadable_checkpoint(ckpts).path is None  # both set aside, none left
    pickle.dumps(recovery.skipped)  # plain data for the run's record


def test_demo_first_stage_honours_checkpoint_every_and_keep_checkpoints(tmp_path, monkeypatch):
    """#21: the stand-in first stage saved only at the end of its epochs, whatever the job's
    checkpoint_every, and kept the default 2 whatever keep_checkpoints said."""
    from types import SimpleNamespace

    import medp2x.engine
    from medp2x.pipeline import P2XJob, make_demo_first_stage

    given = {}

    def fake_pretrain(cfg):  # the wiring is what is tested: no training
        given["cfg"] = cfg
        return SimpleNamespace(iterations=0, first_loss=0.0, last_loss=0.0, encoder_path="e.pt")

    monkeypatch.setattr(medp2x.engine, "pretrain", fake_pretrain)
    job = P2XJob(name="t", make_dataset=None, output_dir=str(tmp_path), checkpoint_every=7,
                 keep_checkpoints=0)  # fmt: skip
    make_demo_first_stage(tmp_path / "stage1", job)
    assert given["cfg"].checkpoint_every == 7 and given["cfg"].n_saved is None  # 0: keep all
