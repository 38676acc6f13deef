"""bf16 autocast on CPU: strided convolutions fed 1 x 1 maps (where oneDNN's bf16 weight gradient
is wrong) are found and such runs refused; from 2 x 2 on the gradient is right."""

from __future__ import annotations

import pytest
import torch

from medp2x.engine import PretrainConfig, pretrain
from medp2x.networks import build_encoder, strided_convs_on_one_pixel


def test_strided_convolutions_reached_at_one_pixel():
    encoder = build_encoder("resnet18")
    assert strided_convs_on_one_pixel(encoder, 16) == ["layer4.0.conv1"]
    assert strided_convs_on_one_pixel(encoder, 8) == ["layer3.0.conv1", "layer4.0.conv1"]
    assert strided_convs_on_one_pixel(encoder, 17) == []
    assert encoder.training  # the probe leaves the mode as it found it


@pytest.mark.parametrize("side", [2, 3])
def test_bf16_strided_conv_weight_gradients_are_right_from_two_pixels_on(side):
    """The premise of the guard: what it lets through is computed correctly (to bf16's
    precision), over several draws with the allocator holding stale values (the 1 x 1 fault
    reads memory the kernel did not write)."""
    torch.manual_seed(0)
    for _ in range(6):
        stale = torch.full((1024, 1024), 1e30)  # leaves large values in freed memory
        del stale
        conv = torch.nn.Conv2d(256, 512, 3, stride=2, padding=1, bias=False)
        x = torch.randn(64, 256, side, side)
        exact = torch.nn.Conv2d(256, 512, 3, stride=2, padding=1, bias=False).double()
        exact.load_state_dict(conv.state_dict())
        grad_out = torch.randn_like(exact(x.double()))
        (exact(x.double()) * grad_out).sum().backward()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = conv(x)
        (out.float() * grad_out.float()).sum().backward()
        error = (conv.weight.grad.double() - exact.weight.grad).norm() / exact.weight.grad.norm()
        assert error < 0.01


def test_bf16_run_with_one_pixel_feature_maps_is_refused(tmp_path):
    images = [{"image": torch.rand(3, 32, 32), "label": -1} for _ in range(16)]
    cfg = PretrainConfig(
        dataset=images,
        output_dir=tmp_path / "swav",
        method="swav",
        image_size=32,  # small crops of 16 px: layer4 sees 1 x 1
        batch_size=8,
        amp=True,
        max_iterations=1,
        progress=False,
    )
    with pytest.raises(ValueError, match=r"16 px crops give those in layer4.0.conv1"):
        pretrain(cfg)
