"""DINO: its loss and centre against the paper's Algorithm 1 written out here, its schedules and
per-step hooks, a short run that neither collapses nor would without its centring, and a run
through the engine that resumes exactly (teacher and centre included)."""

from __future__ import annotations

import math
import shutil

import numpy as np
import pytest
import torch
from test_engine import Blobs
from test_methods import random_views, tiny_encoder

from medp2x.checkpoints import torch_load_safe
from medp2x.engine import PretrainConfig, latest_checkpoint, pretrain
from medp2x.methods import build_method, recipe_for
from medp2x.methods.dino import DINO, teacher_temperature
from medp2x.methods.losses import swapped_prediction_loss, teacher_distribution, updated_center
from medp2x.methods.momentum import cosine_momentum
from medp2x.optim import build_optimizer
from medp2x.views import build_views

# --------------------------------------------------------------------------- the reference


def reference_h(t: torch.Tensor, s: torch.Tensor, center: torch.Tensor, tpt: float, tps: float):
    """Algorithm 1's ``H(t, s)``, one image at a time in float64:
    ``-(softmax((t - C) / tpt) * log softmax(s / tps)).sum(dim=1).mean()``."""
    total = 0.0
    for t_row, s_row in zip(t.double(), s.double(), strict=True):
        target = torch.softmax((t_row - center.double()) / tpt, dim=0)
        log_student = torch.log(torch.softmax(s_row / tps, dim=0))
        total += -float((target * log_student).sum())
    return total / len(t)


def reference_loss(student, teacher, center, tpt, tps, n_crops, n_teacher=2) -> float:
    """Algorithm 1 with multi-crop as ``DINOLoss.forward``: H over every (teacher crop, other
    crop) pair, averaged over the pairs."""
    s, t = student.chunk(n_crops), teacher.chunk(n_teacher)
    pairs = [(i, v) for i in range(n_teacher) for v in range(n_crops) if v != i]
    return sum(reference_h(t[i], s[v], center, tpt, tps) for i, v in pairs) / len(pairs)


def reference_center(center, teacher, m) -> torch.Tensor:
    """Algorithm 1: ``C = m * C + (1 - m) * cat([t1, t2]).mean(dim=0)``."""
    return m * center.double() + (1 - m) * teacher.double().mean(dim=0)


def dino_loss(student, teacher, center, tpt, tps, n_crops, n_teacher=2) -> float:
    targets = teacher_distribution(teacher, center, tpt).chunk(n_teacher)
    return float(swapped_prediction_loss(student, list(targets), n_crops, tps))


def test_two_crop_loss_and_center_are_algorithm_1():
    g = torch.Generator().manual_seed(0)
    b, k = 5, 7
    s1, s2, t1, t2 = (torch.randn(b, k, generator=g) for _ in range(4))
    center = torch.randn(k, generator=g) * 0.1
    expected = (
        reference_h(t1, s2, center, 0.04, 0.1) / 2 + reference_h(t2, s1, center, 0.04, 0.1) / 2
    )
    got = dino_loss(torch.cat([s1, s2]), torch.cat([t1, t2]), center, 0.04, 0.1, n_crops=2)
    assert got == pytest.approx(expected, rel=1e-5)
    new = updated_center(center.view(1, k), torch.cat([t1, t2]), 0.9)
    torch.testing.assert_close(
        new.double().view(k), reference_center(center, torch.cat([t1, t2]), 0.9)
    )


def test_multi_crop_loss_matches_the_reference():
    g = torch.Generator().manual_seed(1)
    b, k, crops = 4, 6, 5  # 2 global + 3 local crops
    student, teacher = torch.randn(crops * b, k, generator=g), torch.randn(2 * b, k, generator=g)
    center = torch.randn(1, k, generator=g)
    got = dino_loss(student, teacher, center, 0.07, 0.1, n_crops=crops)
    assert got == pytest.approx(
        reference_loss(student, teacher, center[0], 0.07, 0.1, crops), rel=1e-5
    )


# --------------------------------------------------------------------------- the method


def small_dino(**overrides) -> DINO:
    """The tiny recipe around a per-sample encoder, without BN in the head: the reference can
    then run the networks view by view."""
    torch.manual_seed(0)
    base = {"out_dim": 32, "hidden_dim": 16, "bottleneck_dim": 8, "head_batch_norm": False}
    return build_method("dino", tiny_encoder(), "tiny", **{**base, **overrides})


def test_forward_is_algorithm_1_on_its_networks_and_only_global_crops_reach_the_teacher():
    method = small_dino()
    views = random_views("dino", batch=6)  # 2 x 32 px + 2 x 16 px
    r = method.recipe
    with torch.no_grad():
        method.center.copy_(torch.randn(1, r.out_dim) * 0.1)
    center = method.center.clone()
    with torch.no_grad():
        student = torch.cat([method.head(method.encoder(v)) for v in views])
        teacher = torch.cat([method.teacher_head(method.teacher_encoder(v)) for v in views[:2]])
    expected = reference_loss(student, teacher, center[0], 0.04, r.student_temp, n_crops=4)
    out = method(views)
    assert float(out["loss"].detach()) == pytest.approx(expected, rel=1e-5)
    torch.testing.assert_close(method.center.double()[0], reference_center(center[0], teacher, 0.9))
    out["loss"].backward()
    assert all(p.grad is None for p in method.teacher_encoder.parameters())
    assert all(p.grad is not None for p in method.encoder.parameters())
    method.eval()  # no centre update outside training
    before = method.center.clone()
    method(views)
    assert torch.equal(method.center, before)


def test_teacher_temperature_warm_up_equals_the_originals_linspace_at_epoch_starts():
    r = recipe_for("dino", "full", warmup_teacher_temp=0.04, teacher_temp=0.07, epochs=50)
    r.warmup_teacher_temp_epochs = 30
    original = np.concatenate((np.linspace(0.04, 0.07, 30), np.ones(20) * 0.07))
    for epoch in range(50):
        assert teacher_temperature(r, float(epoch)) == pytest.approx(original[epoch])
    assert 0.04 < teacher_temperature(r, 0.5) < original[1]  # linear in between
    assert teacher_temperature(recipe_for("dino", "full"), 0.0) == 0.04  # ResNet-50: no warm-up


def test_hooks_clip_each_gradient_freeze_the_last_layer_and_move_the_teacher():
    method = small_dino(clip_grad=0.5, freeze_last_layer_iters=3, teacher_momentum=0.9)
    views = random_views("dino", batch=6)
    teacher_before = [p.detach().clone() for p in method.teacher_head.parameters()]
    method(views)["loss"].mul(100).backward()  # large gradients, to be clipped
    method.on_before_optimizer_step(epoch=0, iteration=2)
    assert all(p.grad is None for p in method.head.last_layer.parameters())  # frozen
    norms = [float(p.grad.norm()) for p in method.parameters() if p.grad is not None]
    assert max(norms) == pytest.approx(0.5, rel=1e-4) and min(norms) < 0.5
    torch.optim.SGD([p for p in method.parameters() if p.requires_grad], lr=0.1).step()
    method.on_after_optimizer_step(progress=0.5)
    tau = cosine_momentum(0.9, 0.5)
    assert method.tau == pytest.approx(tau)
    online = list(method.head.parameters())
    for old, new, now in zip(teacher_before, method.teacher_head.parameters(), online, strict=True):
        torch.testing.assert_close(new, tau * old + (1 - tau) * now.detach())
    method.zero_grad()
    method(views)["loss"].backward()
    method.on_before_optimizer_step(epoch=0, iteration=3)  # unfrozen from iteration 3
    assert method.head.last_layer.parametrizations.weight.original1.grad is not None


def test_head_layout_and_normalised_last_layer():
    method = small_dino(head_layers=3)
    kinds = [type(m).__name__ for m in method.head.mlp]
    assert kinds == ["Linear", "GELU", "Linear", "GELU", "Linear"]
    weight_norm = method.head.last_layer.parametrizations.weight
    assert torch.equal(weight_norm.original0, torch.ones(32, 1))  # g frozen at 1
    assert not weight_norm.original0.requires_grad
    torch.testing.assert_close(method.head.last_layer.weight.norm(dim=1), torch.ones(32))
    assert float(method.head.mlp[0].weight.detach().std()) == pytest.approx(
        0.02, rel=0.2
    )  # trunc_normal_
    assert small_dino(
        norm_last_layer=False
    ).head.last_layer.parametrizations.weight.original0.requires_grad


def test_recipes_follow_the_readme_resnet50_command():
    full = recipe_for("dino", "full")
    assert (full.arch, full.optimizer, full.base_lr, full.weight_decay) == (
        "resnet50",
        "sgd",
        0.03,
        1e-4,
    )
    assert (full.batch_size, full.epochs, full.warmup_epochs) == (512, 100, 10)
    assert (full.views.n_large, full.views.n_small, full.views.small_size) == (2, 8, 96)
    assert (full.views.large_scale, full.views.small_scale) == ((0.14, 1.0), (0.05, 0.14))
    assert (full.out_dim, full.student_temp, full.teacher_temp, full.center_momentum) == (
        65536,
        0.1,
        0.04,
        0.9,
    )
    assert full.lr(512) * full.final_lr_ratio == pytest.approx(1e-6)  # min_lr
    views = build_views("dino", "rgb", full.views).views
    assert [v.blur_p for v in views[:3]] == [1.0, 0.1, 0.5]  # global 1, global 2, local
    assert [v.solarize_p for v in views[:3]] == [0.0, 0.2, 0.0]


# --------------------------------------------------------------------------- collapse


def short_run(steps: int = 40, **overrides) -> tuple[float, float]:
    """Teacher entropy (of ln K) and spread over the last 10 of ``steps`` recipe steps on 16
    images of Blobs, with the recipe's views and optimiser around a small conv encoder."""
    torch.manual_seed(0)
    images = torch.stack(Blobs(n=64, size=32).images)
    method = build_method(
        "dino", tiny_encoder(width=32, batch_norm=True), "tiny", image_size=32, **overrides
    )
    optimizer, schedule = build_optimizer(method, method.recipe, 16, steps)
    augment = build_views(
        "dino", "rgb", method.recipe.views, generator=torch.Generator().manual_seed(0)
    )
    order = torch.Generator().manual_seed(0)
    entropy, spread = [], []
    for step in range(steps):
        views = augment(images[torch.randperm(64, generator=order)[:16]])
        out = method(views)
        optimizer.zero_grad()
        out["loss"].backward()
        method.on_before_optimizer_step(0, step)
        optimizer.step()
        schedule.step()
        method.on_after_optimizer_step((step + 1) / steps)
        entropy.append(float(out["teacher_entropy"]))
        spread.append(float(out["spread"]))
    return sum(entropy[-10:]) / 10, sum(spread[-10:]) / 10


def test_a_short_run_does_not_collapse_and_would_without_centring():
    """Thresholds: teacher entropy between 0.3 and 0.9 of ln K (without sharpening, T_t = 1, it
    is 1.00 from the first step: uniform collapse; without centring it falls below 0.3: one
    dimension takes over) and embedding spread above 0.2 (0 when every image maps to one point;
    docs/methods.md, DINO, gives the measured values)."""
    entropy, spread = short_run()
    assert 0.3 < entropy < 0.9 and spread > 0.2, (entropy, spread)
    uncentred, _ = short_run(center_momentum=1.0)  # C stays 0
    assert uncentred < 0.3, uncentred


# --------------------------------------------------------------------------- engine


def test_engine_run_resumes_to_the_same_student_teacher_and_center(tmp_path):
    """Through ``pretrain`` (``method="dino"``): a run resumed from its iteration-2 checkpoint
    ends with the uninterrupted run's weights, teacher, centre and teacher temperature."""

    def config(name: str) -> PretrainConfig:
        return PretrainConfig(
            dataset=Blobs(n=16, size=16),
            output_dir=tmp_path / name,
            method="dino",
            profile="tiny",
            arch="resnet18",
            image_size=16,
            batch_size=4,
            epochs=2,
            max_iterations=4,
            progress=False,
            checkpoint_every=2,
            n_saved=10,
            amp=False,
        )

    full = pretrain(config("full"))
    shutil.copytree(tmp_path / "full", tmp_path / "resumed")
    ckpts = tmp_path / "resumed" / "checkpoints"
    for path in ckpts.glob("checkpoint_*.pt"):  # as if killed after iteration 2's checkpoint
        if int(path.stem.split("_")[1]) > 2:
            path.unlink()
    resumed = pretrain(config("resumed"))
    assert resumed.resumed and resumed.iterations == full.iterations == 4
    a = torch_load_safe(latest_checkpoint(tmp_path / "full" / "checkpoints"))["model"]
    b = torch_load_safe(latest_checkpoint(ckpts))["model"]
    assert {"center", "teacher_temp", "teacher_head.mlp.0.weight"} <= set(a)
    assert not torch.equal(a["center"], torch.zeros_like(a["center"]))
    assert not torch.equal(a["teacher_encoder.conv1.weight"], a["encoder.conv1.weight"])
    for key, value in a.items():
        torch.testing.assert_close(b[key], value, rtol=0, atol=1e-6, msg=key)
    assert math.isfinite(full.last_loss)
