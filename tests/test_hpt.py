"""HPT's BN-only target stage: exactly the BatchNorm affine parameters (and the method's fresh
heads) are trained; every other encoder parameter leaves the stage bit-identical; running
statistics keep updating in train mode (HPT's ``norm_train=True``)."""

from __future__ import annotations

import pytest
import torch
from test_chain import one_thread  # noqa: F401 (autouse: one torch thread)
from test_engine import Blobs
from torch import nn

from medp2x.chain import ChainJob, Stage
from medp2x.checkpoints import read_checkpoint, save_encoder
from medp2x.networks import IMAGENET_MEAN, IMAGENET_STD, build_encoder
from medp2x.schedules import select_trainable


def test_bn_only_stage_trains_exactly_the_batchnorm_affine_parameters(tmp_path, capsys):
    torch.manual_seed(1)
    base = build_encoder("resnet18")
    normalization = {"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)}
    start = save_encoder(tmp_path / "base.pt", base.state_dict(), "resnet18", 3, normalization)
    job = ChainJob(
        name="bn",
        output_dir=str(tmp_path / "bn"),
        stages=[
            Stage(
                "target",
                dataset=Blobs(n=8, size=16),  # one step: it trains every BN affine tensor
                epochs=1,
                trainable="bn",
                batch_size=8,
                image_size=16,
            )
        ],  # fmt: skip
        base_checkpoint=str(start),
        method="moco",  # HPT's method: its key network follows the (partly frozen) query one
        arch="resnet18",
        progress=False,
        amp=False,
    )
    result = job.run()[0]
    before, after = read_checkpoint(start)[0], read_checkpoint(result.encoder_path)[0]
    bn_names = {n for n, m in base.named_modules() if isinstance(m, nn.BatchNorm2d)}
    changed_affine = 0
    for key, value in before.items():
        module, leaf = key.rsplit(".", 1)
        if module in bn_names and leaf in ("weight", "bias"):
            changed_affine += not torch.equal(value, after[key])
        elif module in bn_names and leaf in ("running_mean", "running_var"):
            assert not torch.equal(value, after[key]), f"{key}: running statistics not updated"
        elif leaf != "num_batches_tracked":
            assert torch.equal(value, after[key]), f"{key} changed in a BN-only stage"
    assert changed_affine == 2 * len(bn_names)  # every BN affine tensor trained

    bn_affine = sum(2 * m.num_features for m in base.modules() if isinstance(m, nn.BatchNorm2d))
    assert f"encoder {bn_affine:,} of {sum(p.numel() for p in base.parameters()):,}" in (
        capsys.readouterr().out
    )


@pytest.mark.parametrize("trainable", ["bn", "last_stage", "all"])
def test_select_trainable_counts_and_freezes(trainable):
    encoder = build_encoder("resnet18")
    kept = select_trainable(encoder, trainable)
    trained = {n for n, p in encoder.named_parameters() if p.requires_grad}
    expected = {
        "bn": {
            f"{name}.{leaf}"
            for name, m in encoder.named_modules()
            if isinstance(m, nn.BatchNorm2d)
            for leaf in ("weight", "bias")
        },
        "last_stage": {n for n, _ in encoder.named_parameters() if n.startswith("layer4.")},
        "all": {n for n, _ in encoder.named_parameters()},
    }[trainable]
    assert trained == expected and kept == sum(
        p.numel() for n, p in encoder.named_parameters() if n in expected
    )
    if trainable == "bn":
        assert not any("conv" in n for n in trained) and len(trained) == 2 * 20
