"""lightly's side of the parity benchmark (``benchmarks/parity.py``): each method written as a
lightly user writes it, in a plain PyTorch loop.

Everything that defines a method comes from lightly: the transforms (per-sample PIL ops run in
DataLoader workers), projection and prediction heads, losses, memory banks,
``update_momentum``, ``cosine_schedule``, ``batch_shuffle`` and ``SplitBatchNorm``. The
hyper-parameters are those of lightly's small-image benchmark
(``docs/source/getting_started/benchmarks/cifar10_benchmark.py``): SGD at
``6e-2 * batch / 128``, momentum 0.9, weight decay 5e-4, cosine to 0, no blur at this size;
SwAV with Adam at ``1e-3 * batch / 128``, weight decay 1e-6. Where the parity protocol needs
something else, the line says so:

- the backbone is torchvision's ResNet-18 with ``fc`` removed (the benchmark's CIFAR
  ``ResNetGenerator`` has another stem), built right after the same ``torch.manual_seed`` as
  medp2x's, so both implementations start from the same weights;
- the cosine steps once per iteration over the same span as medp2x's schedule (the benchmark
  steps once per epoch over its epochs);
- BYOL's target momentum follows ``cosine_schedule(step, steps, 0.99, 1)`` as lightly's
  ImageNet BYOL benchmark (the BYOL original); the CIFAR benchmark keeps 0.99 constant;
- ``views="medp2x"`` (an ablation, ``parity.py --lightly-views medp2x``) replaces lightly's
  per-sample transform by medp2x's batch augmentation of the same method (tiny recipe, blur
  off), run in the loop on uint8 batches: everything else stays lightly's, so a change in the
  probe isolates the augmentation pipeline;
- SwAV gets the crops of medp2x's tiny recipe (2 large + small ones, so both do the same work
  per image) and the queue and frozen prototypes of lightly's SwAV-with-queue example, which
  small batches need.
"""

from __future__ import annotations

import copy
import csv
import dataclasses
import math
import time
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision
from lightly.data import LightlyDataset
from lightly.loss import NegativeCosineSimilarity, NTXentLoss, SwaVLoss
from lightly.models.batchnorm import SplitBatchNorm
from lightly.models.modules import (
    BYOLPredictionHead,
    BYOLProjectionHead,
    MoCoProjectionHead,
    SimCLRProjectionHead,
    SwaVProjectionHead,
    SwaVPrototypes,
)
from lightly.models.modules.memory_bank import MemoryBankModule
from lightly.models.utils import (
    batch_shuffle,
    batch_unshuffle,
    deactivate_requires_grad,
    update_momentum,
)
from lightly.transforms import (
    BYOLTransform,
    BYOLView1Transform,
    BYOLView2Transform,
    SimCLRTransform,
    SwaVTransform,
)
from lightly.utils.debug import std_of_l2_normalized
from lightly.utils.scheduler import cosine_schedule
from torch import Tensor, nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

LR_REFERENCE_BATCH = 128  # the benchmark's lr_factor = batch_size / 128
FEATURES = 512  # ResNet-18's width


def resnet18_backbone(norm_layer=None) -> nn.Module:
    """torchvision's ResNet-18 with ``fc`` removed (the issue's backbone; medp2x's layout)."""
    net = torchvision.models.resnet18(weights=None, norm_layer=norm_layer)
    net.fc = nn.Identity()
    return net


def benchmark_sgd(params, batch_size: int) -> torch.optim.Optimizer:
    """The benchmark's optimiser for SimCLR, MoCo and BYOL."""
    lr = 6e-2 * batch_size / LR_REFERENCE_BATCH
    return torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=5e-4)


def spread(z: Tensor) -> float:
    """medp2x's collapse monitor computed with lightly's ``std_of_l2_normalized`` (x sqrt(d)):
    about 1 for embeddings spread over the sphere, 0 when collapsed."""
    return float(std_of_l2_normalized(z.detach().float()) * math.sqrt(z.shape[1]))


class SimCLR(nn.Module):
    def __init__(self, crop_size: int, **_):
        super().__init__()
        self.backbone = resnet18_backbone()
        self.projection_head = SimCLRProjectionHead(FEATURES, FEATURES, 128)  # benchmark
        self.criterion = NTXentLoss()  # temperature 0.5, lightly's default (benchmark)
        self.transform = SimCLRTransform(input_size=crop_size, cj_strength=0.5, gaussian_blur=0.0)

    def training_loss(self, views: list[Tensor], step: int, steps: int, epoch: int):
        # one pass per view, as the benchmark's training_step
        z0, z1 = (self.projection_head(self.backbone(x)) for x in views)
        return self.criterion(z0, z1), {"spread": spread(torch.cat([z0, z1]))}

    def make_optimizer(self, batch_size: int) -> torch.optim.Optimizer:
        return benchmark_sgd(self.parameters(), batch_size)


class MoCo(nn.Module):
    """The benchmark's MoCo: memory bank 4096, temperature 0.1, key momentum 0.99, symmetric
    loss, and shuffled BN simulated on one device by ``SplitBatchNorm`` with 8 splits."""

    splits = 8

    def __init__(self, crop_size: int, **_):
        super().__init__()
        self.backbone = resnet18_backbone(partial(SplitBatchNorm, num_splits=self.splits))
        self.projection_head = MoCoProjectionHead(FEATURES, FEATURES, 128)
        self.backbone_momentum = copy.deepcopy(self.backbone)
        self.projection_head_momentum = copy.deepcopy(self.projection_head)
        deactivate_requires_grad(self.backbone_momentum)
        deactivate_requires_grad(self.projection_head_momentum)
        self.criterion = NTXentLoss(temperature=0.1, memory_bank_size=(4096, 128))
        # the benchmark gives MoCo the SimCLR transform at cj_strength 0.5: MoCo v2's jitter
        self.transform = SimCLRTransform(input_size=crop_size, cj_strength=0.5, gaussian_blur=0.0)

    def training_loss(self, views: list[Tensor], step: int, steps: int, epoch: int):
        update_momentum(self.backbone, self.backbone_momentum, m=0.99)
        update_momentum(self.projection_head, self.projection_head_momentum, m=0.99)
        x0, x1 = views
        q0, k1 = self._query_and_key(x0, x1)
        q1, k0 = self._query_and_key(x1, x0)
        loss = 0.5 * (self.criterion(q0, k1) + self.criterion(q1, k0))  # symmetric (benchmark)
        return loss, {"spread": spread(torch.cat([q0, q1]))}

    def _query_and_key(self, x_query: Tensor, x_key: Tensor) -> tuple[Tensor, Tensor]:
        x_key, shuffle = batch_shuffle(x_key)
        query = self.projection_head(self.backbone(x_query))
        key = self.projection_head_momentum(self.backbone_momentum(x_key))
        return query, batch_unshuffle(key, shuffle)

    def make_optimizer(self, batch_size: int) -> torch.optim.Optimizer:
        params = list(self.backbone.parameters()) + list(self.projection_head.parameters())
        return benchmark_sgd(params, batch_size)


class BYOL(nn.Module):
    def __init__(self, crop_size: int, **_):
        super().__init__()
        self.backbone = resnet18_backbone()
        self.projection_head = BYOLProjectionHead(FEATURES, 1024, 256)  # benchmark
        self.prediction_head = BYOLPredictionHead(256, 1024, 256)
        self.backbone_momentum = copy.deepcopy(self.backbone)
        self.projection_head_momentum = copy.deepcopy(self.projection_head)
        deactivate_requires_grad(self.backbone_momentum)
        deactivate_requires_grad(self.projection_head_momentum)
        self.criterion = NegativeCosineSimilarity()
        self.transform = BYOLTransform(
            view_1_transform=BYOLView1Transform(input_size=crop_size, gaussian_blur=0.0),
            view_2_transform=BYOLView2Transform(input_size=crop_size, gaussian_blur=0.0),
        )

    def training_loss(self, views: list[Tensor], step: int, steps: int, epoch: int):
        momentum = cosine_schedule(step, steps, 0.99, 1.0)  # ImageNet benchmark's schedule
        update_momentum(self.backbone, self.backbone_momentum, m=momentum)
        update_momentum(self.projection_head, self.projection_head_momentum, m=momentum)
        x0, x1 = views
        z0, z1 = (self.projection_head(self.backbone(x)) for x in (x0, x1))
        p0, p1 = self.prediction_head(z0), self.prediction_head(z1)
        with torch.no_grad():
            t0, t1 = (self.projection_head_momentum(self.backbone_momentum(x)) for x in (x0, x1))
        loss = 0.5 * (self.criterion(p0, t1) + self.criterion(p1, t0))
        return loss, {"spread": spread(torch.cat([z0, z1])), "momentum": momentum}

    def make_optimizer(self, batch_size: int) -> torch.optim.Optimizer:
        params = (
            list(self.backbone.parameters())
            + list(self.projection_head.parameters())
            + list(self.prediction_head.parameters())
        )
        return benchmark_sgd(params, batch_size)


class SwAV(nn.Module):
    """The benchmark's SwAV heads (512 prototypes) with the SwAV-with-queue example's queue
    (3840 projections per large crop, used from epoch 2) and prototypes frozen for the first
    epoch (``SwaVPrototypes(..., n_steps_frozen_prototypes=1)`` stepped by epoch)."""

    n_large = 2
    start_queue_at_epoch = 2

    def __init__(self, crop_size: int, small_size: int = 0, n_small: int = 0, **_):
        super().__init__()
        self.backbone = resnet18_backbone()
        self.projection_head = SwaVProjectionHead(FEATURES, FEATURES, 128)
        self.prototypes = SwaVPrototypes(128, 512, n_steps_frozen_prototypes=1)
        self.criterion = SwaVLoss()
        self.queues = nn.ModuleList(
            [MemoryBankModule(size=(3840, 128)) for _ in range(self.n_large)]
        )
        sizes, counts, lows, highs = [crop_size], [self.n_large], [0.14], [1.0]
        if n_small:  # lightly's SwaVTransform default scales for the small crops
            sizes, counts, lows, highs = sizes + [small_size], counts + [n_small], lows + [0.05], highs + [0.14]  # fmt: skip
        self.transform = SwaVTransform(
            crop_sizes=tuple(sizes),
            crop_counts=tuple(counts),
            crop_min_scales=tuple(lows),
            crop_max_scales=tuple(highs),
            cj_strength=0.5,  # benchmark
            gaussian_blur=0.0,  # benchmark
        )

    def training_loss(self, views: list[Tensor], step: int, steps: int, epoch: int):
        self.prototypes.normalize()
        embeddings = [F.normalize(self.projection_head(self.backbone(x)), dim=1) for x in views]
        scores = [self.prototypes(z, epoch) for z in embeddings]
        queue_scores = self._queue_scores(embeddings[: self.n_large], epoch)
        loss = self.criterion(scores[: self.n_large], scores[self.n_large :], queue_scores)
        return loss, {
            "spread": spread(torch.cat(embeddings)),
            "prediction_entropy": prediction_entropy(torch.cat(scores), self.criterion.temperature),
        }

    @torch.no_grad()
    def _queue_scores(self, embeddings: list[Tensor], epoch: int) -> list[Tensor] | None:
        """The queue example's ``_get_queue_prototypes``: fill from the start, use from
        ``start_queue_at_epoch``."""
        queued = []
        for queue, z in zip(self.queues, embeddings, strict=True):
            _, bank = queue(z, update=True)
            queued.append(bank.permute(1, 0))  # (dim, n) -> (n, dim)
        if epoch < self.start_queue_at_epoch:
            return None
        return [self.prototypes(z, epoch) for z in queued]

    def make_optimizer(self, batch_size: int) -> torch.optim.Optimizer:
        lr = 1e-3 * batch_size / LR_REFERENCE_BATCH  # benchmark: Adam for SwAV
        return torch.optim.Adam(self.parameters(), lr=lr, weight_decay=1e-6)


@torch.no_grad()
def prediction_entropy(scores: Tensor, temperature: float) -> float:
    """Mean entropy of softmax(scores / T) over ln K (1: uniform predictions, nothing learnt),
    the quantity medp2x's SwAV logs."""
    log_p = F.log_softmax(scores.detach().float() / temperature, dim=1)
    return float(-(log_p.exp() * log_p).sum(1).mean() / math.log(scores.shape[1]))


def medp2x_views(method, crop_size, small_size, n_small, seed, device):
    """medp2x's batch augmentation for ``method`` (its tiny recipe at these crop sizes, blur
    off as on both sides of the benchmark), ImageNet-normalised: uint8 batch -> views."""
    from medp2x.methods import recipe_for
    from medp2x.networks import IMAGENET_MEAN, IMAGENET_STD, Normalize
    from medp2x.views import build_views

    spec = recipe_for(method, "tiny", image_size=crop_size).views
    if n_small:
        spec = dataclasses.replace(spec, small_size=small_size, n_small=n_small)
    augment = build_views(method, "rgb", spec, device, overrides={"blur_p": 0.0})
    generator = torch.Generator().manual_seed(seed + 1)
    normalize = Normalize(IMAGENET_MEAN, IMAGENET_STD).to(device)  # the engine's own layer
    return lambda images: [normalize(v) for v in augment(images, generator)]


METHODS = {"simclr": SimCLR, "moco": MoCo, "byol": BYOL, "swav": SwAV}


def plain_backbone_state(backbone: nn.Module) -> dict[str, Tensor]:
    """A torchvision ``BatchNorm2d`` state dict: ``SplitBatchNorm`` keeps one running mean and
    variance per split, averaged (its own ``train(False)`` rule) into one set here."""
    state = {}
    for name, tensor in backbone.state_dict().items():
        module = backbone.get_submodule(name.rpartition(".")[0])
        if isinstance(module, SplitBatchNorm) and name.endswith(("running_mean", "running_var")):
            tensor = tensor.view(module.num_splits, module.num_features).mean(0)
        state[name] = tensor.detach().cpu().clone()
    return state


def train(
    method: str,
    data: str,
    out: Path,
    iterations: int,
    schedule_iterations: int,
    batch_size: int,
    crop_size: int,
    small_size: int,
    n_small: int,
    seed: int,
    amp: bool,
    workers: int,
    checkpoint_every: int,
    progress: bool = True,
    views: str = "lightly",
) -> dict:
    """Pretrain ``method`` for ``iterations`` steps; write ``loss.csv``, ``encoder.pt``
    (torchvision state dict) and every ``checkpoint_every`` a backbone; return timings."""
    if method == "moco" and batch_size % MoCo.splits:
        raise ValueError(
            f"lightly's MoCo splits BN into {MoCo.splits}: batch_size must be a multiple"
        )
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(seed)  # the backbone is built first: the same init as medp2x's
    model = METHODS[method](crop_size=crop_size, small_size=small_size, n_small=n_small)
    model = model.to(device).train()
    transform, make_views = model.transform, None
    if views == "medp2x":
        transform = torchvision.transforms.PILToTensor()  # uint8; views made per batch below
        make_views = medp2x_views(method, crop_size, small_size, n_small, seed, device)
    elif views != "lightly":
        raise ValueError(f"views must be 'lightly' or 'medp2x', not {views!r}")
    loader = DataLoader(
        LightlyDataset(input_dir=data, transform=transform),
        batch_size=batch_size,
        shuffle=True,
        drop_last=True,
        num_workers=workers,
        persistent_workers=workers > 0,
        generator=torch.Generator().manual_seed(seed),
    )
    optimizer = model.make_optimizer(batch_size)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=schedule_iterations)
    (out / "checkpoints").mkdir(parents=True, exist_ok=True)
    log = open(out / "loss.csv", "w", newline="")  # noqa: SIM115 - closed below
    writer = csv.writer(log)
    writer.writerow(["iteration", "epoch", "loss", "spread"])
    finished, epoch, times, diagnostics = 0, 0, [], []
    bar = tqdm(total=iterations, desc=f"lightly {method}", disable=not progress)
    while finished < iterations:
        for batch, _, _ in loader:
            batch = make_views(batch) if make_views else batch
            batch = [v.to(device, non_blocking=True) for v in batch]
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                loss, logs = model.training_loss(batch, finished, schedule_iterations, epoch)
            if not torch.isfinite(loss.detach()):
                raise FloatingPointError(f"lightly {method}: loss {float(loss)} at step {finished}")
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            finished += 1
            times.append(time.time())  # wall clock, as medp2x's TensorBoard stamps
            logs["loss"] = float(loss.detach())
            diagnostics.append(logs)
            writer.writerow([finished, epoch + 1, logs["loss"], logs.get("spread", "")])
            bar.update(1)
            bar.set_postfix(loss=f"{logs['loss']:.3f}")
            if checkpoint_every and finished % checkpoint_every == 0:
                path = out / "checkpoints" / f"backbone_{finished}.pt"
                torch.save(plain_backbone_state(model.backbone), path)
            if finished >= iterations:
                break
        epoch += 1
    bar.close()
    log.close()
    torch.save(plain_backbone_state(model.backbone), out / "encoder.pt")
    epochs = math.ceil(finished / len(loader))
    del loader  # shuts the workers down, so their CPU time is counted (parity_train.py)
    return {
        "peak_lr": max(group["initial_lr"] for group in optimizer.param_groups),
        "iteration_times": times,
        "epochs": epochs,
        "diagnostics": diagnostics,
    }
