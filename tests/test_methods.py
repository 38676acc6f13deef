"""SSL methods: each loss against a loop-over-samples re-implementation of its formula, the
per-step mechanics (EMA schedule, prototype freezing/normalisation, Sinkhorn marginals, queue
order) and a tiny training run of every method."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from medp2x.methods import METHODS, build_method, method_class, recipe_for
from medp2x.methods.base import embedding_spread, prediction_entropy
from medp2x.methods.heads import mlp
from medp2x.methods.losses import (
    info_nce,
    nt_xent,
    regression_loss,
    sinkhorn,
    swapped_prediction_loss,
)
from medp2x.methods.momentum import cosine_momentum as target_momentum
from medp2x.monitor import rankme
from medp2x.networks import build_encoder


def tiny_encoder(width: int = 16, batch_norm: bool = False) -> nn.Module:
    """Two convs, no BN by default: fast, and per-sample so loss references stay simple."""
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, stride=2, padding=1),
        nn.BatchNorm2d(8) if batch_norm else nn.Identity(),
        nn.ReLU(),
        nn.Conv2d(8, width, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
    )
    net.feature_dim = width
    return net


def random_views(method: str, batch: int = 8, large: int = 32, small: int = 16, seed: int = 0):
    recipe = recipe_for(method, "tiny")
    g = torch.Generator().manual_seed(seed)
    sizes = [large] * recipe.views.n_large + [small] * recipe.views.n_small
    return [torch.rand(batch, 3, s, s, generator=g) for s in sizes]


# --------------------------------------------------------------------------- recipes


def test_recipes_follow_the_published_settings():
    simclr = recipe_for("simclr", "full")
    assert (simclr.arch, simclr.image_size, simclr.optimizer) == ("resnet50", 224, "lars")
    assert simclr.lr(4096) == pytest.approx(0.3 * 4096 / 256)
    assert (simclr.weight_decay, simclr.temperature, simclr.proj_out_dim) == (1e-6, 0.1, 128)
    tiny = recipe_for("simclr", "tiny")
    assert tiny.arch == "resnet18" and tiny.image_size <= 64 and tiny.batch_size <= 64


@pytest.mark.parametrize("name", METHODS)
def test_each_recipe_table_names_its_method_and_profile_and_is_never_shared(name):
    """The registry hands out copies: a run that edits its recipe leaves the table alone."""
    for profile in ("full", "tiny"):
        recipe = recipe_for(name, profile)
        assert (recipe.method, recipe.profile) == (name, profile)
        recipe.views.n_small, recipe.epochs = 99, -1
        assert recipe_for(name, profile) == method_class(name).recipes[profile] != recipe


def test_override_unknown_name_lists_valid_ones():
    with pytest.raises(ValueError, match="unknown simclr recipe option.*temperature"):
        recipe_for("simclr", "tiny", temprature=0.2)
    with pytest.raises(ValueError, match="unknown SSL method"):
        recipe_for("barlow", "tiny")
    with pytest.raises(ValueError, match="unknown profile"):
        recipe_for("simclr", "huge")


def test_image_size_override_resizes_views():
    r = recipe_for("simclr", "full", image_size=96, temperature=0.5)
    assert (r.image_size, r.views.large_size, r.temperature) == (96, 96, 0.5)
    r = recipe_for(
        "simclr", "full", views={"n_large": 2, "large_size": 160, "large_scale": [0.2, 1]}
    )
    assert r.views.large_size == 160 and r.views.large_scale == (0.2, 1)
    swav_small = recipe_for("swav", "full", image_size=112)
    assert (swav_small.views.large_size, swav_small.views.small_size) == (112, 48)
    with pytest.raises(ValueError, match="exactly 2 large views"):
        build_method("byol", tiny_encoder(), "tiny", views={"n_small": 2})


def test_mlp_layout():
    head = mlp([512, 512, 64], batch_norm=True, bias=False, last_batch_norm=True)
    kinds = [type(m).__name__ for m in head]
    assert kinds == ["Linear", "BatchNorm1d", "ReLU", "Linear", "BatchNorm1d"]
    assert head[0].bias is None and head[-1].bias is None and head[-1].weight is not None


# --------------------------------------------------------------------------- SimCLR


def reference_nt_xent(z1: torch.Tensor, z2: torch.Tensor, tau: float) -> float:
    """SimCLR paper eq. (1) averaged over all 2N anchors, one anchor at a time."""
    z = F.normalize(torch.cat([z1, z2]).double(), dim=1)
    n2, n = len(z), len(z1)
    total = 0.0
    for i in range(n2):
        positive = (i + n) % n2
        denom = sum(math.exp(float(z[i] @ z[k]) / tau) for k in range(n2) if k != i)
        total += -math.log(math.exp(float(z[i] @ z[positive]) / tau) / denom)
    return total / n2


@pytest.mark.parametrize("tau", [0.1, 0.5])
def test_nt_xent_matches_formula(tau):
    g = torch.Generator().manual_seed(1)
    z1, z2 = torch.randn(6, 5, generator=g), torch.randn(6, 5, generator=g)
    got = nt_xent(z1, z2, tau)["loss"]
    assert float(got) == pytest.approx(reference_nt_xent(z1, z2, tau), rel=1e-5)


def test_simclr_head_width_follows_encoder():
    method = build_method("simclr", build_encoder("resnet18"), "tiny")
    assert method.projector[0].in_features == 512 == method.projector[0].out_features
    assert method.projector[3].out_features == method.recipe.proj_out_dim
    with pytest.raises(ValueError, match="expects 2 views"):
        method([torch.rand(2, 3, 32, 32)])


def test_simclr_bn_statistics_span_both_views_unless_per_view():
    """TF SimCLR normalises the encoder's BN over both views (one batch of 2N); lightly and
    solo-learn over each view alone. ``bn_per_view`` must give exactly the per-view pass."""
    views = random_views("simclr", batch=6)
    encoder = tiny_encoder(batch_norm=True)
    joint = build_method("simclr", encoder, recipe=recipe_for("simclr", "tiny"))
    per_view = build_method(
        "simclr", encoder, recipe=recipe_for("simclr", "tiny", bn_per_view=True)
    )
    per_view.projector.load_state_dict(joint.projector.state_dict())
    tau = joint.recipe.temperature

    def loss(method) -> float:
        return float(method(views)["loss"].detach())

    with torch.no_grad():
        z0, z1 = (joint.projector(encoder(v)) for v in views)
        z = joint.projector(encoder(torch.cat(views)))
        by_view = float(nt_xent(z0, z1, tau)["loss"])
        together = float(nt_xent(z[:6], z[6:], tau)["loss"])
    assert loss(per_view) == pytest.approx(by_view, rel=1e-6)
    assert loss(joint) == pytest.approx(together, rel=1e-6)
    assert abs(together - by_view) > 1e-4  # the two passes really differ


def test_simclr_head_ends_in_scale_only_bn_or_in_a_biased_linear():
    tf_head = build_method("simclr", tiny_encoder(), "tiny").projector
    assert type(tf_head[-1]).__name__ == "BatchNorm1d" and tf_head[-1].bias is None
    assert tf_head[-2].bias is None
    lightly_head = build_method(
        "simclr", tiny_encoder(), recipe=recipe_for("simclr", "tiny", proj_last_batch_norm=False)
    ).projector
    assert [type(m).__name__ for m in lightly_head] == ["Linear", "BatchNorm1d", "ReLU", "Linear"]
    assert lightly_head[0].bias is None and lightly_head[-1].bias is not None


# --------------------------------------------------------------------------- SwAV


def reference_sinkhorn(scores: torch.Tensor, eps: float, iters: int) -> torch.Tensor:
    """Algorithm of the SwAV paper, one row and one column at a time."""
    q = torch.exp(scores.double() / eps).T.clone()  # K x B
    k, b = q.shape
    q /= q.sum()
    for _ in range(iters):
        for row in range(k):
            q[row] /= q[row].sum() * k
        for col in range(b):
            q[:, col] /= q[:, col].sum() * b
    return (q * b).T


def test_sinkhorn_matches_reference_and_balances_clusters():
    g = torch.Generator().manual_seed(2)
    scores = F.normalize(torch.randn(12, 7, generator=g), dim=1)
    q = sinkhorn(scores, 0.05, 3)
    torch.testing.assert_close(
        q.double(), reference_sinkhorn(scores, 0.05, 3), rtol=1e-5, atol=1e-7
    )
    torch.testing.assert_close(q.sum(dim=1), torch.ones(12))  # each sample fully assigned
    many = sinkhorn(scores, 0.05, 200)  # converged: every prototype gets B/K samples
    torch.testing.assert_close(many.sum(dim=0), torch.full((7,), 12 / 7), rtol=1e-4, atol=1e-4)
    tiny_eps = sinkhorn(scores, 0.001, 3)  # would overflow exp() without the shared shift
    assert torch.isfinite(tiny_eps).all()


def reference_swapped_loss(scores, assignments, n_views, tau):
    bs = scores.shape[0] // n_views
    total = 0.0
    for crop, q in enumerate(assignments):
        sub = 0.0
        others = [v for v in range(n_views) if v != crop]
        for v in others:
            for i in range(bs):
                s = scores[v * bs + i].double() / tau
                log_p = s - torch.logsumexp(s, 0)
                sub += -float((q[i].double() * log_p).sum()) / bs
        total += sub / len(others)
    return total / len(assignments)


def test_swapped_prediction_loss_matches_formula():
    g = torch.Generator().manual_seed(3)
    scores = torch.randn(4 * 5, 6, generator=g)  # 4 views, batch 5, 6 prototypes
    assignments = [torch.softmax(torch.randn(5, 6, generator=g), 1) for _ in range(2)]
    got = swapped_prediction_loss(scores, assignments, 4, 0.1)
    assert float(got) == pytest.approx(
        reference_swapped_loss(scores, assignments, 4, 0.1), rel=1e-5
    )


def swav(**overrides):
    torch.manual_seed(0)
    base = {"n_prototypes": 10, "queue_length": 0}
    return build_method("swav", tiny_encoder(), "tiny", **{**base, **overrides})


def test_swav_forward_equals_sinkhorn_plus_swapped_prediction():
    method = swav().eval()
    views = random_views("swav", batch=6)
    with torch.no_grad():
        emb = F.normalize(method.projector(torch.cat([method.encoder(v) for v in views])), dim=1)
        scores = emb @ method.prototypes.weight.T
        q = [sinkhorn(scores[c * 6 : (c + 1) * 6], 0.05, 3) for c in range(2)]
        expected = reference_swapped_loss(scores, q, 4, method.recipe.temperature)
        got = method(views)["loss"]
    assert float(got) == pytest.approx(expected, rel=1e-5)


def one_step(method, views, epoch: int, iteration: int, lr: float = 0.1):
    optimizer = torch.optim.SGD(method.parameters(), lr=lr, momentum=0.9, weight_decay=1e-4)
    optimizer.zero_grad()
    method(views)["loss"].backward()
    method.on_before_optimizer_step(epoch, iteration)
    optimizer.step()
    method.on_after_optimizer_step(progress=0.5)


@pytest.mark.parametrize(
    ("overrides", "epoch", "iteration", "frozen"),
    [
        ({"freeze_prototypes_iters": 5}, 3, 4, True),
        ({"freeze_prototypes_iters": 5}, 0, 5, False),
        ({"freeze_prototypes_iters": None, "freeze_prototypes_epochs": 1}, 0, 50, True),
        ({"freeze_prototypes_iters": None, "freeze_prototypes_epochs": 1}, 1, 50, False),
    ],
)
def test_swav_prototypes_frozen_then_trained(overrides, epoch, iteration, frozen):
    method = swav(**overrides)
    before = method.prototypes.weight.detach().clone()
    one_step(method, random_views("swav", batch=6), epoch, iteration)
    after = method.prototypes.weight.detach()
    change = float((after - before).abs().max())
    # frozen: only the per-step re-normalisation of unit rows touches them (float rounding)
    assert (change < 1e-6) if frozen else (change > 1e-3), change
    torch.testing.assert_close(after.norm(dim=1), torch.ones(10))  # unit rows after every step


def test_swav_prototypes_start_normalised():
    assert torch.allclose(swav().prototypes.weight.norm(dim=1), torch.ones(10))


def test_swav_queue_starts_at_configured_epoch_and_is_used_once_full():
    method = swav(queue_length=24, queue_start_epoch=1)  # 24 rows = 4 batches of 6
    views = random_views("swav", batch=6)
    method.on_before_optimizer_step(epoch=0, iteration=0)
    method(views)
    assert method.queue is None
    method.on_before_optimizer_step(epoch=1, iteration=10)
    used = [float(method(views)["queue_used"]) for _ in range(5)]
    assert used == [0.0, 0.0, 0.0, 0.0, 1.0]
    with torch.no_grad():  # projector BN in train mode: statistics over all crops, as in forward
        emb = F.normalize(method.projector(torch.cat([method.encoder(v) for v in views])), dim=1)
    torch.testing.assert_close(method.queue[1, :6], emb[6:12])  # crop 1, newest entries first
    torch.testing.assert_close(method.queue[0, 6:12], emb[:6])  # crop 0, one batch older
    with pytest.raises(ValueError, match="queue_length"):
        small = swav(queue_length=6, queue_start_epoch=0)
        small(views)


def test_swav_recipe_has_main_swav_optimiser():
    """LARC over every parameter, cosine to base_lr / 1000, warm-up from start_warmup: the
    original's batch-4096 scripts (4.8, 0.0048, 0.3) when scaled to 4096."""
    full = recipe_for("swav", "full")
    assert (full.optimizer, full.trust_mode, full.exclude_bias_and_norm) == ("lars", "larc", False)
    assert (full.weight_decay, full.warmup_epochs, full.momentum) == (1e-6, 10, 0.9)
    peak = full.lr(4096)
    assert (peak, peak * full.start_warmup_ratio, peak * full.final_lr_ratio) == pytest.approx(
        (4.8, 0.3, 0.0048)
    )
    assert recipe_for("swav", "tiny").final_lr_ratio == pytest.approx(0.001)


def test_swav_larc_step_skips_frozen_prototypes_and_moves_every_other_parameter():
    """With the recipe's own optimiser: frozen prototypes have no gradient, so LARC neither
    decays nor moves them; all other parameters (biases and BN included) take a step."""
    from medp2x.optim import build_optimizer

    method = swav(optimizer="lars", freeze_prototypes_iters=1)
    optimizer, _ = build_optimizer(method, method.recipe, batch_size=6, steps_per_epoch=10)
    before = {n: p.detach().clone() for n, p in method.named_parameters()}
    method(random_views("swav", batch=6))["loss"].backward()
    method.on_before_optimizer_step(epoch=0, iteration=0)
    optimizer.step()
    for name, p in method.named_parameters():
        if name.startswith("prototypes"):
            assert torch.equal(p, before[name]) and not optimizer.state[p]
        else:
            assert not torch.equal(p, before[name]), name


# --------------------------------------------------------------------------- BYOL


def test_byol_target_momentum_schedule():
    assert target_momentum(0.996, 0.0) == pytest.approx(0.996)
    assert target_momentum(0.996, 0.5) == pytest.approx(0.998)
    assert target_momentum(0.996, 1.0) == pytest.approx(1.0)


def test_byol_regression_loss_matches_formula():
    g = torch.Generator().manual_seed(4)
    p, z = torch.randn(5, 8, generator=g), torch.randn(5, 8, generator=g)
    expected = [2 - 2 * float(p[i] @ z[i]) / float(p[i].norm() * z[i].norm()) for i in range(5)]
    torch.testing.assert_close(regression_loss(p, z), torch.tensor(expected))


def test_byol_loss_is_symmetrised_and_target_gets_no_gradient():
    torch.manual_seed(0)
    method = build_method("byol", tiny_encoder(), "tiny").eval()
    v1, v2 = random_views("byol", batch=5)
    out = method([v1, v2])
    with torch.no_grad():
        p1 = method.predictor(method.projector(method.encoder(v1)))
        p2 = method.predictor(method.projector(method.encoder(v2)))
        z1 = method.target_projector(method.target_encoder(v1))
        z2 = method.target_projector(method.target_encoder(v2))
    expected = (regression_loss(p1, z2) + regression_loss(p2, z1)).mean()
    assert float(out["loss"].detach()) == pytest.approx(float(expected.detach()), rel=1e-6)
    out["loss"].backward()
    assert all(p.grad is None and not p.requires_grad for p in method.target_encoder.parameters())
    assert all(p.grad is not None for p in method.encoder.parameters())


def test_byol_target_moves_as_ema_of_online():
    torch.manual_seed(0)
    method = build_method("byol", tiny_encoder(), "tiny")
    target_before = [p.detach().clone() for p in method.target_encoder.parameters()]
    one_step(method, random_views("byol", batch=5), 0, 0)  # on_after_optimizer_step(0.5)
    tau = target_momentum(method.recipe.tau_base, 0.5)
    assert method.tau == pytest.approx(tau)
    for old, new, online in zip(
        target_before, method.target_encoder.parameters(), method.encoder.parameters(), strict=True
    ):
        torch.testing.assert_close(new, tau * old + (1 - tau) * online.detach())
    assert not torch.equal(target_before[0], next(method.target_encoder.parameters()))
    method.reset_momentum_encoders()
    for target, online in zip(
        method.target_encoder.parameters(), method.encoder.parameters(), strict=True
    ):
        assert torch.equal(target, online)


# --------------------------------------------------------------------------- MoCo


def test_info_nce_matches_formula():
    g = torch.Generator().manual_seed(5)
    q, k = torch.randn(4, 6, generator=g), torch.randn(4, 6, generator=g)
    queue = F.normalize(torch.randn(9, 6, generator=g), dim=1)
    tau = 0.2
    qn, kn = F.normalize(q, dim=1), F.normalize(k, dim=1)
    expected = 0.0
    for i in range(4):
        pos = math.exp(float(qn[i] @ kn[i]) / tau)
        neg = sum(math.exp(float(qn[i] @ queue[j]) / tau) for j in range(9))
        expected += -math.log(pos / (pos + neg)) / 4
    assert float(info_nce(q, k, queue, tau)["loss"]) == pytest.approx(expected, rel=1e-5)


def test_moco_queue_is_a_ring_buffer_in_batch_order():
    method = build_method("moco", tiny_encoder(), "tiny", queue_length=10, proj_out_dim=3)
    batches = [torch.full((4, 3), float(i)) for i in (1, 2, 3)]
    for batch in batches:
        method.enqueue(batch)
    rows = method.queue[:, 0].tolist()
    assert rows == [3, 3, 1, 1, 2, 2, 2, 2, 3, 3]  # the third batch wrapped around
    assert int(method.queue_ptr) == 2


def test_moco_forward_enqueues_keys_and_key_encoder_follows_momentum():
    torch.manual_seed(0)
    method = build_method("moco", tiny_encoder(), "tiny", queue_length=16, bn_splits=1)
    v1, v2 = random_views("moco", batch=4)
    with torch.no_grad():
        keys = F.normalize(method.key_projector(method.key_encoder(v2)), dim=1)
    old_queue = method.queue.clone()
    key_before = [p.detach().clone() for p in method.key_encoder.parameters()]
    one_step(method, [v1, v2], 0, 0)
    torch.testing.assert_close(method.queue[:4], keys)
    assert torch.equal(method.queue[4:], old_queue[4:]) and int(method.queue_ptr) == 4
    m = method.recipe.key_momentum
    for old, new, online in zip(
        key_before, method.key_encoder.parameters(), method.encoder.parameters(), strict=True
    ):
        torch.testing.assert_close(new, m * old + (1 - m) * online.detach())
    assert "queue" in method.state_dict() and "key_encoder.0.weight" in method.state_dict()


def test_moco_one_process_simulates_shuffled_bn_groups():
    """One process, bn_splits=2: queries go through the encoder in two contiguous groups; keys
    are shuffled, go through the key network in two groups and are unshuffled (the authors'
    CIFAR demo), so a query and its key do not share BN statistics."""
    torch.manual_seed(0)
    encoder = tiny_encoder(batch_norm=True)
    method = build_method("moco", encoder, "tiny", queue_length=16, bn_splits=2)
    v1, v2 = random_views("moco", batch=8)
    queue = method.queue.clone()
    torch.manual_seed(1)
    order = torch.randperm(8)
    with torch.no_grad():
        q = method.projector(torch.cat([method.encoder(v1[:4]), method.encoder(v1[4:])]))
        shuffled = v2[order]
        k = torch.cat([method.key_encoder(shuffled[:4]), method.key_encoder(shuffled[4:])])
        k = method.key_projector(k)[torch.argsort(order)]
        unsplit_k = method.key_projector(method.key_encoder(v2))
    assert not torch.allclose(k, unsplit_k, atol=1e-3)  # the groups' statistics matter
    torch.manual_seed(1)
    out = method([v1, v2])
    expected = info_nce(q, k, queue, method.recipe.temperature)["loss"]
    torch.testing.assert_close(out["loss"], expected)
    torch.testing.assert_close(method.queue[:8], F.normalize(k, dim=1))


def test_moco_symmetric_sums_both_directions_and_enqueues_both_key_sets():
    """The authors' CIFAR demo: loss_12 + loss_21 against the same queue, then cat([k1, k2])
    enters the queue."""
    torch.manual_seed(0)
    method = build_method("moco", tiny_encoder(), "tiny", queue_length=16, bn_splits=1)
    method = build_method("moco", method.encoder, recipe=method.recipe, symmetric=True)
    v1, v2 = random_views("moco", batch=4)
    queue = method.queue.clone()
    with torch.no_grad():
        q1, q2 = (method.projector(method.encoder(v)) for v in (v1, v2))
        k1, k2 = (method.key_projector(method.key_encoder(v)) for v in (v1, v2))
        out = method([v1, v2])
    t = method.recipe.temperature
    expected = info_nce(q1, k2, queue, t)["loss"] + info_nce(q2, k1, queue, t)["loss"]
    torch.testing.assert_close(out["loss"], expected)
    torch.testing.assert_close(method.queue[:8], F.normalize(torch.cat([k1, k2]), dim=1))
    assert int(method.queue_ptr) == 8 and torch.equal(method.queue[8:], queue[8:])


# --------------------------------------------------------------------------- restructure guard

# Each method's loss on fixed views at seed 0, before and after one SGD step, and its saved
# module names (beside the encoder), as the code gave them before the methods package was
# restructured (issue #17, commit 02ddd22). Moving heads, losses, momentum copies or recipes
# must change none of them: equal numbers mean equal initialisation order, forward and step;
# equal names mean existing checkpoints still resume.
BEFORE_RESTRUCTURE = {
    "simclr": (3.0180459022521973, 1.7091866731643677, {"projector": 11}),
    "swav": (4.933867454528809, 4.616273880004883, {"projector": 9, "prototypes": 1}),
    "byol": (
        4.074047565460205,
        1.2213661670684814,
        {"predictor": 8, "projector": 8, "target_encoder": 9, "target_projector": 8},
    ),
    "moco": (
        2.244385242462158,
        3.230323076248169,
        {"key_encoder": 9, "key_projector": 4, "projector": 4, "queue": 1, "queue_ptr": 1},
    ),
}


@pytest.mark.parametrize("name", sorted(BEFORE_RESTRUCTURE))
def test_losses_steps_and_saved_names_are_unchanged_by_the_restructure(name):
    first, second, saved = BEFORE_RESTRUCTURE[name]
    torch.manual_seed(0)
    method = build_method(name, tiny_encoder(batch_norm=True), "tiny")
    views = random_views(name, batch=8)
    assert float(method(views)["loss"].detach()) == pytest.approx(first, rel=1e-5)
    one_step(method, views, 0, 0)
    assert float(method(views)["loss"].detach()) == pytest.approx(second, rel=1e-5)
    names: dict[str, int] = {}
    for key in method.state_dict():
        if not key.startswith("encoder."):
            names[key.split(".")[0]] = names.get(key.split(".")[0], 0) + 1
    assert names == saved


# --------------------------------------------------------------------------- every method


def test_methods_tuple():
    assert METHODS == ("simclr", "swav", "byol", "moco", "dino")


def test_embedding_spread_is_one_for_spread_out_and_zero_for_collapsed_embeddings():
    g = torch.Generator().manual_seed(0)
    spread_out = torch.randn(4096, 64, generator=g)
    assert float(embedding_spread(spread_out)) == pytest.approx(1.0, abs=0.02)
    collapsed = torch.randn(1, 64, generator=g).repeat(256, 1) * torch.rand(256, 1, generator=g)
    assert float(embedding_spread(collapsed)) < 1e-5  # one direction, any lengths
    one_axis = torch.zeros(256, 64)
    one_axis[:, 0] = torch.randn(256, generator=g)  # +-e0: two points on the sphere
    assert float(embedding_spread(one_axis)) == pytest.approx(1 / 8, abs=0.01)


def test_rankme_counts_the_directions_features_use():
    """k orthogonal directions of equal energy have effective rank k; unequal energies less
    (closed form from the singular values); one direction, whatever the lengths, 1."""
    g = torch.Generator().manual_seed(0)
    basis, _ = torch.linalg.qr(torch.randn(64, 64, generator=g, dtype=torch.float64))
    coefficients = torch.zeros(300, 64, dtype=torch.float64)
    coefficients[:100, 0] = coefficients[100:200, 1] = coefficients[200:, 2] = 1.0
    assert rankme(coefficients @ basis.T) == pytest.approx(3.0, rel=1e-4)
    coefficients[:100, 0] = 2.0  # singular values 20, 10, 10: p = 1/2, 1/4, 1/4
    expected = math.exp(-(0.5 * math.log(0.5) + 2 * 0.25 * math.log(0.25)))
    assert rankme(coefficients @ basis.T) == pytest.approx(expected, rel=1e-4)
    one_direction = torch.rand(50, 1, generator=g) * torch.randn(1, 64, generator=g)
    assert rankme(one_direction) == pytest.approx(1.0, rel=1e-4)


def test_prediction_entropy_is_one_for_uniform_predictions():
    assert float(prediction_entropy(torch.full((4, 16), 0.3), 0.1)) == pytest.approx(1.0)
    peaked = torch.eye(16)[:4]  # scores 1 vs 0 at T = 0.1: p = e^10 / (e^10 + 15)
    p = math.exp(10) / (math.exp(10) + 15)
    expected = -(p * math.log(p) + (1 - p) * math.log((1 - p) / 15)) / math.log(16)
    assert float(prediction_entropy(peaked, 0.1)) == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("name", METHODS)
def test_every_method_reports_its_embedding_spread(name):
    method = build_method(name, tiny_encoder(), "tiny")
    out = method(random_views(name, batch=8))
    assert 0.0 < float(out["spread"]) < 3.0 and not out["spread"].requires_grad
    if name == "swav":
        assert 0.0 < float(out["prediction_entropy"]) <= 1.0


@pytest.mark.parametrize("name", METHODS)
def test_bf16_autocast_keeps_losses_in_float32(name):
    torch.manual_seed(0)
    overrides = {"swav": {"queue_length": 24, "queue_start_epoch": 0}}.get(name, {})
    method = build_method(name, tiny_encoder(), "tiny", **overrides)
    views = random_views(name, batch=6)
    for step in range(5):  # SwAV: 4 batches fill the queue, the 5th uses it
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = method(views)
        assert out["loss"].dtype == torch.float32 and torch.isfinite(out["loss"])
        out["loss"].backward()
        method.on_before_optimizer_step(epoch=0, iteration=step)
        method.on_after_optimizer_step(progress=0.1)
    assert all(torch.isfinite(p.grad).all() for p in method.encoder.parameters())
    if name == "swav":
        assert float(out["queue_used"]) == 1.0


@pytest.mark.parametrize("name", METHODS)
def test_tiny_training_reduces_loss_and_grads_are_finite(name):
    """Eight SGD steps on one fixed batch with the real tiny recipe (ResNet-18, 32 px views)."""
    torch.manual_seed(0)
    method = build_method(name, build_encoder("resnet18"), "tiny")
    views = random_views(name, batch=8)
    params = [p for p in method.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=0.05, momentum=0.9)
    losses = []
    for step in range(8):
        out = method(views)
        optimizer.zero_grad()
        out["loss"].backward()
        if step == 0:
            missing = [
                n for n, p in method.named_parameters() if p.requires_grad and p.grad is None
            ]
            assert not missing, f"no gradient reached {missing}"
            bad = [
                n
                for n, p in method.named_parameters()
                if p.grad is not None and not torch.isfinite(p.grad).all()
            ]
            assert not bad, f"non-finite gradients in {bad}"
        method.on_before_optimizer_step(epoch=0, iteration=step)
        optimizer.step()
        method.on_after_optimizer_step(progress=(step + 1) / 8)
        losses.append(float(out["loss"].detach()))
    assert all(math.isfinite(v) for v in losses)
    assert min(losses[-3:]) < losses[0], losses
