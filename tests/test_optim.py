"""LARS against the update rule written out by hand, parameter exclusion, lr scaling and the
warm-up + cosine schedule."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from medp2x.methods.base import Recipe, ViewSpec
from medp2x.optim import LARS, build_optimizer, scaled_lr, warmup_cosine


def _recipe(optimizer="lars", base_lr=0.3, weight_decay=0.05, warmup_epochs=0.0, epochs=100):
    return Recipe(
        method="simclr",
        profile="tiny",
        arch="resnet18",
        image_size=32,
        batch_size=512,
        epochs=epochs,
        optimizer=optimizer,
        base_lr=base_lr,
        weight_decay=weight_decay,
        warmup_epochs=warmup_epochs,
        views=ViewSpec(large_size=32),
    )


class Net(nn.Module):
    """Online layers (conv, BN, linear) plus a frozen target copy, like BYOL/MoCo."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(2, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 3, bias=False)
        self.target = nn.Linear(4, 3)
        self.target.requires_grad_(False)
        nn.init.uniform_(self.bn.weight, 0.5, 1.5)


def _set_grads(model: nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        if p.requires_grad:
            p.grad = torch.randn(p.shape, generator=g)


def test_lars_steps_equal_the_trust_ratio_formula_and_skip_bias_bn_and_frozen():
    model = Net()
    optimizer, _ = build_optimizer(model, _recipe(), batch_size=512, steps_per_epoch=10)
    lr, wd, eta, mom = 0.3 * 512 / 256, 0.05, 0.001, 0.9
    assert isinstance(optimizer, LARS) and optimizer.param_groups[0]["lr"] == pytest.approx(lr)
    adapted = {"conv.weight", "fc.weight"}
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    bufs = {n: torch.zeros_like(p) for n, p in params.items()}
    for step in range(3):
        _set_grads(model, step)
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        optimizer.step()
        for name, g in grads.items():
            w = params[name]
            if name in adapted:
                d = g + wd * w
                d = d * (eta * w.norm() / d.norm())
            else:  # conv.bias, bn.weight, bn.bias: plain momentum SGD, no decay
                d = g
            bufs[name] = d if step == 0 else mom * bufs[name] + d
            params[name] = w - lr * bufs[name]
    for name, p in model.named_parameters():
        assert torch.allclose(p, params[name], atol=1e-6, rtol=1e-5), name
    assert torch.equal(model.target.weight, Net().target.weight)  # frozen: never stepped


def test_lars_groups_exclude_exactly_biases_and_batchnorm():
    model = Net()
    optimizer, _ = build_optimizer(model, _recipe(), batch_size=256, steps_per_epoch=1)
    names = {id(p): n for n, p in model.named_parameters()}
    groups = [
        (g["lars_adapt"], g["weight_decay"], {names[id(p)] for p in g["params"]})
        for g in optimizer.param_groups
    ]
    assert groups == [
        (True, 0.05, {"conv.weight", "fc.weight"}),
        (False, 0.0, {"conv.bias", "bn.weight", "bn.bias"}),
    ]


def test_lars_keeps_the_plain_step_for_a_zero_weight():
    w = nn.Parameter(torch.zeros(3, 3))
    w.grad = torch.ones(3, 3)
    LARS([w], lr=0.1, weight_decay=0.0).step()
    assert torch.allclose(w, torch.full((3, 3), -0.1))


def test_lars_resumes_from_a_state_dict_written_before_trust_mode_existed():
    w = nn.Parameter(torch.ones(3))
    old = LARS([w], lr=0.1).state_dict()
    for group in old["param_groups"]:
        del group["trust_mode"], group["eps"]
    optimizer = LARS([w], lr=0.1, trust_mode="larc")
    optimizer.load_state_dict(old)
    assert optimizer.param_groups[0]["trust_mode"] == "lars"  # as the run was trained
    w.grad = torch.ones(3)
    optimizer.step()
    torch.testing.assert_close(w.detach(), torch.full((3,), 1 - 0.1 * 0.001))


def test_schedule_warms_up_linearly_then_follows_a_cosine_to_zero():
    model = Net()
    recipe = _recipe(warmup_epochs=2, epochs=12)
    optimizer, scheduler = build_optimizer(model, recipe, batch_size=1024, steps_per_epoch=10)
    peak, warmup, total = 0.3 * 1024 / 256, 20, 120
    lrs = []
    for _ in range(total + 1):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs[0] == pytest.approx(peak / warmup)
    assert lrs[9] == pytest.approx(peak * 10 / warmup)
    assert lrs[warmup - 1] == pytest.approx(peak) and lrs[warmup] == pytest.approx(peak)
    assert lrs[70] == pytest.approx(peak / 2)  # half way through the cosine
    assert lrs[100] == pytest.approx(peak * 0.5 * (1 + math.cos(math.pi * 80 / 100)))
    assert lrs[total] == pytest.approx(0.0, abs=1e-12)
    assert all(a >= b for a, b in zip(lrs[warmup:], lrs[warmup + 1 :], strict=False))
    assert all(g["lr"] == lrs[-1] for g in optimizer.param_groups)  # excluded group follows


def test_schedule_without_warmup_starts_at_the_peak():
    factor = warmup_cosine(0, 10)
    assert [factor(0), factor(5), factor(10), factor(11)] == pytest.approx([1.0, 0.5, 0.0, 0.0])


def test_lr_scaling_by_batch_size():
    assert scaled_lr(0.3, 4096, 256) == pytest.approx(4.8)
    assert scaled_lr(0.03, 4096, 0) == scaled_lr(0.03, 4096, None) == 0.03


@pytest.mark.parametrize(
    "name,cls", [("sgd", torch.optim.SGD), ("adam", torch.optim.Adam), ("adamw", torch.optim.AdamW)]
)
def test_other_optimizers_decay_every_trainable_parameter_like_the_originals(name, cls):
    model = Net()
    recipe = _recipe(optimizer=name, base_lr=0.03, weight_decay=1e-4)
    recipe.lr_batch_divisor = 0  # MoCo v2 / HPT: lr not scaled by batch size
    optimizer, _ = build_optimizer(model, recipe, batch_size=64, steps_per_epoch=5)
    assert type(optimizer) is cls and len(optimizer.param_groups) == 1
    (group,) = optimizer.param_groups
    assert group["lr"] == pytest.approx(0.03) and group["weight_decay"] == 1e-4
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert {id(p) for p in group["params"]} == {id(p) for p in trainable}
    if name == "sgd":
        assert group["momentum"] == 0.9


def test_exclusion_can_be_switched_by_the_recipe():
    recipe = SimpleNamespace(
        optimizer="sgd", base_lr=0.1, lr_batch_divisor=256, weight_decay=1e-4, momentum=0.9,
        warmup_epochs=0, epochs=1, exclude_bias_and_norm=True,
    )  # fmt: skip
    optimizer, _ = build_optimizer(Net(), recipe, batch_size=256, steps_per_epoch=1)
    assert [g["weight_decay"] for g in optimizer.param_groups] == [1e-4, 0.0]


def test_bad_settings_raise():
    with pytest.raises(ValueError, match="unknown optimizer"):
        build_optimizer(Net(), _recipe(optimizer="rmsprop"), 32, 1)
    with pytest.raises(ValueError, match="no trainable parameters"):
        build_optimizer(nn.Linear(2, 2).requires_grad_(False), _recipe(), 32, 1)


# ----------------------------------------------------------------- SwAV: main_swav.py's LARC


def _swav_full(**overrides):
    from medp2x.methods import recipe_for

    return recipe_for("swav", "full", **overrides)


def test_swav_larc_covers_every_parameter_with_weight_decay_and_the_trust_ratio():
    """main_swav.py wraps ``SGD(model.parameters(), weight_decay=wd)`` in LARC: no exclusions."""
    model = Net()
    optimizer, _ = build_optimizer(model, _swav_full(), batch_size=1024, steps_per_epoch=10)
    assert isinstance(optimizer, LARS) and len(optimizer.param_groups) == 1
    (group,) = optimizer.param_groups
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert {id(p) for p in group["params"]} == trainable  # biases and BN included
    assert (group["weight_decay"], group["lars_adapt"]) == (1e-6, True)
    assert (group["trust_mode"], group["trust_coefficient"]) == ("larc", 0.001)


def test_swav_larc_step_equals_apex_larc_then_momentum_sgd_by_hand():
    """apex LARC (clip=False) then torch SGD (momentum 0.9, its own decay switched off), by hand:
    where ||w|| > 0 and ||g|| > 0, d = (g + wd w) * eta ||w|| / (||g|| + wd ||w|| + eps), else
    d = g with no decay at all; v = d at the first step, then 0.9 v + d; w -= lr v.
    bn.bias starts at 0 and fc.weight gets a zero gradient at step 1: both take the plain step."""
    model = Net()
    wd, eta, eps, mom = 0.05, 0.001, 1e-8, 0.9  # a large decay so that its placement shows
    recipe = _swav_full(weight_decay=wd, warmup_epochs=0)
    optimizer, scheduler = build_optimizer(model, recipe, batch_size=256, steps_per_epoch=100)
    params = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert float(params["bn.bias"].norm()) == 0.0
    bufs = {}
    for step in range(3):
        _set_grads(model, step)
        if step == 1:
            model.fc.weight.grad.zero_()
        lr = optimizer.param_groups[0]["lr"]
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        optimizer.step()
        scheduler.step()
        for name, g in grads.items():
            w = params[name]
            w_norm, g_norm = float(w.norm()), float(g.norm())
            if w_norm > 0 and g_norm > 0:
                d = (g + wd * w) * (eta * w_norm / (g_norm + wd * w_norm + eps))
            else:
                d = g
            bufs[name] = d if step == 0 else mom * bufs[name] + d
            params[name] = w - lr * bufs[name]
    for name, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.detach(), params[name], atol=1e-7, rtol=1e-6)
    assert torch.equal(model.target.weight, Net().target.weight)


def _main_swav_schedule(base_lr, final_lr, start_warmup, warmup_epochs, epochs, iters_per_epoch):
    """main_swav.py's ``lr_schedule`` array, written out as there (numpy)."""
    np = pytest.importorskip("numpy")
    warmup = np.linspace(start_warmup, base_lr, iters_per_epoch * warmup_epochs)
    cosine_steps = iters_per_epoch * (epochs - warmup_epochs)
    cosine = np.array(
        [
            final_lr + 0.5 * (base_lr - final_lr) * (1 + math.cos(math.pi * t / cosine_steps))
            for t in np.arange(cosine_steps)
        ]
    )
    return np.concatenate((warmup, cosine))


@pytest.mark.parametrize("batch", [4096, 1024, 256])
def test_swav_schedule_equals_main_swav_lr_schedule_scaled_by_batch(batch):
    """At 4096 the recipe is the original's scripts (4.8, final 0.0048, warm-up from 0.3); at
    other batches the peak, the start and the end scale together (linear rule, per 256)."""
    recipe = _swav_full(epochs=12, warmup_epochs=2)
    optimizer, scheduler = build_optimizer(Net(), recipe, batch_size=batch, steps_per_epoch=10)
    peak = 0.3 * batch / 256
    expected = _main_swav_schedule(peak, peak / 1000, peak / 16, 2, 12, 10)
    lrs = []
    for _ in range(len(expected) + 1):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs[0] == pytest.approx(peak / 16)  # the first iteration: start_warmup
    if batch == 4096:
        assert (lrs[0], lrs[19], lrs[-1]) == pytest.approx((0.3, 4.8, 0.0048))
    assert lrs[:-1] == pytest.approx(expected.tolist(), rel=1e-12)
    assert lrs[-1] == pytest.approx(peak / 1000)  # the cosine ends at final_lr = base_lr / 1000


def test_schedule_with_start_and_end_ratios():
    factor = warmup_cosine(5, 15, start_ratio=0.2, final_ratio=0.01)
    assert [factor(i) for i in range(5)] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0])
    assert factor(10) == pytest.approx(0.01 + 0.99 * 0.5)
    assert factor(15) == factor(20) == pytest.approx(0.01)


@pytest.mark.parametrize(
    "field,value", [("trust_mode", "lamb"), ("final_lr_ratio", -0.1), ("start_warmup_ratio", 2.0)]
)
def test_bad_swav_optimiser_settings_name_the_field(field, value):
    recipe = _swav_full()
    setattr(recipe, field, value)  # as a config file would, past the dataclass
    with pytest.raises(ValueError, match=field):
        build_optimizer(Net(), recipe, 32, 1)
