"""PreciseBN / AdaBN: BN statistics re-averaged over evaluation images, weights untouched."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from medp2x.batchnorm import recompute_bn_stats
from medp2x.eval.compare import compare_encoders


def test_statistics_are_the_average_of_the_batch_statistics():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    net[1].running_mean.fill_(7.0)  # stale statistics from "another distribution"
    batches = [torch.randn(8, 3, 6, 6) + 2.0, torch.randn(8, 3, 6, 6) * 3.0]
    with torch.no_grad():
        conv = [net[0](b) for b in batches]
    mean = torch.stack([c.mean(dim=(0, 2, 3)) for c in conv]).mean(0)
    var = torch.stack([c.transpose(0, 1).flatten(1).var(dim=1) for c in conv]).mean(0)
    before = {k: v.clone() for k, v in net.state_dict().items()}

    fresh = recompute_bn_stats(net, batches)

    torch.testing.assert_close(fresh[1].running_mean, mean)
    torch.testing.assert_close(fresh[1].running_var, var)  # unbiased, as BN's own average
    assert not fresh.training and fresh[1].momentum == 0.1
    torch.testing.assert_close(fresh[0].weight, net[0].weight)
    torch.testing.assert_close(fresh[1].weight, net[1].weight)
    for key, value in net.state_dict().items():  # the caller's encoder is untouched
        assert torch.equal(value, before[key]), key


def test_no_images_is_an_error_for_a_network_with_batch_norm():
    with pytest.raises(ValueError, match="no images"):
        recompute_bn_stats(nn.BatchNorm1d(3), [])


class ColourClasses(torch.utils.data.Dataset):
    """Class c: images of one colour direction (plus noise) around a common grey."""

    def __init__(self, n_per_class: int, seed: int):
        g = torch.Generator().manual_seed(seed)
        self.labels = np.repeat(np.arange(3), n_per_class)
        colours = 0.5 + 0.3 * torch.eye(3)[self.labels]
        noise = 0.02 * torch.randn(len(self.labels), 3, 8, 8, generator=g)
        self.images = colours[:, :, None, None] + noise

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return {"image": self.images[i], "label": int(self.labels[i])}


class MeanColour(nn.Module):
    """Mean colour -> BN -> ReLU, the BN's saved statistics far off (mean 100): every feature is
    then negative before the ReLU, every image maps to 0, and kNN is at chance."""

    feature_dim = 3

    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm1d(3)
        self.bn.running_mean.fill_(100.0)

    def forward(self, x):
        return torch.relu(self.bn(x.mean(dim=(2, 3))))


@pytest.mark.parametrize("bn_stats, good", [("saved", False), ("recomputed", True)])
def test_knn_with_recomputed_statistics(bn_stats, good):
    rows = compare_encoders(
        {"mean colour": MeanColour()},
        ColourClasses(20, seed=0),
        ColourClasses(10, seed=1),
        protocol="knn",
        knn_k=5,
        progress=False,
        bn_stats=bn_stats,
    )
    assert rows[0]["accuracy"] == (1.0 if good else pytest.approx(1 / 3))


def test_unknown_bn_stats_is_refused():
    with pytest.raises(ValueError, match="bn_stats"):
        compare_encoders({}, ColourClasses(2, 0), ColourClasses(2, 1), bn_stats="precise")
