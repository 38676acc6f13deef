"""Batch augmentation: recipes, per-sample parameters, and equivalence with torchvision's
per-image functional ops (the reference the originals' pipelines use)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF

from medp2x.methods import METHODS
from medp2x.methods.base import ViewSpec
from medp2x.views import (
    JITTER_OPS,
    BatchAugment,
    ViewAugment,
    blur_kernel_size,
    brightness,
    build_views,
    contrast,
    gamma,
    gaussian_blur,
    grayscale,
    hue,
    resized_crops,
    sample_crop_boxes,
    saturation,
    solarize,
)

NO_OPS = ViewAugment(flip_p=0.0, jitter_p=0.0, gray_p=0.0, blur_p=0.0, solarize_p=0.0)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _spec(method: str, size: int = 24) -> ViewSpec:
    n_small = 3 if method == "swav" else 0
    return ViewSpec(n_large=2, large_size=size, n_small=n_small, small_size=12)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("modality,channels", [("rgb", 3), ("gray", 1), ("rgb", 1), ("gray", 3)])
def test_views_per_recipe_have_the_right_count_shape_and_range(method, modality, channels):
    spec = _spec(method)
    augment = build_views(method, modality, spec, generator=_gen())
    views = augment(torch.rand(5, channels, 40, 36, generator=_gen(1)))
    assert len(views) == spec.n_large + spec.n_small
    sizes = [spec.large_size] * spec.n_large + [spec.small_size] * spec.n_small
    for v, s in zip(views, sizes, strict=True):
        assert v.shape == (5, channels, s, s) and v.dtype == torch.float32
        assert torch.isfinite(v).all() and v.min() >= 0.0 and v.max() <= 1.0


def test_seeded_generator_repeats_views_and_other_seeds_differ():
    x = torch.rand(6, 3, 32, 32, generator=_gen(1))
    spec = _spec("swav")
    first = build_views("swav", "rgb", spec, generator=_gen(7))(x)
    again = build_views("swav", "rgb", spec, generator=_gen(7))(x)
    other = build_views("swav", "rgb", spec, generator=_gen(8))(x)
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert not any(torch.allclose(a, b) for a, b in zip(first, other, strict=True))


def test_uint8_input_is_scaled_to_unit_range():
    x8 = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8, generator=_gen(2))
    a = build_views("moco", "rgb", _spec("moco"), generator=_gen(3))(x8)
    b = build_views("moco", "rgb", _spec("moco"), generator=_gen(3))(x8.float() / 255)
    assert all(torch.allclose(u, v, atol=1e-6) for u, v in zip(a, b, strict=True))


@pytest.mark.parametrize("size,mode", [(48, "bilinear"), (32, "bilinear"), (16, "area")])
@pytest.mark.parametrize("antialias", [True, False])
def test_full_image_crop_with_scale_1_and_ratio_1_equals_a_resize(size, mode, antialias):
    """Antialiased (default): F.interpolate's antialiased bilinear at every size; roi_align:
    bilinear when enlarging or keeping the size, the 2 x 2 area mean when halving."""
    x = torch.rand(3, 3, 32, 32, generator=_gen(4))
    augment = BatchAugment(
        [NO_OPS], [size], [(1.0, 1.0)], ratio=(1.0, 1.0), generator=_gen(), antialias=antialias
    )
    (view,) = augment(x)
    if antialias:
        mode, kwargs = "bilinear", {"align_corners": False, "antialias": True}
    else:
        kwargs = {"align_corners": False} if mode == "bilinear" else {}
    assert torch.allclose(view, F.interpolate(x, size=size, mode=mode, **kwargs), atol=1e-6)


def _bilinear_reference(img: torch.Tensor, box: list[float], size: int) -> torch.Tensor:
    """Bilinear samples at the output pixel centres mapped into the box (half-pixel rule)."""
    x1, y1, x2, y2 = box
    _, h, w = img.shape
    xs = x1 + (torch.arange(size) + 0.5) * (x2 - x1) / size - 0.5  # pixel coordinates
    ys = y1 + (torch.arange(size) + 0.5) * (y2 - y1) / size - 0.5
    gy, gx = torch.meshgrid((2 * ys + 1) / h - 1, (2 * xs + 1) / w - 1, indexing="ij")
    grid = torch.stack([gx, gy], -1)[None]
    return F.grid_sample(
        img[None], grid, mode="bilinear", padding_mode="border", align_corners=False
    )[0]


def test_a_box_crop_equals_bilinear_sampling_and_resizing_the_slice_inside():
    """The fast path (``antialias=False``, one roi_align call)."""
    x = torch.rand(2, 3, 30, 40, generator=_gen(5))
    boxes = [[4.0, 8.0, 20.0, 24.0], [10.0, 0.0, 40.0, 30.0]]  # x1, y1, x2, y2
    out = resized_crops(x, torch.tensor(boxes), torch.tensor([1, 0]), 32, antialias=False)
    assert torch.allclose(out[0], _bilinear_reference(x[1], boxes[0], 32), atol=1e-5)
    assert torch.allclose(out[1], _bilinear_reference(x[0], boxes[1], 32), atol=1e-5)
    # away from the box edge (where roi_align reads the real neighbours, not a clamped edge)
    # it is torchvision's crop-then-resize
    ref = F.interpolate(x[1:2, :, 8:24, 4:20], size=32, mode="bilinear", align_corners=False)
    assert torch.allclose(out[0, :, 1:-1, 1:-1], ref[0, :, 1:-1, 1:-1], atol=1e-5)
    assert not torch.allclose(out[0, :, 0], ref[0, :, 0], atol=1e-3)


def test_default_crops_are_torchvision_resized_crop_and_pil_within_quantisation():
    """The default resizing is torchvision's antialiased ``resized_crop`` on tensors, exactly,
    and PIL's (lightly's and the originals' transforms) within uint8 rounding. roi_align is
    sharper when shrinking (docs/augmentations.md, "Resampling")."""
    from PIL import Image
    from torchvision.transforms import functional as pil_ops
    from torchvision.transforms.v2 import functional as tensor_ops

    x = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8, generator=_gen(7))
    boxes = torch.tensor([[5.0, 7.0, 52.0, 50.0], [0.0, 30.0, 20.0, 46.0]])  # shrink, enlarge
    images = x.float() / 255
    out = resized_crops(images, boxes, torch.tensor([0, 1]), 32)
    fast = resized_crops(images, boxes, torch.tensor([0, 1]), 32, antialias=False)
    for k, (row, (x1, y1, x2, y2)) in enumerate(zip([0, 1], boxes.int().tolist(), strict=True)):
        top, left, h, w = y1, x1, y2 - y1, x2 - x1
        want = tensor_ops.resized_crop(images[row], top, left, h, w, [32, 32], antialias=True)
        torch.testing.assert_close(out[k], want, rtol=0, atol=1e-6)
        pil = Image.fromarray(x[row].permute(1, 2, 0).numpy())
        pil = pil_ops.resized_crop(pil, top, left, h, w, [32, 32])
        pil = torch.tensor(np.array(pil)).permute(2, 0, 1).float() / 255
        assert (out[k] - pil).abs().mean() < 0.003 and (out[k] - pil).abs().max() < 0.01
    assert (fast[0] - out[0]).abs().mean() > 0.01  # shrinking: roi_align differs visibly
    assert fast[0].std() > 1.03 * out[0].std()  # and keeps more of the noise


def test_crop_boxes_follow_random_resized_crop_bounds():
    h, w, scale, ratio = 50, 70, (0.08, 1.0), (3 / 4, 4 / 3)
    boxes = sample_crop_boxes(4000, h, w, scale, ratio, _gen(6))
    x1, y1, x2, y2 = boxes.unbind(1)
    bw, bh = x2 - x1, y2 - y1
    assert (x1 >= 0).all() and (y1 >= 0).all() and (x2 <= w).all() and (y2 <= h).all()
    assert torch.equal(boxes, boxes.round()) and (bw > 0).all() and (bh > 0).all()
    area = bw * bh / (h * w)
    # rounding w and h to pixels moves the area and ratio a little past the drawn range
    assert area.min() >= scale[0] * 0.8 and area.max() <= 1.0
    assert (bw / bh).min() >= ratio[0] * 0.85 and (bw / bh).max() <= ratio[1] * 1.15
    assert area.std() > 0.2 and x1.float().std() > 3  # spread, not a constant crop


def test_crop_falls_back_to_a_central_crop_when_no_draw_fits():
    boxes = sample_crop_boxes(5, 10, 100, (0.9, 1.0), (1.0, 1.0), _gen())  # a square can't fit
    assert torch.equal(boxes, torch.tensor([[45.0, 0.0, 55.0, 10.0]]).expand(5, 4))


@pytest.mark.parametrize("method", METHODS)
def test_gray_recipe_never_mixes_channels(method):
    """Each output channel of a 3-channel stack equals the 1-channel run on that channel."""
    x = torch.rand(6, 3, 32, 32, generator=_gen(9))
    spec = _spec(method)
    stacked = build_views(method, "gray", spec, generator=_gen(11))(x)
    for c in range(3):
        alone = build_views(method, "gray", spec, generator=_gen(11))(x[:, c : c + 1])
        for s, a in zip(stacked, alone, strict=True):
            assert torch.allclose(s[:, c : c + 1], a, atol=1e-5)
    rgb = build_views(method, "rgb", spec, generator=_gen(11))(x)
    rgb_alone = build_views(method, "rgb", spec, generator=_gen(11))(x[:, :1])
    assert not torch.allclose(rgb[0][:, :1], rgb_alone[0], atol=1e-3)  # rgb jitter does mix


def test_gray_recipe_has_no_chroma_ops_and_jitters_gamma():
    spec = ViewSpec(n_large=2, large_size=16)
    for method in METHODS:
        augment = build_views(method, "gray", spec)
        assert all(a.saturation == a.hue == a.gray_p == 0 for a in augment.views)
        assert all(a.gamma > 0 and a.brightness > 0 and a.contrast > 0 for a in augment.views)


def test_blur_with_sigma_near_zero_is_identity():
    x = torch.rand(4, 3, 20, 20, generator=_gen(12))
    assert torch.equal(gaussian_blur(x, torch.full((4,), 1e-8), 7), x)


def test_blur_uses_each_rows_sigma_like_torchvision():
    x = torch.rand(4, 3, 24, 24, generator=_gen(13))
    sigma = torch.tensor([0.1, 0.7, 1.3, 2.0])
    out = gaussian_blur(x, sigma, 9)
    for i, s in enumerate(sigma.tolist()):
        assert torch.allclose(out[i], TF.gaussian_blur(x[i], [9, 9], [s, s]), atol=1e-5)
    assert blur_kernel_size(224) == 23 and blur_kernel_size(64) == 7 and blur_kernel_size(20) == 3


@pytest.mark.parametrize(
    "op,reference,lo,hi",
    [
        (brightness, TF.adjust_brightness, 0.2, 1.8),
        (contrast, TF.adjust_contrast, 0.2, 1.8),
        (saturation, TF.adjust_saturation, 0.0, 1.8),
        (hue, TF.adjust_hue, -0.5, 0.5),
        (gamma, lambda img, g: TF.adjust_gamma(img, g), 0.5, 1.8),
        (solarize, TF.solarize, 0.2, 0.8),
    ],
)
def test_colour_ops_match_torchvision_per_sample(op, reference, lo, hi):
    x = torch.rand(8, 3, 16, 16, generator=_gen(14))
    x[0] = x[0, :1]  # a gray pixel block: hue undefined, must stay gray
    x[1, :, :4] = torch.tensor([0.9, 0.9, 0.1]).view(3, 1, 1)  # ties between channel maxima
    factors = torch.linspace(lo, hi, 8)
    out = op(x, factors)
    for i in range(8):
        assert torch.allclose(out[i], reference(x[i], factors[i].item()), atol=2e-5)


def test_grayscale_matches_torchvision():
    x = torch.rand(3, 3, 8, 8, generator=_gen(15))
    assert torch.allclose(grayscale(x), TF.rgb_to_grayscale(x, num_output_channels=3), atol=1e-6)


@pytest.mark.parametrize("method,modality", [("byol", "rgb"), ("simclr", "gray"), ("moco", "rgb")])
def test_pipeline_matches_torchvision_ops_in_each_samples_drawn_order(method, modality):
    """End to end: with identity crops, every row equals torchvision's functional ops applied
    one image at a time with the drawn flip, jitter factors/order, grayscale, blur, solarize."""
    channels = 3 if modality == "rgb" else 1
    x = torch.rand(16, channels, 20, 20, generator=_gen(16))
    augment = build_views(method, modality, ViewSpec(n_large=2, large_size=20), generator=_gen())
    (plan,) = augment.plan(16, 20, 20)
    plan.boxes = torch.tensor([[0.0, 0.0, 20.0, 20.0]]).expand(32, 4)
    out = augment.apply(x, plan)
    k = blur_kernel_size(20)
    ops = {
        "brightness": TF.adjust_brightness,
        "contrast": TF.adjust_contrast,
        "saturation": TF.adjust_saturation,
        "hue": TF.adjust_hue,
        "gamma": TF.adjust_gamma,
    }
    for row in range(32):
        img = x[row % 16]
        if plan.flip[row]:
            img = TF.horizontal_flip(img)
        for op_id in plan.order[row].tolist():
            name = JITTER_OPS[op_id]
            if plan.jitter[name][row]:
                img = ops[name](img, plan.factors[name][row].item())
        if modality == "rgb" and plan.gray[row]:
            img = TF.rgb_to_grayscale(img, num_output_channels=3)
        if plan.blur[row]:
            s = plan.sigma[row].item()
            img = TF.gaussian_blur(img, [k, k], [s, s])
        if plan.solarize[row]:
            img = TF.solarize(img, plan.threshold[row].item())
        assert torch.allclose(out[row], img, atol=1e-4), f"row {row}"


def test_each_sample_gets_its_own_parameters():
    x = torch.rand(1, 3, 32, 32, generator=_gen(17)).expand(8, 3, 32, 32)
    for view in build_views("simclr", "rgb", _spec("simclr"), generator=_gen())(x):
        flat = view.flatten(1)
        assert (torch.cdist(flat, flat) + torch.eye(8)).min() > 1e-3  # no two samples equal


def _rate(mask: torch.Tensor) -> float:
    return mask.float().mean().item()


def _close(rate: float, p: float, n: int) -> bool:
    return abs(rate - p) <= 4 * math.sqrt(p * (1 - p) / n) + 1e-9


def test_byol_views_are_asymmetric_and_follow_the_published_probabilities():
    n = 3000
    augment = build_views("byol", "rgb", ViewSpec(n_large=2, large_size=16), generator=_gen())
    (plan,) = augment.plan(n, 32, 32)
    first, second = slice(0, n), slice(n, 2 * n)
    assert _rate(plan.blur[first]) == 1.0 and _close(_rate(plan.blur[second]), 0.1, n)
    assert _rate(plan.solarize[first]) == 0.0 and _close(_rate(plan.solarize[second]), 0.2, n)
    assert _close(_rate(plan.gray), 0.2, 2 * n) and _close(_rate(plan.flip), 0.5, 2 * n)
    assert _close(_rate(plan.jitter["brightness"]), 0.8, 2 * n)
    assert plan.factors["brightness"].min() >= 0.6 and plan.factors["brightness"].max() <= 1.4
    assert plan.factors["hue"].abs().max() <= 0.1 and plan.factors["saturation"].min() >= 0.8


def test_swav_multicrop_uses_large_and_small_scales():
    spec = ViewSpec(n_large=2, large_size=32, n_small=4, small_size=16, large_scale=(0.14, 1.0))
    large, small = build_views("swav", "rgb", spec, generator=_gen()).plan(500, 64, 64)
    assert (large.size, small.size) == (32, 16) and len(small.views) == 4
    area = lambda b: (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1]) / 64**2  # noqa: E731
    assert area(large.boxes).min() >= 0.14 * 0.8 and area(small.boxes).max() <= 0.14 * 1.25
    assert small.blur.any() and _close(_rate(small.gray), 0.2, 2000)


def test_jitter_order_is_a_random_permutation_per_sample():
    (plan,) = build_views("simclr", "rgb", ViewSpec(), generator=_gen()).plan(200, 8, 8)
    assert torch.equal(plan.order.sort(1).values, torch.arange(5).expand(400, 5))
    assert len({tuple(r) for r in plan.order.tolist()}) > 60


def test_overrides_apply_to_every_view_and_bad_inputs_raise():
    augment = build_views("byol", "rgb", ViewSpec(), overrides={"flip_p": 0.0, "solarize_p": 0.0})
    assert all(a.flip_p == 0 and a.solarize_p == 0 for a in augment.views)
    assert augment.views[0].blur_p == 1.0 and augment.views[1].blur_p == 0.1
    with pytest.raises(ValueError, match="unknown augmentation override"):
        build_views("byol", "rgb", ViewSpec(), overrides={"blurr_p": 0.0})
    with pytest.raises(ValueError, match="unknown SSL method"):
        build_views("barlow", "rgb", ViewSpec())
    with pytest.raises(ValueError, match="unknown modality"):
        build_views("simclr", "ct", ViewSpec())
    with pytest.raises(ValueError, match="1 or 3 channels"):
        build_views("simclr", "rgb", ViewSpec(large_size=8))(torch.rand(2, 2, 8, 8))
    with pytest.raises(ValueError, match="B×C×H×W"):
        build_views("simclr", "rgb", ViewSpec(large_size=8))(torch.rand(3, 8, 8))


def test_color_strength_scales_the_published_jitter_and_an_override_still_wins():
    """SimCLR's s: ColorJitter(0.8s, 0.8s, 0.8s, 0.2s); s = 0.5 is its small-image setting and
    lightly's ``cj_strength=0.5``; other fields (probabilities, blur) are left alone."""
    half = build_views("simclr", "rgb", ViewSpec(color_strength=0.5)).views
    assert all(
        (a.brightness, a.contrast, a.saturation, a.hue) == pytest.approx((0.4, 0.4, 0.4, 0.1))
        for a in half
    )
    assert all(a.jitter_p == 0.8 and a.gray_p == 0.2 for a in half)
    gray = build_views("simclr", "gray", ViewSpec(color_strength=0.5)).views
    assert all(a.gamma == pytest.approx(0.4) and a.saturation == 0 for a in gray)
    byol = build_views("byol", "rgb", ViewSpec(color_strength=0.5), overrides={"hue": 0.3})
    assert byol.views[0].brightness == pytest.approx(0.2) and byol.views[0].hue == 0.3
    assert build_views("simclr", "rgb", ViewSpec()).views[0].brightness == 0.8
    with pytest.raises(ValueError, match="color_strength"):
        build_views("simclr", "rgb", ViewSpec(color_strength=-1.0))


# ---------------------------------------------------------------------------------------------
# Batches of differently shaped images (issue #14, item 2): each row crops within its own image.


def test_boxes_of_a_padded_batch_stay_inside_each_rows_own_image():
    sizes = torch.tensor([[50, 70], [128, 96], [10, 100], [300, 150]])  # (h, w) per image
    rows = torch.arange(4000) % 4
    h, w = sizes[rows, 0], sizes[rows, 1]
    boxes = sample_crop_boxes(4000, h, w, (0.08, 1.0), (3 / 4, 4 / 3), _gen(6))
    x1, y1, x2, y2 = boxes.unbind(1)
    assert (x1 >= 0).all() and (y1 >= 0).all() and (x2 <= w).all() and (y2 <= h).all()
    assert torch.equal(boxes, boxes.round()) and ((x2 > x1) & (y2 > y1)).all()
    for i, (hi, wi) in enumerate(sizes.tolist()):
        mine = boxes[rows == i]
        area = (mine[:, 2] - mine[:, 0]) * (mine[:, 3] - mine[:, 1]) / (hi * wi)
        assert area.min() >= 0.08 * 0.8 and area.max() <= 1.0
        if (hi, wi) != (10, 100):  # spread over the whole image, not over the padded batch
            assert mine[:, 2].max() == wi and mine[:, 3].max() == hi and area.std() > 0.1
    # the 10 x 100 image cannot hold a large square: its own central fallback crop
    heights, widths = torch.full((8,), 10), torch.full((8,), 100)
    fallback = sample_crop_boxes(8, heights, widths, (0.9, 1.0), (1.0, 1.0), _gen())
    assert torch.equal(fallback, torch.tensor([[45.0, 0.0, 55.0, 10.0]]).expand(8, 4))


def test_same_shape_batches_draw_exactly_the_boxes_of_one_size():
    for h, w, scale in [(50, 70, (0.08, 1.0)), (10, 100, (0.9, 1.0)), (64, 64, (0.2, 1.0))]:
        one = sample_crop_boxes(600, h, w, scale, (3 / 4, 4 / 3), _gen(3))
        rows = sample_crop_boxes(
            600, torch.full((600,), h), torch.full((600,), w), scale, (3 / 4, 4 / 3), _gen(3)
        )
        assert torch.equal(one, rows)


def test_views_of_a_padded_batch_equal_views_of_each_image_alone():
    """Padding never leaks into a view: the crop of row i of a padded batch is the crop of
    image i on its own, with the same drawn box (also at the image's right and bottom edges,
    where the padding repeats the edge as roi_align does at a tensor's border)."""
    from medp2x.data.collate import ImageBatch, pad_images

    images = [torch.rand(3, 40, 30, generator=_gen(1)), torch.rand(3, 24, 56, generator=_gen(2))]
    batch = pad_images(images)
    assert isinstance(batch, ImageBatch) and batch.pixels.shape == (2, 3, 40, 56)
    assert batch.sizes.tolist() == [[40, 30], [24, 56]]
    augment = build_views("simclr", "rgb", ViewSpec(n_large=2, large_size=16), generator=_gen(4))
    views = augment(batch)
    (plan,) = augment.plan(2, batch.sizes[:, 0], batch.sizes[:, 1], _gen(4))
    x1, y1, x2, y2 = plan.boxes.unbind(1)
    rows_w, rows_h = batch.sizes[plan.batch_index, 1], batch.sizes[plan.batch_index, 0]
    assert (x2 <= rows_w).all() and (y2 <= rows_h).all()
    edge = plan.boxes.clone()
    edge[:, 2], edge[:, 3] = rows_w, rows_h  # boxes touching the right and bottom edges
    edge[:, 0], edge[:, 1] = rows_w // 3, rows_h // 3
    for boxes in (plan.boxes, edge):
        padded = resized_crops(batch.pixels, boxes, plan.batch_index, 16)
        for k, b in enumerate(plan.batch_index.tolist()):
            alone = resized_crops(images[b][None], boxes[k : k + 1], torch.zeros(1), 16)[0]
            assert torch.allclose(padded[k], alone, atol=1e-6), f"row {k}"
    replay = [augment.apply(batch.pixels, plan)[k * 2 : (k + 1) * 2] for k in range(2)]
    assert all(torch.equal(v, r) for v, r in zip(views, replay, strict=True))


def test_a_recipe_override_selects_the_roi_align_resampling():
    """The documented switch (``method_options={"views": {"antialias": false}}`` in a bundle):
    it reaches BatchAugment, and only the resizing changes (same boxes, other pixels)."""
    from medp2x.methods import recipe_for
    from medp2x.methods.base import override_recipe

    x = torch.rand(4, 3, 64, 64, generator=_gen(8))
    recipe = recipe_for("simclr", "tiny", image_size=32)  # the engine's order: size, then options
    default = build_views("simclr", "rgb", recipe.views)
    fast = build_views("simclr", "rgb", override_recipe(recipe, views={"antialias": False}).views)
    assert default.antialias and not fast.antialias
    a, b = default(x, _gen(9)), fast(x, _gen(9))
    assert all(u.shape == v.shape for u, v in zip(a, b, strict=True))
    assert not torch.allclose(a[0], b[0], atol=1e-3)
