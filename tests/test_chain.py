"""N-stage chains (HPT's base -> source -> target): a 3-stage chain runs end to end, records its
stages, and a chain killed mid-stage and started again skips the finished stages, resumes the
running one from its checkpoint, and ends with the weights of an uninterrupted chain; the probe
handler keeps the encoder of its best validation score (checked on the same chain run: every
stage run costs seconds on the test machine)."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from ignite.engine import Events
from test_engine import Blobs

from medp2x.chain import PROBE_VAL_FRACTION, ChainJob, Stage
from medp2x.checkpoints import read_checkpoint
from medp2x.data.split import stratified_split
from medp2x.selection import best_row


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread for these tiny runs: a second one only spins on a loaded machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class KillAt:
    """Raise at ``iteration`` of the stage whose folder is ``folder_name`` (a killed process)."""

    def __init__(self, folder_name: str, iteration: int):
        self.folder_name, self.iteration = folder_name, iteration

    def attach(self, engine) -> None:
        run = engine.pretraining

        @engine.on(Events.ITERATION_COMPLETED)
        def kill(e):
            if run.out.name == self.folder_name and e.state.iteration == self.iteration:
                raise KeyboardInterrupt("killed")


def three_stages() -> list[Stage]:
    data = Blobs(n=8, size=16)  # one step per epoch (batch 8)
    return [
        Stage("base", dataset=data, init="random", epochs=1),
        Stage("source", dataset=Blobs(n=16, size=16), epochs=2),
        Stage("target", dataset=data, epochs=1, trainable="bn"),
    ]


def chain(tmp_path, name, **kw) -> ChainJob:
    base = dict(
        name=name,
        output_dir=str(tmp_path / name),
        stages=three_stages(),
        method="simclr",
        profile="tiny",
        arch="resnet18",
        batch_size=None,
        progress=False,
        amp=False,
        checkpoint_every=2,
        keep_checkpoints=0,
    )
    base.pop("batch_size")
    base.update(kw)
    job = ChainJob(**base)
    for stage in job.stages:
        stage.batch_size, stage.image_size = 8, 16
    return job


def weights(path):
    return read_checkpoint(path)[0]


class LabelledBlobs(Blobs):
    """Blobs labelled by whether the blob is mostly red: a task the probe can score."""

    def __getitem__(self, i: int) -> dict:
        image = self.images[i]
        return {"image": image, "label": int(image[0].mean() > image[1].mean())}


def test_three_stage_chain_resumes_mid_chain_and_mid_stage_and_probes(tmp_path):
    labelled = LabelledBlobs(n=24, size=16)
    probe = dict(make_probe_data=lambda: (labelled, None), probe_every=2, probe_select_after=0.0)
    full = chain(tmp_path, "full", **probe).run()  # the killed chain runs without the probe
    assert [r.status for r in full] == ["done"] * 3
    assert [r.summary.iterations for r in full] == [1, 4, 1]
    record = json.loads((tmp_path / "full" / "chain.json").read_text())
    assert [s["status"] for s in record["stages"]] == ["done"] * 3
    assert record["stages"][0]["started_from"] == "random init"
    assert record["stages"][1]["started_from"] == str(full[0].encoder_path)
    assert record["stages"][2]["settings"]["trainable"] == "bn"
    assert record["stages"][1]["samples"] == 16 and "Blobs" in record["stages"][1]["data"]

    with pytest.raises(KeyboardInterrupt):  # killed at iteration 3 of 4 of the source stage
        chain(tmp_path, "killed", extra_handlers=[KillAt("1_source", 3)]).run()
    record = json.loads((tmp_path / "killed" / "chain.json").read_text())
    assert [s["status"] for s in record["stages"]] == ["done", "running", "pending"]
    again = chain(tmp_path, "killed").run()
    assert [r.status for r in again] == ["finished before", "done", "done"]
    assert again[1].summary.resumed  # from checkpoint_2, mid-stage
    a, b = weights(full[2].encoder_path), weights(again[2].encoder_path)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6, msg=key)

    with pytest.raises(ValueError, match="other stages"):  # same folder, another recipe
        changed = chain(tmp_path, "killed")
        changed.stages[2].trainable = "all"
        changed.run()

    check_probe(full[1].folder, labelled)  # the 4-step source stage, probed at steps 2 and 4


def check_probe(out, labelled) -> None:
    """The probe's curve has a row per probe on the validation part of the labelled training
    split, and ``best_encoder.pt`` is the checkpoint of the best row."""
    with open(out / "probe_log.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["iteration"]) for r in rows] == [2, 4]
    labels = np.array([labelled[i]["label"] for i in range(len(labelled))])
    _, val = stratified_split(labels, PROBE_VAL_FRACTION, seed=0)  # of the training split only
    assert all(int(r["n_val"]) == len(val) for r in rows)
    best = best_row(out)
    assert (out / "probe.png").stat().st_size > 1000
    kept = weights(out / "best_encoder.pt")
    at_best = weights(out / "checkpoints" / f"checkpoint_{best['iteration']}.pt")
    assert kept.keys() == at_best.keys()
    assert all(torch.equal(kept[k], at_best[k]) for k in kept)
    if best["iteration"] != "4":  # the last encoder differs from the best one
        last = weights(out / "encoder.pt")
        assert not all(torch.equal(kept[k], last[k]) for k in kept)


def test_every_stage_accumulates_the_chains_gradient_steps(tmp_path):
    """A bundle's ``accumulation_steps`` reaches every stage's engine (it was dropped once)."""
    job = chain(tmp_path, "accumulate", accumulation_steps=3)
    for stage in job.stages:
        cfg = job._config(stage, tmp_path / stage.name, None)
        assert cfg.accumulation_steps == 3 and cfg.batch_size == 8
    from medp2x.settings import SettingError

    with pytest.raises(SettingError, match="accumulation_steps"):
        chain(tmp_path, "zero", accumulation_steps=0).run()
