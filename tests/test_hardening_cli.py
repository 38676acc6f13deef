"""Hardening (#21), classes 6-8: one line where a traceback was due (bad overrides, output
paths, ``@``/``$`` data folders, unknown keys, poisoned checkpoints), the skipped-file line of
every run summary, and ``medp2x surgery`` keeping what it does not transform. Each test fails
on the code before the fix; none trains, so the module takes a few seconds."""

from __future__ import annotations

import torch
import torchvision

from medp2x.checkpoints import read_checkpoint
from medp2x.cli import main


# ------------------------------------------------------------------ class 8: surgery keeps fc
def torchvision_checkpoint(path) -> dict[str, torch.Tensor]:
    """A torchvision ResNet-18's full state dict, ``fc`` included (1000 ImageNet classes)."""
    torch.manual_seed(0)
    state = torchvision.models.resnet18(num_classes=1000).state_dict()
    torch.save(state, path)
    return state


def test_surgery_keeps_the_tensors_it_does_not_transform(tmp_path, capsys):
    source = torchvision_checkpoint(tmp_path / "in.pth")
    assert main(["surgery", str(tmp_path / "in.pth"), str(tmp_path / "out.pth")]) == 0
    written = torch.load(tmp_path / "out.pth", weights_only=True)
    assert written.keys() == source.keys()  # fc.weight and fc.bias too
    assert torch.equal(written["fc.weight"], source["fc.weight"])
    assert torch.equal(written["fc.bias"], source["fc.bias"])
    assert "kept 2 tensor(s) surgery does not touch" in capsys.readouterr().out
    backbone, report = read_checkpoint(tmp_path / "out.pth")  # read back as before: fc ignored
    assert report.format == "torchvision" and "fc.weight" not in backbone


def test_surgery_backbone_only_drops_the_head(tmp_path):
    source = torchvision_checkpoint(tmp_path / "in.pth")
    argv = ["surgery", str(tmp_path / "in.pth"), str(tmp_path / "out.pth"), "--backbone-only"]
    assert main(argv) == 0
    written = torch.load(tmp_path / "out.pth", weights_only=True)
    assert written.keys() == {k for k in source if not k.startswith("fc.")}
