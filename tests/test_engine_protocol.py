"""The pretraining protocol of issue #14: what an epoch is (Ciga et al. §4: a fixed number of
samples, whatever the dataset size), per-method SyncBN, and bf16 autocast only where the device
computes bf16 natively. The two-process checks (per-rank views, exact resume across ranks) are
in tests/test_distributed.py."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from torch import nn
from torch.utils.data import Dataset

import medp2x.engine as engine
import medp2x.precision as precision
import medp2x.sampling as sampling
from medp2x.checkpoints import torch_load_safe
from medp2x.engine import PretrainConfig, latest_checkpoint, pretrain
from medp2x.methods import METHODS, build_method, recipe_for
from medp2x.methods.base import ViewSpec
from medp2x.networks import build_encoder
from medp2x.optim import build_optimizer
from medp2x.precision import parse_amp, resolve_amp, wants_sync_bn
from medp2x.sampling import EPOCH_LENGTH, PassSampler, plan_epochs


class Noise(Dataset):
    """n small random images that remember which indices the loader asked for."""

    def __init__(self, n: int, size: int = 16):
        self.images = torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(0))
        self.requested: list[int] = []

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict:
        self.requested.append(int(i))
        return {"image": self.images[i], "label": -1}


def run(tmp_path, name: str, dataset: Dataset, **kw):
    base = dict(
        dataset=dataset,
        output_dir=tmp_path / name,
        arch="resnet18",
        image_size=16,
        batch_size=4,
        epochs=2,
        progress=False,
        n_saved=None,
    )
    return pretrain(PretrainConfig(**{**base, **kw}))


# --- 1. An epoch is a number of samples ---------------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
def test_the_full_recipe_gives_a_600_image_set_the_papers_schedule(method):
    """100,000 samples per epoch at the recipe's batch: 97 steps per epoch at batch 1024 on any
    dataset (one pass over 600 images is not even one batch), and the learning-rate schedule,
    warm-up included, counted in those epochs."""
    recipe = recipe_for(method, "full")
    plan = plan_epochs(600, recipe.batch_size, recipe.epochs, EPOCH_LENGTH["full"])
    per_epoch = 100_000 // recipe.batch_size  # 97 at 1024 (SimCLR, SwAV, BYOL), 390 at 256
    assert plan.iterations_per_epoch == per_epoch
    assert plan.samples_per_epoch == per_epoch * recipe.batch_size
    assert plan.total_iterations == recipe.epochs * per_epoch  # 97,000 or 78,000 (MoCo: 200)
    assert plan.passes_per_epoch == pytest.approx(plan.samples_per_epoch / 600)

    model = nn.Linear(4, 4)
    _, scheduler = build_optimizer(model, recipe, recipe.batch_size, plan.iterations_per_epoch)
    factor = scheduler.lr_lambdas[0]
    warmup = round(recipe.warmup_epochs * per_epoch)
    if warmup:
        assert factor(warmup - 2) < factor(warmup - 1) == pytest.approx(1.0)
    assert factor(warmup) == pytest.approx(1.0)
    assert factor(plan.total_iterations - 1) < 0.01 < factor(plan.total_iterations // 2)


def test_a_600_image_set_runs_the_full_recipe_schedule(tmp_path):
    """The full profile on 600 images at batch 8: 12,500 steps per epoch (100,000 samples,
    ~167 passes), 12.5 M in all; SimCLR's 10 warm-up epochs are 125,000 of those steps."""
    summary = run(
        tmp_path, "full", Noise(600), profile="full", batch_size=8, epochs=None, max_iterations=2
    )
    assert summary.iterations == 2 and summary.epochs == 1
    assert summary.iterations_per_epoch == 12_500
    assert summary.total_iterations == 1000 * 12_500
    record = json.loads((tmp_path / "full" / "run_config.json").read_text())
    assert record["epoch_plan"]["samples_per_epoch"] == 100_000
    assert record["epoch_plan"]["total_iterations"] == 12_500_000
    state = torch_load_safe(latest_checkpoint(tmp_path / "full" / "checkpoints"))
    assert state["settings"]["samples_per_epoch"] == 100_000
    peak = 0.3 * 8 / 256  # SimCLR's full recipe: LARS 0.3 x B / 256
    assert state["lr_scheduler"]["_last_lr"][0] == pytest.approx(peak * 3 / 125_000)


def test_a_set_smaller_than_one_batch_runs_in_repeated_passes(tmp_path):
    data = Noise(3)
    summary = run(tmp_path, "small", data, batch_size=4)  # tiny profile: one pass, >= 1 batch
    assert summary.iterations == 2 and summary.iterations_per_epoch == 1
    assert all(torch.isfinite(torch.tensor([summary.first_loss, summary.last_loss])))
    # Two epochs of 4 samples from passes over 3 images: every image once before any twice.
    assert sorted(data.requested[:3]) == [0, 1, 2] and sorted(data.requested[3:6]) == [0, 1, 2]
    record = json.loads((tmp_path / "small" / "run_config.json").read_text())
    assert record["epoch_plan"]["iterations_per_epoch"] == 1
    with pytest.raises(ValueError, match=r"epoch_length 3 is less than one global batch of 4"):
        run(tmp_path, "short", Noise(3), epoch_length=3)


def test_sampler_draws_are_identical_across_a_resume(tmp_path):
    """epoch_length 12 over 8 images at batch 4: 3 steps per epoch from passes that do not
    align with epochs. Killed at step 5 (mid epoch 2) with only the checkpoint at 4 kept, the
    resumed run must ask for exactly the samples the uninterrupted run asked for."""
    kw = dict(epoch_length=12, checkpoint_every=2)
    full_data = Noise(8)
    full = run(tmp_path, "full", full_data, **kw)
    assert full.iterations == 6 and full.iterations_per_epoch == 3
    drawn = full_data.requested
    assert len(drawn) == 24
    for start in (0, 8, 16):  # the stream is consecutive permutations of the 8 images
        assert sorted(drawn[start : start + 8]) == list(range(8))

    killed_data = Noise(8)
    run(tmp_path, "killed", killed_data, max_iterations=5, **kw)
    (tmp_path / "killed" / "checkpoints" / "checkpoint_5.pt").unlink()
    resumed_data = Noise(8)
    resumed = run(tmp_path, "killed", resumed_data, **kw)
    assert resumed.resumed and resumed.iterations == 6
    assert killed_data.requested[:16] + resumed_data.requested == drawn
    assert engine.read_loss_log(tmp_path / "killed") == engine.read_loss_log(tmp_path / "full")


def test_epoch_length_defaults_by_profile_and_bad_values_are_named():
    def length(**kw) -> int:
        return sampling.resolve_epoch_length(PretrainConfig(dataset=[], output_dir=".", **kw))

    assert length(profile="full") == 100_000 and length(profile="tiny") == 0
    assert length(profile="full", epoch_length=0) == 0  # one pass, asked for explicitly
    assert length(epoch_length=1e5) == 100_000  # what a command line may give
    for bad in (-1, 2.5, "many"):
        with pytest.raises(ValueError, match=r"epoch_length = .* is not allowed: an integer >= 0"):
            length(epoch_length=bad)


def test_pass_sampler_shards_without_overlap_and_depends_on_seed_and_epoch_only():
    ranks = [PassSampler(10, 24, num_replicas=2, rank=r, seed=3) for r in range(2)]
    for epoch in (0, 5):
        for s in ranks:
            s.set_epoch(epoch)
        shards = [list(s) for s in ranks]
        assert [len(x) for x in shards] == [12, 12]
        stream = ranks[0].epoch_indices(epoch).tolist()
        assert shards[0] == stream[0::2] and shards[1] == stream[1::2]
    again = PassSampler(10, 24, num_replicas=2, rank=0, seed=3)
    again.set_epoch(5)
    assert list(again) == shards[0]  # a fresh sampler: nothing but (seed, epoch) matters
    # Epoch 1 continues the stream where epoch 0 stopped: passes 2 (from index 4) and 3.
    stream = torch.cat([ranks[0].permutation(p) for p in range(5)])
    assert ranks[0].epoch_indices(1).tolist() == stream[24:48].tolist()
    assert PassSampler(10, 24, seed=4).epoch_indices(0).tolist() != stream[:24].tolist()


# --- 5. SyncBN per method -----------------------------------------------------------------------


def test_sync_bn_is_chosen_per_method(monkeypatch):
    """MoCo keeps per-GPU BN statistics (its shuffled BN); the others use SyncBN on GPUs, as
    their originals. CPU processes cannot run SyncBatchNorm at all."""
    expected = {"simclr": True, "swav": True, "byol": True, "moco": False, "dino": True}
    methods = {name: build_method(name, build_encoder("resnet18")) for name in METHODS}
    assert {name: m.sync_bn for name, m in methods.items()} == expected
    assert not any(wants_sync_bn(m, torch.device("cuda")) for m in methods.values())  # 1 process
    monkeypatch.setattr(engine.idist, "get_world_size", lambda: 4)
    assert {n: wants_sync_bn(m, torch.device("cuda")) for n, m in methods.items()} == expected
    assert not any(wants_sync_bn(m, torch.device("cpu")) for m in methods.values())


# --- 6. bf16 where it is native -----------------------------------------------------------------


def _decide(amp, crop: int = 32):
    encoder = build_encoder("resnet18")
    views = ViewSpec(n_large=2, large_size=crop)
    return resolve_amp(amp, torch.device("cpu"), encoder, views, 3)


def test_amp_auto_follows_the_cpus_native_bf16(monkeypatch, caplog):
    monkeypatch.setattr(precision, "cpu_bf16_features", lambda: [])
    with caplog.at_level(logging.INFO, logger="medp2x.engine"):
        off = _decide("auto")
    assert not off.enabled and "neither AVX512_BF16 nor AMX" in off.reason
    assert [r.getMessage() for r in caplog.records] == [off.reason]  # one line says why
    with pytest.warns(RuntimeWarning, match="bf16 is emulated"):
        assert _decide(True).enabled  # obeyed, with a warning
    assert not _decide("false").enabled

    monkeypatch.setattr(precision, "cpu_bf16_features", lambda: ["AVX512_BF16"])
    on = _decide("auto")
    assert on.enabled and on.requested == "auto" and "AVX512_BF16" in on.reason
    # 16 px crops give layer4 1 x 1 maps, where oneDNN's bf16 weight gradient is wrong:
    small = _decide("auto", crop=16)
    assert not small.enabled and "layer4.0.conv1" in small.reason
    with pytest.raises(ValueError, match="16 px crops"):
        _decide(True, crop=16)


def test_amp_settings_parse_and_gpus_are_checked(monkeypatch):
    assert [parse_amp(v) for v in (True, False, "auto", "TRUE", "false", 1)] == [
        "true",
        "false",
        "auto",
        "true",
        "false",
        "true",
    ]
    with pytest.raises(ValueError, match="amp must be true, false or auto, got 'fast'"):
        parse_amp("fast")
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla V100")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: False)
    assert precision.native_bf16(torch.device("cuda")) == (
        False,
        "Tesla V100 has no native bf16 (it needs compute capability 8.0 or later)",
    )
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    assert precision.native_bf16(torch.device("cuda"))[0]


def test_cpu_bf16_features_from_torch_or_the_linux_flags(monkeypatch, tmp_path):
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True)
    assert precision.cpu_bf16_features() == ["AMX"]
    monkeypatch.delattr(torch.cpu, "_is_amx_tile_supported")  # an older torch: read the flags
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("flags\t\t: fpu sse avx2 avx512f avx512_bf16 avx512_vnni\n")
    assert precision.cpu_bf16_features(cpuinfo) == ["AVX512_BF16"]
    cpuinfo.write_text("flags\t\t: fpu sse avx2\n")
    assert precision.cpu_bf16_features(cpuinfo) == []
    assert precision.cpu_bf16_features(tmp_path / "missing") == []


def test_the_amp_decision_is_recorded_with_the_run(tmp_path, monkeypatch):
    monkeypatch.setattr(precision, "cpu_bf16_features", lambda: [])
    summary = run(tmp_path, "run", Noise(8), image_size=32, max_iterations=1)
    record = json.loads((tmp_path / "run" / "run_config.json").read_text())
    assert not summary.amp and record["amp"]["requested"] == "auto"
    assert record["amp"]["enabled"] is False and "emulated" in record["amp"]["reason"]
