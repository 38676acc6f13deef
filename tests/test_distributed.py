"""Two CPU processes (gloo) must train exactly like one process on the concatenated batch.

Each rank takes half of a global batch, runs the method inside DDP and backpropagates; DDP
averages the per-rank gradients. Loss (mean over ranks) and every gradient must equal a
single-process run on the whole batch. This fails if the gather drops the other ranks'
gradients (the 1/W bug of several peers), if labels are not offset by rank, or if Sinkhorn
normalises over the local instead of the global batch.

The encoder has no BatchNorm and the methods run in eval mode: BN statistics over a half batch
differ from those over the whole batch by design (that is what SyncBatchNorm is for), which
would make the comparison meaningless. Everything runs in float64 so the tolerance can be tight.
"""

from __future__ import annotations

import socket

import ignite.distributed as idist
import pytest
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from medp2x.methods import build_method

WORLD = 2
PER_RANK = 4
EQUIVALENCE_METHODS = ("simclr", "swav", "byol")


def _encoder() -> nn.Module:
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


def _method(name: str) -> nn.Module:
    torch.manual_seed(0)
    overrides = {"swav": {"n_prototypes": 10, "queue_length": 0}}.get(name, {})
    method = build_method(name, _encoder(), "tiny", **overrides).double()
    return method.eval()


def _global_views(name: str) -> list[torch.Tensor]:
    spec = _method(name).recipe.views
    g = torch.Generator().manual_seed(1)
    sizes = [16] * spec.n_large + [8] * spec.n_small
    return [torch.rand(WORLD * PER_RANK, 3, s, s, generator=g, dtype=torch.float64) for s in sizes]


def _grads(method: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in method.named_parameters() if p.grad is not None}


def _rank_worker(local_rank: int, out_file: str) -> None:
    rank, world = idist.get_rank(), idist.get_world_size()
    results = {"world": world}
    for name in EQUIVALENCE_METHODS:
        method = _method(name)
        model = DistributedDataParallel(method)
        views = [v[rank * PER_RANK : (rank + 1) * PER_RANK] for v in _global_views(name)]
        loss = model(views)["loss"]
        loss.backward()  # DDP all-reduces and averages the gradients over ranks
        mean_loss = idist.all_reduce(loss.detach().clone()) / world
        results[name] = {"loss": mean_loss, "grads": _grads(method)}
    results["moco"] = _moco_on_rank(rank)
    if rank == 0:
        torch.save(results, out_file)


def _moco_on_rank(rank: int) -> dict[str, torch.Tensor]:
    """Train-mode MoCo step: keys through the cross-rank shuffle, global-batch enqueue."""
    torch.manual_seed(0)
    method = build_method("moco", _encoder(), "tiny", queue_length=32).double()
    model = DistributedDataParallel(method)
    views = [v[rank * PER_RANK : (rank + 1) * PER_RANK] for v in _global_views("moco")]
    with torch.no_grad():
        plain_keys = method._key_forward(views[1])
    torch.manual_seed(100 + rank)  # ranks draw different permutations; rank 0's must win
    shuffled_keys = method._keys(views[1])
    model(views)["loss"].backward()
    return {
        "shuffle_error": (shuffled_keys - plain_keys).abs().max(),
        "queue": method.queue.clone(),
        "ptr": method.queue_ptr.clone(),
    }


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def two_process_results(tmp_path_factory) -> dict:
    """One 2-process gloo job runs every method (process start-up dominates the cost)."""
    out_file = tmp_path_factory.mktemp("ddp") / "results.pt"
    with idist.Parallel(
        backend="gloo", nproc_per_node=WORLD, master_addr="127.0.0.1", master_port=_free_port()
    ) as parallel:
        parallel.run(_rank_worker, str(out_file))
    results = torch.load(out_file, weights_only=True)
    assert results["world"] == WORLD
    return results


@pytest.mark.parametrize("name", EQUIVALENCE_METHODS)
def test_two_process_run_equals_one_process_run(name, two_process_results):
    distributed = two_process_results[name]
    single = _method(name)
    loss = single(_global_views(name))["loss"]
    loss.backward()
    expected = _grads(single)

    torch.testing.assert_close(distributed["loss"], loss.detach(), rtol=1e-10, atol=1e-12)
    assert distributed["grads"].keys() == expected.keys()
    assert any(k.startswith("encoder.") for k in expected)
    for key, grad in expected.items():
        assert grad.abs().max() > 0, f"{key}: zero gradient makes the comparison vacuous"
        torch.testing.assert_close(distributed["grads"][key], grad, rtol=1e-8, atol=1e-12, msg=key)


def test_moco_shuffled_keys_and_global_enqueue(two_process_results):
    """Without BN a key cannot depend on its batch-mates, so shuffle + unshuffle across ranks
    must return each rank its own keys; the queue must receive both ranks' keys in rank order."""
    distributed = two_process_results["moco"]
    assert float(distributed["shuffle_error"]) < 1e-12
    torch.manual_seed(0)
    single = build_method("moco", _encoder(), "tiny", queue_length=32).double()
    keys = torch.nn.functional.normalize(single._key_forward(_global_views("moco")[1]), dim=1)
    torch.testing.assert_close(distributed["queue"][: WORLD * PER_RANK], keys.detach())
    torch.testing.assert_close(
        distributed["queue"][WORLD * PER_RANK :], single.queue[WORLD * PER_RANK :]
    )
    assert int(distributed["ptr"]) == WORLD * PER_RANK


# --- The engine on two processes: per-rank views, exact resume (issue #14, item 3) -------------

ENGINE_KW = dict(
    method="simclr",
    arch="resnet18",
    image_size=16,
    batch_size=4,  # per process: a global batch of 8
    epochs=2,  # 16 images: 2 steps per epoch, 4 in all
    progress=False,
    n_saved=None,
)


def _engine_worker(local_rank: int, out_dir: str) -> None:
    """Both ranks run an uninterrupted job, then a job stopped at step 3 (mid epoch 2) and
    resumed, and record the crop boxes their first step drew."""
    from pathlib import Path

    import medp2x.views as views
    from medp2x.engine import PretrainConfig, pretrain

    torch.set_num_threads(1)  # two processes on a 2-core machine: no oversubscription
    out = Path(out_dir)
    g = torch.Generator().manual_seed(0)
    images = [{"image": torch.rand(3, 16, 16, generator=g), "label": -1} for _ in range(16)]
    boxes: list[torch.Tensor] = []
    plan = views.BatchAugment.plan

    def recording_plan(self, *args, **kwargs):
        groups = plan(self, *args, **kwargs)
        boxes.extend(group.boxes for group in groups)
        return groups

    views.BatchAugment.plan = recording_plan
    full = pretrain(PretrainConfig(dataset=images, output_dir=out / "full", **ENGINE_KW))
    first_boxes = torch.cat(boxes[:1])
    pretrain(
        PretrainConfig(dataset=images, output_dir=out / "killed", max_iterations=3, **ENGINE_KW)
    )
    resumed = pretrain(PretrainConfig(dataset=images, output_dir=out / "killed", **ENGINE_KW))
    all_boxes = idist.all_gather(first_boxes[None])  # (world, rows, 4)
    if idist.get_rank() == 0:
        torch.save(
            {
                "world": idist.get_world_size(),
                "iterations": (full.iterations, resumed.iterations),
                "resumed": resumed.resumed,
                "boxes": all_boxes,
            },
            out / "results.pt",
        )


@pytest.fixture(scope="module")
def two_process_pretraining(tmp_path_factory) -> tuple[dict, object]:
    out = tmp_path_factory.mktemp("ddp_engine")
    with idist.Parallel(
        backend="gloo", nproc_per_node=WORLD, master_addr="127.0.0.1", master_port=_free_port()
    ) as parallel:
        parallel.run(_engine_worker, str(out))
    results = torch.load(out / "results.pt", weights_only=True)
    assert results["world"] == WORLD
    return results, out


def test_ranks_draw_different_crops(two_process_pretraining):
    """Each rank seeds its views from (seed, rank, step): the same boxes on both ranks would
    mean a global batch of 8 images holds only 4 independent pairs of views."""
    boxes = two_process_pretraining[0]["boxes"]
    assert boxes.shape[0] == WORLD and boxes.shape[1] == 2 * ENGINE_KW["batch_size"]
    assert not torch.equal(boxes[0], boxes[1])
    assert (boxes[0] != boxes[1]).any(dim=1).float().mean() > 0.9  # not a few rows by chance


def test_a_resumed_two_process_run_equals_an_uninterrupted_one(two_process_pretraining):
    from medp2x.checkpoints import read_checkpoint
    from medp2x.engine import read_loss_log

    results, out = two_process_pretraining
    assert results["iterations"] == (4, 4) and results["resumed"]
    full, _ = read_checkpoint(out / "full" / "encoder.pt")
    resumed, _ = read_checkpoint(out / "killed" / "encoder.pt")
    assert full.keys() == resumed.keys()
    for key in full:
        torch.testing.assert_close(resumed[key], full[key], rtol=0, atol=1e-6, msg=key)
    assert read_loss_log(out / "killed") == read_loss_log(out / "full")
