"""S3L's schedules: a multi-resolution run switches its crop size at the stated iteration and
resumes across the switch to the weights of an uninterrupted run; the small architecture skips
``layer4`` during pretraining and a warm-up stage trains only a fresh ``layer4`` (and heads)."""

from __future__ import annotations

import pytest
import torch
from test_chain import KillAt, one_thread  # noqa: F401 (autouse: one torch thread)
from test_engine import Blobs

from medp2x.chain import ChainJob, Stage
from medp2x.checkpoints import read_checkpoint
from medp2x.networks import build_encoder
from medp2x.schedules import ResolutionSchedule, parse_resolution_schedule, without_last_stage


class CropSizes:
    """Records the crop size of every training step (the views the method really sees)."""

    def __init__(self):
        self.sizes: list[int] = []

    def attach(self, engine) -> None:
        run = engine.pretraining
        augment = run.augment

        def recording(images, *args, **kw):
            views = augment(images, *args, **kw)
            self.sizes.append(views[0].shape[-1])
            return views

        run.augment = recording


def multires(tmp_path, name, handlers) -> ChainJob:
    stage = Stage("multires", dataset=Blobs(n=24, size=16), init="random", epochs=1,
                  batch_size=8, resolution_schedule=[[0, 12], [2, 16]])  # fmt: skip
    return ChainJob(name=name, output_dir=str(tmp_path / name), stages=[stage], method="simclr",
                    arch="resnet18", progress=False, amp=False, checkpoint_every=2,
                    keep_checkpoints=0, extra_handlers=handlers)  # fmt: skip


def test_resolution_schedule_switches_at_its_iteration_and_resumes_across_it(tmp_path):
    full_sizes = CropSizes()
    full = multires(tmp_path, "full", [full_sizes]).run()[0]
    assert full_sizes.sizes == [12, 12, 16]  # from iteration 3 (after 2) on

    first, second = CropSizes(), CropSizes()
    with pytest.raises(KeyboardInterrupt):  # killed after the switch, last checkpoint before it
        multires(tmp_path, "killed", [first, KillAt("0_multires", 3)]).run()
    resumed = multires(tmp_path, "killed", [second]).run()[0]
    assert first.sizes == [12, 12, 16] and second.sizes == [16]  # resumed from iteration 2
    a, b = read_checkpoint(full.encoder_path)[0], read_checkpoint(resumed.encoder_path)[0]
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6, msg=key)


def test_resolution_schedule_settings_are_checked():
    assert ResolutionSchedule([[0, 112], [800, 224]]).size_at(800) == 112
    assert ResolutionSchedule([[0, 112], [800, 224]]).size_at(801) == 224
    for bad in ([[5, 112]], [[0, 112], [0, 224]], [[0, 4]], [[0, 112, 3]]):
        with pytest.raises(ValueError):
            parse_resolution_schedule(bad)


def test_small_architecture_then_warm_up_of_a_fresh_last_stage(tmp_path):
    encoder = without_last_stage(build_encoder("resnet18"))
    assert encoder.feature_dim == 256 and encoder(torch.zeros(2, 3, 32, 32)).shape == (2, 256)

    data = Blobs(n=8, size=16)  # one step per stage (batch 8)
    job = ChainJob(
        name="s3l",
        output_dir=str(tmp_path / "s3l"),
        stages=[
            Stage("small", dataset=data, init="random", epochs=1, without_last_stage=True),
            Stage(
                "warmup", dataset=data, epochs=1, restore_last_stage=True, trainable="last_stage"
            ),
        ],  # fmt: skip
        method="simclr",
        arch="resnet18",
        progress=False,
        amp=False,
    )
    for stage in job.stages:
        stage.batch_size, stage.image_size = 8, 16
    small, warm = job.run()
    out = tmp_path / "s3l"
    pretrained = read_checkpoint(small.encoder_path)[0]
    fresh = read_checkpoint(out / "0_small" / "encoder_fresh_layer4.pt")[0]
    warmed = read_checkpoint(warm.encoder_path)[0]
    for key, value in pretrained.items():
        if key.startswith("layer4."):
            if value.ndim == 4:  # convolutions: re-drawn, then trained
                assert not torch.equal(value, fresh[key]), f"{key}: not re-initialised"
                assert not torch.equal(fresh[key], warmed[key]), f"{key}: not trained"
        elif not key.endswith(("running_mean", "running_var", "num_batches_tracked")):
            assert torch.equal(value, warmed[key]), f"{key}: conv1-conv4 changed in the warm-up"
