"""One torchrun job of ``tests/test_distributed.py``: whole pretraining runs on two gloo ranks.

Started as ``torchrun --standalone --nproc_per_node 2 --max-restarts 1 distributed_worker.py
OUT``. The first attempt trains every method for a few steps (the weights the test compares
with one-process runs at the same global batch), BYOL with gradient accumulation, an
uninterrupted resnet18 run, and the same run again until rank 1 dies in the middle of an epoch
(``os._exit`` as iteration 4 of 4 starts: no cleanup, like a lost node). torchrun then restarts both ranks once (attempt
1), and the run resumes from its newest checkpoint to the end. Kept in one job because process
start-up is most of the cost.

The comparison runs use a BatchNorm-free network and deterministic views: per-rank BN over half
the batch differs from one process's BN by design (SyncBatchNorm is CUDA-only), and each rank
draws its own augmentations, so with either the same global batch would see other numbers.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

WORLD = 2
METHODS = ("simclr", "swav", "byol", "moco")
# The comparison runs: 16 images, a global batch of 8 (4 per rank), 3 epochs of 2 steps.
TINY_KW = dict(
    arch="resnet18",  # the name written with the weights; the network is tiny_encoder's
    image_size=16,
    epochs=3,
    progress=False,
    amp=False,
    n_saved=1,
)
# The resume runs: torchvision's resnet18 and the real views, 2 epochs of 2 steps.
ENGINE_KW = dict(
    method="simclr",
    arch="resnet18",
    image_size=16,
    batch_size=4,  # per process: a global batch of 8
    epochs=2,
    progress=False,
    n_saved=None,
)
KILLED_AT = 4  # rank 1 dies as iteration 4 starts (mid epoch 2; rank 0 has saved epoch 1)


def images(n: int = 16) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    return [{"image": torch.rand(3, 16, 16, generator=g), "label": -1} for _ in range(n)]


def tiny_encoder() -> nn.Module:
    net = nn.Sequential(
        nn.Conv2d(3, 6, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Conv2d(6, 12, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
    )
    net.feature_dim = 12
    return net


def bn_free_method(name: str, encoder: nn.Module, recipe=None, **options) -> nn.Module:
    """``build_method`` with the heads' BatchNorm layers replaced by identities."""
    from medp2x.methods import build_method

    method = build_method(name, encoder, recipe=recipe, **options)
    for module in list(method.modules()):
        for child_name, child in module.named_children():
            if isinstance(child, nn.modules.batchnorm._BatchNorm):
                setattr(module, child_name, nn.Identity())
    return method


class FixedViews:
    """Deterministic views: each crop is the whole image resized, view ``i`` scaled by
    ``1 + i / 10`` so that the views of one image differ."""

    def __init__(self, spec) -> None:
        self._sizes = [spec.large_size] * spec.n_large + [spec.small_size] * spec.n_small

    def sizes(self) -> list[int]:
        return list(self._sizes)

    def __call__(self, batch) -> list[torch.Tensor]:
        return [
            F.interpolate(batch.pixels, size=(s, s), mode="bilinear") * (1 + i / 10)
            for i, s in enumerate(self._sizes)
        ]


def fixed_views(method, modality, spec, device=None, generator=None, overrides=None):
    return FixedViews(spec)


def comparison_run(out: Path, method: str, batch_size: int, accumulation_steps: int = 1):
    """One tiny run as the test compares it, in this process (1 rank or one of 2)."""
    from medp2x.engine import PretrainConfig, pretrain

    cfg = PretrainConfig(
        dataset=images(),
        output_dir=out,
        method=method,
        batch_size=batch_size,
        accumulation_steps=accumulation_steps,
        **TINY_KW,
    )
    return pretrain(cfg, encoder=tiny_encoder(), method=bn_free_method, views=fixed_views)


class DieOnce:
    """Rank 1 exits at iteration ``at`` on torchrun's first attempt, as a lost process does."""

    def __init__(self, at: int) -> None:
        self.at = at

    def attach(self, engine) -> None:
        from ignite.engine import Events

        @engine.on(Events.ITERATION_STARTED)
        def die(e) -> None:
            first_attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"
            if first_attempt and e.state.iteration == self.at and e.pretraining.rank == 1:
                os._exit(17)


def resume_run(out: Path, die: bool):
    from medp2x.engine import PretrainConfig, default_handlers, pretrain

    cfg = PretrainConfig(dataset=images(), output_dir=out, **ENGINE_KW)
    return pretrain(cfg, handlers=default_handlers(cfg) + ([DieOnce(KILLED_AT)] if die else []))


def record_first_boxes() -> list[torch.Tensor]:
    """Record the crop boxes of the views' first draw (each rank seeds its own)."""
    import medp2x.views as views

    boxes: list[torch.Tensor] = []
    plan = views.BatchAugment.plan

    def recording_plan(self, *args, **kwargs):
        groups = plan(self, *args, **kwargs)
        if not boxes:
            boxes.extend(group.boxes for group in groups)
        return groups

    views.BatchAugment.plan = recording_plan
    return boxes


def main(out: Path) -> None:
    import ignite.distributed as idist

    from medp2x.distributed import finalize, initialize

    torch.set_num_threads(1)  # two processes on a 2-core machine: no oversubscription
    initialize("auto", timeout_minutes=2, quiet=True)
    attempt = int(os.environ["TORCHELASTIC_RESTART_COUNT"])
    if attempt == 0:
        for method in METHODS:
            comparison_run(out / method, method, batch_size=4)
        comparison_run(out / "byol_accumulated", "byol", batch_size=2, accumulation_steps=2)
        boxes = record_first_boxes()
        resume_run(out / "full", die=False)
        first = idist.all_gather(torch.cat(boxes[:1])[None])  # (world, rows, 4)
        if idist.get_rank() == 0:
            torch.save(first, out / "boxes.pt")
    summary = resume_run(out / "killed", die=True)  # attempt 0: rank 1 dies; 1: resumes
    if idist.get_rank() == 0:
        (out / "resumed.txt").write_text(
            f"attempt={attempt} world={idist.get_world_size()} iterations={summary.iterations} "
            f"resumed={summary.resumed}\n"
        )
    finalize()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
