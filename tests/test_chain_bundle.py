"""The HPT bundles: ``bundles/hpt_<benchmark>.json`` are the merged overlays, and one command
runs base -> source -> target on a hospital's own folders, recording both stages' data."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from test_chain import one_thread  # noqa: F401 (autouse: one torch thread)

from medp2x.checkpoints import save_encoder
from medp2x.networks import IMAGENET_MEAN, IMAGENET_STD, build_encoder

REPO = Path(__file__).resolve().parents[1]


def test_hpt_bundles_are_the_merged_overlays():
    from medp2x.bundle import CHAINS, chain_bundles

    expected = chain_bundles()
    assert sorted(p.name for p in expected) == sorted(f"hpt_{name}.json" for name in CHAINS["hpt"])
    for path, config in expected.items():
        assert json.loads(path.read_text()) == config, f"{path.name}: run python -m medp2x.bundle"
        assert config["job"]["_target_"] == "medp2x.chain.ChainJob"


def gray_pngs(folder: Path, n: int, seed: int) -> Path:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        pixels = (rng.random((40, 40)) * 255).astype(np.uint8)
        Image.fromarray(pixels, mode="L").save(folder / f"scan_{i}.png")
    return folder


def test_hpt_bundle_runs_base_source_target_on_private_folders(tmp_path, capsys):
    from monai.bundle import run

    torch.manual_seed(0)
    base = save_encoder(tmp_path / "base.pt", build_encoder("resnet18").state_dict(), "resnet18",
                        3, {"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)})  # fmt: skip
    source, target = gray_pngs(tmp_path / "all_us", 8, 0), gray_pngs(tmp_path / "task", 8, 1)
    out = tmp_path / "run"
    run(
        config_file=str(REPO / "bundles" / "hpt_us.json"), data_dir=str(target),
        source_dir=str(source), ssl_checkpoint=str(base), output_dir=str(out),
        target_trainable="bn", image_size=16, batch_size=8, epochs=1, amp=False,
    )  # fmt: skip
    text = capsys.readouterr().out
    record = json.loads((out / "chain.json").read_text())["stages"]
    assert [(s["settings"]["name"], s["status"]) for s in record] == [
        ("source", "done"),
        ("target", "done"),
    ]
    assert record[0]["data"] == str(source) and record[0]["samples"] == 8
    assert record[1]["data"] == str(target) and record[1]["samples"] == 8
    assert record[0]["started_from"] == str(base)
    assert record[1]["started_from"] == str(out / "0_source" / "encoder.pt")
    assert "trainable = bn" in text and "moco" in text  # HPT's method by default
    assert (out / "1_target" / "encoder.pt").is_file()
