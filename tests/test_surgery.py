"""Weight surgery: eval-mode function preserved, dead filters replaced exactly, reproducible."""

from __future__ import annotations

import copy
import csv
import logging

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from ignite.engine import Engine
from PIL import Image
from torch import nn

from medp2x.networks import build_encoder
from medp2x.surgery import (
    SurgeryHandler,
    apply_surgery,
    find_conv_bn_pairs,
    layer_norms,
    norm_stats,
)

# Planted dead filters (norm 0.01 .. 0.05), by conv module path -> output channel indices.
DEAD = {
    "conv1": [5],
    "layer1.0.conv2": [0, 7],
    "layer2.1.conv3": [3, 100, 200],
    "layer3.0.downsample.0": [11],
    "layer4.2.conv1": [42],
}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These tensors are small: a second thread only adds synchronisation, which on a busy
    2-core machine made this module 7x slower (258 s vs 28 s wall-clock, measured)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def smooth_images(n: int, size: int = 64, seed: int = 0) -> torch.Tensor:
    """Image-like input (low-frequency noise), normalised roughly like ImageNet input."""
    gen = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 3, 6, 6, generator=gen)
    images = F.interpolate(low, size=size, mode="bicubic", align_corners=False)
    return (images - 0.45) / 0.25


def calibrate_bn(net: nn.Module, batches: list[torch.Tensor]) -> None:
    """Running statistics = the exact average of the batch statistics of these activations."""
    bns = [m for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative average
    net.train()
    with torch.no_grad():
        for batch in batches:
            net(batch)
    for bn in bns:
        bn.momentum = 0.1
    net.eval()


def inflate_like_ssl(net: nn.Module, dead: dict[str, list[int]], seed: int = 0) -> None:
    """Per-layer filter norms drawn in [0.8, 4] (mostly > 1, as in SSL ImageNet ResNets),
    random BN affine parameters, and the given filters shrunk to norms in [0.01, 0.05]."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in net.modules():
            if isinstance(module, nn.Conv2d):
                target = 0.8 + 3.2 * torch.rand((), generator=gen)
                module.weight.mul_(target / module.weight.flatten(1).norm(dim=1).median())
            elif isinstance(module, nn.BatchNorm2d):
                module.weight.copy_(0.3 + 1.2 * torch.rand(module.num_features, generator=gen))
                module.bias.copy_(0.2 * torch.randn(module.num_features, generator=gen))
        for name, index in dead.items():
            weight = net.get_submodule(name).weight
            norms = weight[index].flatten(1).norm(dim=1).view(-1, 1, 1, 1)
            target = 0.01 + 0.04 * torch.rand(len(index), 1, 1, 1, generator=gen)
            weight[index] *= target / norms


def build_inflated_resnet50() -> nn.Module:
    torch.manual_seed(0)
    net = torchvision.models.resnet50(weights=None, num_classes=10)
    inflate_like_ssl(net, DEAD)
    calibrate_bn(net, [smooth_images(16, seed=s) for s in range(3)])
    return net


@pytest.fixture(scope="module")
def resnet50_ssl() -> nn.Module:
    return build_inflated_resnet50()


@pytest.fixture
def net(resnet50_ssl) -> nn.Module:
    return copy.deepcopy(resnet50_ssl)


@pytest.fixture(scope="module")
def inputs() -> torch.Tensor:
    return smooth_images(4, seed=99)


def logits(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    net.eval()
    with torch.no_grad():
        return net(x).double()


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float(((out - ref).norm(dim=1) / ref.norm(dim=1)).max())


def set_bn_eps(net: nn.Module, eps: float) -> None:
    for module in net.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.eps = eps


def bn_of(conv: str) -> str:
    """torchvision's name of the BatchNorm after a conv: conv1 -> bn1, downsample.0 -> .1."""
    return conv.replace("downsample.0", "downsample.1").replace("conv", "bn")


def state(net: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in net.state_dict().items()}


def assert_bit_equal(a: dict, b: dict, skip: set[str] = frozenset()) -> None:
    assert a.keys() == b.keys()
    for key in a:
        if key not in skip:
            assert torch.equal(a[key], b[key]), key


# ------------------------------------------------------------------------------- structure
def test_fixture_looks_like_an_ssl_checkpoint(resnet50_ssl):
    stats = norm_stats(
        layer_norms({p.name: p.conv.weight for p in find_conv_bn_pairs(resnet50_ssl)})
    )
    total = stats[-1]
    assert total.layer == "all" and total.filters == sum(
        len(p.conv.weight) for p in find_conv_bn_pairs(resnet50_ssl)
    )
    assert total.frac_above > 0.7
    assert round(total.frac_dead * total.filters) == sum(len(v) for v in DEAD.values())


def test_finds_every_conv_bn_pair_and_no_head(resnet50_ssl):
    pairs = find_conv_bn_pairs(resnet50_ssl)
    conv_keys = [k[: -len(".weight")] for k, v in resnet50_ssl.state_dict().items() if v.ndim == 4]
    assert [p.name for p in pairs] == conv_keys  # stem, 3 convs per bottleneck, 4 downsamples
    assert len(pairs) == 53
    for pair in pairs:
        assert pair.bn is resnet50_ssl.get_submodule(bn_of(pair.name))
    assert all(p.conv is not resnet50_ssl.fc for p in pairs)


# -------------------------------------------------------------------------------- scaling
@pytest.mark.parametrize("scale", ["per_layer", "per_filter"])
def test_scaling_preserves_eval_logits_with_eps_zero(net, inputs, scale):
    set_bn_eps(net, 0.0)
    ref, before = logits(net, inputs), state(net)
    for eps_exact in (False, True):  # both formulas are the paper's when eps = 0
        scaled = copy.deepcopy(net)
        report = apply_surgery(scaled, scale=scale, filters="none", eps_exact=eps_exact)
        assert report.n_scaled_layers > 40
        assert report.after[-1].median < report.before[-1].median
        assert relative_error(logits(scaled, inputs), ref) < 1e-4
    after = scaled.state_dict()
    assert torch.equal(after["fc.weight"], before["fc.weight"])
    assert torch.equal(after["fc.bias"], before["fc.bias"])


def test_per_layer_scaling_follows_the_paper_formulas(net):
    set_bn_eps(net, 0.0)
    before = state(net)
    apply_surgery(net, scale="per_layer", filters="none", eps_exact=False)
    after = net.state_dict()
    for conv, bn in [
        ("layer2.0.conv2", "layer2.0.bn2"),
        ("layer3.0.downsample.0", "layer3.0.downsample.1"),
    ]:
        w = before[f"{conv}.weight"].double()
        s = float(np.linalg.norm(w.numpy().ravel()))  # Frobenius norm of the whole layer
        root = s**0.5
        torch.testing.assert_close(after[f"{conv}.weight"].double(), w / root, rtol=1e-6, atol=0)
        torch.testing.assert_close(
            after[f"{bn}.running_mean"].double(),
            before[f"{bn}.running_mean"].double() / root,
            rtol=1e-6,
            atol=0,
        )
        torch.testing.assert_close(
            after[f"{bn}.running_var"].double(),
            before[f"{bn}.running_var"].double() / s**2,
            rtol=1e-6,
            atol=0,
        )
        torch.testing.assert_close(
            after[f"{bn}.weight"].double(),
            before[f"{bn}.weight"].double() / root,
            rtol=1e-6,
            atol=0,
        )
        assert torch.equal(after[f"{bn}.bias"], before[f"{bn}.bias"])


def test_per_filter_scaling_only_touches_filters_above_threshold(net):
    before = state(net)
    report = apply_surgery(net, scale="per_filter", filters="none")
    after = net.state_dict()
    w0, w1 = before["layer1.0.conv1.weight"], after["layer1.0.conv1.weight"]
    norms = w0.double().flatten(1).norm(dim=1)
    small = norms <= 1
    assert torch.equal(w1[small], w0[small])
    torch.testing.assert_close(
        w1[~small].flatten(1).double().norm(dim=1), norms[~small].sqrt(), rtol=1e-6, atol=0
    )
    change = next(c for c in report.changes if c.layer == "layer1.0.conv1")
    assert change.scaled_filters == int((~small).sum())


# -------------------------------------------------------------------------------- the default
def small_filters_block(inflated: int = 0) -> nn.Sequential:
    """conv -> BN with 64 filters of norm 0.5 (the layer's Frobenius norm is 4), the first
    ``inflated`` of them raised to norm 4: a layer like a supervised or briefly trained one."""
    torch.manual_seed(0)
    block = nn.Sequential(nn.Conv2d(16, 64, 3, bias=False), nn.BatchNorm2d(64))
    with torch.no_grad():
        weight = block[0].weight
        weight.mul_(0.5 / weight.flatten(1).norm(dim=1).view(-1, 1, 1, 1))
        weight[:inflated].mul_(8)
        block[1].weight.uniform_(0.5, 1.5)
        block[1].running_var.uniform_(0.5, 2.0)
    return block.eval()


def test_default_surgery_leaves_an_already_small_layer_alone():
    """No filter is above 1, so the default does nothing, though the layer's norm is 4:
    per_layer would divide it by 2 and multiply its effective learning rate by 4 (docs/surgery.md,
    issue #14 item 7)."""
    block = small_filters_block()
    before = state(block)
    report = apply_surgery(block)
    assert report.options["scale"] == "per_filter"
    assert report.n_scaled_layers == 0
    assert_bit_equal(before, state(block))


def test_default_surgery_scales_only_the_inflated_filter():
    block = small_filters_block(inflated=1)
    before = state(block)
    apply_surgery(block)
    norms = block[0].weight.detach().double().flatten(1).norm(dim=1)
    assert norms[0].item() == pytest.approx(2.0, rel=1e-6)  # 4 -> sqrt(4)
    assert torch.equal(block[0].weight[1:], before["0.weight"][1:])
    assert torch.equal(block[1].running_var[1:], before["1.running_var"][1:])
    assert block[1].running_var[0].item() == pytest.approx(before["1.running_var"][0] / 16)


def test_every_entry_point_has_the_same_default_scale():
    """The API, the Ignite handler, the engine, the bundles' job and defaults, and the CLI."""
    import dataclasses
    import inspect
    import json
    from pathlib import Path

    from medp2x.cli import build_parser
    from medp2x.engine import PretrainConfig
    from medp2x.handlers import WeightSurgery
    from medp2x.pipeline import P2XJob

    def default(cls) -> str:
        return next(f.default for f in dataclasses.fields(cls) if f.name == "scale")

    repo = Path(__file__).resolve().parents[1]
    train = json.loads((repo / "bundles" / "configs" / "train.json").read_text())
    found = {
        "apply_surgery": inspect.signature(apply_surgery).parameters["scale"].default,
        "SurgeryHandler": inspect.signature(SurgeryHandler).parameters["scale"].default,
        "PretrainConfig": default(PretrainConfig),
        "P2XJob": default(P2XJob),
        "bundles/configs/train.json": train["scale"],
        "WeightSurgery": inspect.signature(WeightSurgery).parameters["scale"].default,
        "medp2x surgery": build_parser().parse_args(["surgery", "in", "out"]).scale,
    }
    assert found == dict.fromkeys(found, "per_filter")


def test_train_mode_output_shrinks_by_sqrt_s():
    """What the second stage sees: BN normalises with batch statistics, so only γ/√s is left
    of the surgery and each BN's output minus β is divided by √s (ε aside)."""
    torch.manual_seed(0)
    block = nn.Sequential(nn.Conv2d(8, 16, 3), nn.BatchNorm2d(16))
    with torch.no_grad():
        block[0].weight.mul_(5)
        block[1].weight.uniform_(0.5, 1.5)
    x = torch.randn(8, 8, 12, 12)
    block.train()
    with torch.no_grad():
        before = block(x) - block[1].bias.view(1, -1, 1, 1)
        s = block[0].weight.norm().item()
        apply_surgery(block, scale="per_layer", filters="none")
        after = block(x) - block[1].bias.view(1, -1, 1, 1)
    torch.testing.assert_close(after, before / s**0.5, rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("scale", ["per_layer", "per_filter"])
def test_eps_exact_remedy_preserves_logits_with_default_eps(net, inputs, scale):
    """With eps = 1e-5 the paper's γ/√s is inexact where s²·eps is not small against a
    channel's variance; folding eps into γ makes it exact again."""
    ref = logits(net, inputs)
    exact, paper = copy.deepcopy(net), copy.deepcopy(net)
    apply_surgery(exact, scale=scale, filters="none", eps_exact=True)
    apply_surgery(paper, scale=scale, filters="none", eps_exact=False)
    exact_error = relative_error(logits(exact, inputs), ref)
    paper_error = relative_error(logits(paper, inputs), ref)
    assert exact_error < 1e-4
    assert paper_error > 10 * exact_error  # the plain formula measurably changes the function
    logging.getLogger(__name__).info(
        "%s: paper %.2e, eps-exact %.2e", scale, paper_error, exact_error
    )


def test_eps_exact_remedy_is_exact_in_float64(net, inputs):
    """Without float32 rounding the remedy leaves only float64 rounding (the identity is exact)."""
    net = net.double()
    ref = logits(net, inputs.double())
    apply_surgery(net, scale="per_layer", filters="none", eps_exact=True)
    assert relative_error(logits(net, inputs.double()), ref) < 1e-10


def test_eps_exact_on_the_shared_stage1_encoder(stage1_checkpoint):
    """The realistic case: the shared SimCLR resnet18, its own BN statistics, eps = 1e-5."""
    encoder = build_encoder("resnet18")
    encoder.load_state_dict(torch.load(stage1_checkpoint, weights_only=True))
    x = smooth_images(8, seed=3)
    ref = logits(encoder, x)
    errors = {}
    for eps_exact in (False, True):
        scaled = copy.deepcopy(encoder)
        apply_surgery(scaled, scale="per_layer", filters="none", eps_exact=eps_exact)
        errors[eps_exact] = relative_error(logits(scaled, x), ref)
    assert errors[True] < 1e-5
    assert errors[False] > 1e-4


# ---------------------------------------------------------------------------- dead filters
def test_copy_replaces_each_dead_filter_with_a_live_twin(net):
    before = state(net)
    report = apply_surgery(net, scale="none", filters="copy", seed=1)
    after = net.state_dict()
    assert report.n_dead == report.n_replaced == sum(len(v) for v in DEAD.values())
    changes = {c.layer: c for c in report.changes if c.dead}
    assert {k: v.dead for k, v in changes.items()} == DEAD
    for layer, change in changes.items():
        bn = bn_of(layer)
        w0, w1 = before[f"{layer}.weight"], after[f"{layer}.weight"]
        live = torch.nonzero(w0.flatten(1).norm(dim=1) >= 0.1).flatten().tolist()
        assert len(set(change.sources)) == len(change.sources)  # distinct while enough are live
        for dead, source in zip(change.dead, change.sources, strict=True):
            assert source in live
            assert torch.equal(w1[dead], w0[source])
            for entry in ("weight", "bias", "running_mean", "running_var"):
                assert after[f"{bn}.{entry}"][dead] == before[f"{bn}.{entry}"][source]
        untouched = [i for i in range(len(w0)) if i not in change.dead]
        assert torch.equal(w1[untouched], w0[untouched])
    touched = tuple(f"{m}." for layer in DEAD for m in (layer, bn_of(layer)))
    assert_bit_equal(before, after, skip={k for k in before if k.startswith(touched)})
    assert report.after[-1].frac_dead == 0


def test_copies_stay_bit_equal_after_scaling(net):
    for scale in ("per_layer", "per_filter"):
        scaled = copy.deepcopy(net)
        report = apply_surgery(scaled, scale=scale, filters="copy", seed=0)
        for change in report.changes:
            weight = scaled.get_submodule(change.layer).weight
            for dead, source in zip(change.dead, change.sources, strict=True):
                assert torch.equal(weight[dead], weight[source])


def test_random_replaces_dead_filters_with_kaiming_and_fresh_bn(net):
    before = state(net)
    report = apply_surgery(net, scale="none", filters="random", seed=0)
    after = net.state_dict()
    assert report.n_replaced == sum(len(v) for v in DEAD.values())
    for layer, index in DEAD.items():
        bn = bn_of(layer)
        w1 = after[f"{layer}.weight"]
        out_channels, fan_in = w1.shape[0], w1[0].numel()
        kaiming_norm = (2 * fan_in / (out_channels * w1[0, 0].numel())) ** 0.5  # std √(2/fan_out)
        norms = w1[index].flatten(1).norm(dim=1)
        assert torch.all((norms > 0.5 * kaiming_norm) & (norms < 1.5 * kaiming_norm)), (
            layer,
            norms,
            kaiming_norm,
        )
        for entry, value in (
            ("weight", 1.0),
            ("bias", 0.0),
            ("running_mean", 0.0),
            ("running_var", 1.0),
        ):
            assert torch.all(after[f"{bn}.{entry}"][index] == value)
        others = [i for i in range(len(w1)) if i not in index]
        assert torch.equal(w1[others], before[f"{layer}.weight"][others])


def test_none_modes_change_nothing(net):
    before = state(net)
    report = apply_surgery(net, scale="none", filters="none")
    assert_bit_equal(before, net.state_dict())
    assert report.n_replaced == 0 and report.n_scaled_layers == 0
    assert report.n_dead == sum(len(v) for v in DEAD.values())  # still counted


def test_same_seed_same_weights_other_seed_other_sources(resnet50_ssl):
    results = {}
    for seed in (0, 0, 1):
        net = copy.deepcopy(resnet50_ssl)
        report = apply_surgery(net, scale="per_layer", filters="copy", seed=seed)
        results.setdefault(seed, []).append((state(net), [c.sources for c in report.changes]))
    (first, sources0), (second, sources0b) = results[0]
    assert_bit_equal(first, second)
    assert sources0 == sources0b
    assert results[1][0][1] != sources0


def test_random_mode_is_reproducible(resnet50_ssl):
    a, b = copy.deepcopy(resnet50_ssl), copy.deepcopy(resnet50_ssl)
    apply_surgery(a, scale="none", filters="random", seed=5)
    apply_surgery(b, scale="none", filters="random", seed=5)
    assert_bit_equal(state(a), state(b))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_surgery_on_gpu_matches_cpu():
    cpu = small_inflated_encoder()
    gpu = copy.deepcopy(cpu).cuda()
    for filters in ("copy", "random"):
        a, b = copy.deepcopy(cpu), copy.deepcopy(gpu)
        report_cpu = apply_surgery(a, scale="per_layer", filters=filters, seed=2)
        report_gpu = apply_surgery(b, scale="per_layer", filters=filters, seed=2)
        assert [c.sources for c in report_cpu.changes] == [c.sources for c in report_gpu.changes]
        for key, value in state(a).items():
            torch.testing.assert_close(b.state_dict()[key].cpu(), value, rtol=1e-6, atol=1e-7)


def test_bad_options_and_models_are_rejected():
    with pytest.raises(ValueError, match="scale must be one of"):
        apply_surgery(build_encoder("resnet18"), scale="global")
    with pytest.raises(ValueError, match="filters must be one of"):
        apply_surgery(build_encoder("resnet18"), filters="zero")
    with pytest.raises(ValueError, match="no convolution followed by BatchNorm"):
        apply_surgery(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()))


# ---------------------------------------------------------------------------------- report
def test_report_statistics_table_csv_and_plot(net, tmp_path):
    weights0 = {p.name: p.conv.weight.detach().clone() for p in find_conv_bn_pairs(net)}
    report = apply_surgery(net, scale="per_layer", filters="copy")
    norms = weights0["layer2.1.conv3"].double().flatten(1).norm(dim=1).numpy()
    row = next(s for s in report.before if s.layer == "layer2.1.conv3")
    assert row.filters == 512
    assert row.frac_above == pytest.approx(np.mean(norms > 1))
    assert row.frac_dead == pytest.approx(3 / 512)
    assert (row.min, row.median, row.max) == pytest.approx(
        (norms.min(), np.sort(norms)[255], norms.max())
    )
    assert len(report.norms_before) == len(report.norms_after) == report.before[-1].filters
    table = report.to_markdown()
    assert table.count("\n") == 1 + 54 and "| layer2.1.conv3 | 512 |" in table
    csv_path = report.write_csv(tmp_path / "r.csv")
    with open(csv_path) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 * 54 and {r["stage"] for r in rows} == {"before", "after"}
    png = report.plot(tmp_path / "norms.png")
    with Image.open(png) as image:
        assert image.size[0] > 300 and image.size[1] > 200


# --------------------------------------------------------------------------------- handler
def small_inflated_encoder() -> nn.Module:
    torch.manual_seed(0)
    encoder = build_encoder("resnet18")
    inflate_like_ssl(encoder, {"layer1.0.conv1": [1, 2]})
    calibrate_bn(encoder, [smooth_images(8, size=32)])
    return encoder


def run_engine(handler: SurgeryHandler, resume_at: int | None) -> Engine:
    engine = Engine(lambda engine, batch: None)
    handler.attach(engine)
    if resume_at is not None:  # what Ignite's Checkpoint.load_objects does before run()
        engine.load_state_dict({"iteration": resume_at, "epoch_length": 2, "max_epochs": 2})
    engine.run([0, 1], max_epochs=3)
    return engine


def test_handler_applies_surgery_on_a_fresh_run(tmp_path, caplog):
    encoder, calls = small_inflated_encoder(), []
    reference = copy.deepcopy(encoder)
    expected = apply_surgery(reference, scale="per_filter", filters="copy", seed=3)
    handler = SurgeryHandler(
        encoder, "per_filter", "copy", seed=3, output_dir=tmp_path, after=lambda: calls.append(1)
    )
    with caplog.at_level(logging.INFO, logger="medp2x.surgery"):
        run_engine(handler, resume_at=None)
    assert calls == [1]
    assert_bit_equal(state(encoder), state(reference))
    assert handler.report.n_replaced == expected.n_replaced == 2
    assert (tmp_path / "surgery_report.csv").is_file() and (
        tmp_path / "surgery_norms.png"
    ).is_file()
    assert "weight surgery" in caplog.text


def test_handler_skips_a_resumed_run(tmp_path):
    encoder, calls = small_inflated_encoder(), []
    before = state(encoder)
    handler = SurgeryHandler(lambda: encoder, output_dir=tmp_path, after=lambda: calls.append(1))
    engine = run_engine(handler, resume_at=4)
    assert engine.state.iteration == 6  # the run did continue
    assert calls == [] and handler.report is None
    assert_bit_equal(before, state(encoder))
    assert not (tmp_path / "surgery_report.csv").exists()


# -------------------------------------------------------------------------------- arch, CLI
def test_cli_surgery_and_inspect_round_trip(tmp_path, capsys):
    from medp2x.checkpoints import read_checkpoint
    from medp2x.cli import main

    encoder = small_inflated_encoder()
    source = tmp_path / "ssl.pth"
    torch.save(encoder.state_dict(), source)
    out, csv_path, png = tmp_path / "out" / "p2x.pth", tmp_path / "s.csv", tmp_path / "s.png"
    argv = [
        "surgery",
        str(source),
        str(out),
        "--scale",
        "per_filter",
        "--seed",
        "7",
        "--csv",
        str(csv_path),
        "--plot",
        str(png),
    ]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "2 replaced" in printed and "| layer1.0.conv1 |" in printed
    written = torch.load(out, weights_only=True)
    expected = copy.deepcopy(encoder)
    apply_surgery(expected, scale="per_filter", filters="copy", seed=7)
    assert_bit_equal(written, state(expected))
    assert csv_path.is_file() and png.is_file()
    assert sorted(p.name for p in out.parent.iterdir()) == [
        "p2x.pth",
        "p2x.pth.json",
    ]  # no temp file
    written_norm, source_norm = (
        read_checkpoint(out)[1].normalization,
        read_checkpoint(source)[1].normalization,
    )
    assert written_norm["mean"] == pytest.approx(source_norm["mean"]) and written_norm[
        "std"
    ] == pytest.approx(source_norm["std"])

    inspect_csv, inspect_png = tmp_path / "i.csv", tmp_path / "i.png"
    assert (
        main(
            [
                "inspect",
                str(source),
                str(out),
                "--csv",
                str(inspect_csv),
                "--plot",
                str(inspect_png),
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "ssl.pth" in printed and "p2x.pth" in printed and "| layer4.1.conv2 |" in printed
    with open(inspect_csv) as f:
        rows = list(csv.DictReader(f))
    assert {r["checkpoint"] for r in rows} == {str(source), str(out)} and len(rows) == 2 * 21
    assert inspect_png.is_file()


def test_cli_reports_a_missing_file(tmp_path, capsys):
    from medp2x.cli import main

    assert main(["inspect", str(tmp_path / "nope.pth")]) == 2
    assert "nope.pth" in capsys.readouterr().err
