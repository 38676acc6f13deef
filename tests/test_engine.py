"""The pretraining engine: loss goes down, checkpoints are written, a killed run resumes to
exactly the weights of an uninterrupted one, and surgery runs on fresh runs only."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from ignite.engine import Engine
from torch.utils.data import Dataset

from medp2x.checkpoints import read_checkpoint, save_encoder
from medp2x.engine import (
    PretrainConfig,
    latest_checkpoint,
    pretrain,
    read_loss_log,
    read_loss_rows,
)
from medp2x.monitor import CollapseMonitor
from medp2x.networks import build_encoder


class Blobs(Dataset):
    """Deterministic synthetic images with structure (coloured blobs on noise)."""

    def __init__(self, n: int = 32, size: int = 32, channels: int = 3):
        g = torch.Generator().manual_seed(0)
        yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
        self.images = []
        for _ in range(n):
            cy, cx, r = (torch.rand(3, generator=g) * torch.tensor([size, size, size / 3])).tolist()
            mask = ((yy - cy) ** 2 + (xx - cx) ** 2 < (r + 3) ** 2).float()
            colour = torch.rand(channels, 1, 1, generator=g)
            noise = 0.1 * torch.rand(channels, size, size, generator=g)
            self.images.append((mask * colour + noise).clamp(0, 1))

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict:
        return {"image": self.images[i], "label": -1, "meta": {"index": i}}


def tiny_config(tmp_path, name, **kw) -> PretrainConfig:
    base = dict(
        dataset=Blobs(),
        output_dir=tmp_path / name,
        method="simclr",
        profile="tiny",
        arch="resnet18",
        image_size=32,
        batch_size=8,
        epochs=2,
        progress=False,
        checkpoint_every=3,
        n_saved=10,
        amp=False,  # fp32: at 32 px, bf16 is no faster even where native (docs/pretraining.md)
    )
    base.update(kw)
    return PretrainConfig(**base)


def encoder_weights(path):
    state, _ = read_checkpoint(path)
    return state


def test_pretrain_writes_outputs_and_loss(tmp_path):
    summary = pretrain(tiny_config(tmp_path, "run"))
    out = tmp_path / "run"
    assert summary.iterations == 2 * (32 // 8)
    assert (out / "encoder.pt").is_file() and (out / "run_config.json").is_file()
    assert (out / "loss.png").stat().st_size > 1000  # the convergence curve
    assert list((out / "tb").glob("events.*")), "TensorBoard events missing"
    losses = read_loss_log(out)
    assert len(losses) == summary.iterations
    assert summary.first_loss == losses[0] and summary.last_loss == losses[-1]
    assert all(torch.isfinite(torch.tensor(losses)))
    spreads = [float(r["spread"]) for r in read_loss_rows(out)]
    assert len(spreads) == summary.iterations and 0.0 < summary.spread < 3.0
    assert latest_checkpoint(out / "checkpoints").name == f"checkpoint_{summary.iterations}.pt"


def test_killed_run_resumes_to_identical_weights(tmp_path):
    full = pretrain(tiny_config(tmp_path, "full"))
    # "Kill" after iteration 5 with only the mid-epoch checkpoint at 3 on disk:
    # iterations 4-5 are lost work and must be redone identically.
    killed = pretrain(tiny_config(tmp_path, "killed", max_iterations=5))
    assert killed.iterations == 5
    ckpts = tmp_path / "killed" / "checkpoints"
    for path in ckpts.glob("checkpoint_*.pt"):
        if int(path.stem.split("_")[1]) > 3:
            path.unlink()
    assert latest_checkpoint(ckpts).name == "checkpoint_3.pt"
    resumed = pretrain(tiny_config(tmp_path, "killed"))
    assert resumed.resumed and resumed.iterations == full.iterations
    a, b = encoder_weights(full.encoder_path), encoder_weights(resumed.encoder_path)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6, msg=key)
    assert read_loss_log(tmp_path / "killed") == read_loss_log(tmp_path / "full")
    # Started once more after it finished: nothing is retrained (Ignite alone would restart it).
    again = pretrain(tiny_config(tmp_path, "killed"))
    assert again.resumed and again.iterations == full.iterations
    c = encoder_weights(again.encoder_path)
    assert all(torch.equal(a[k], c[k]) for k in a)
    assert read_loss_log(tmp_path / "killed") == read_loss_log(tmp_path / "full")


def test_collapse_monitor_warns_at_the_end_of_a_collapsed_run(capsys):
    def run(outputs: dict) -> list[str]:
        engine = Engine(lambda e, b: outputs)
        monitor = CollapseMonitor(total_iterations=50)
        monitor.attach(engine)
        engine.run(range(50), max_epochs=1)
        return monitor.warnings

    assert run({"loss": 1.0, "spread": 0.8, "prediction_entropy": 0.6}) == []
    assert "embeddings collapsed (spread 0.010" in run({"loss": 1.0, "spread": 0.01})[0]
    warnings = run({"loss": 4.159, "spread": 0.6, "prediction_entropy": 0.999})
    assert len(warnings) == 1 and "uniform over the prototypes" in warnings[0]
    assert "WARNING: predictions are uniform" in capsys.readouterr().out
    assert run({"loss": 1.0, "spread": 0.5, "teacher_entropy": 0.4}) == []  # sharp: healthy
    warnings = run({"loss": 11.1, "spread": 0.5, "teacher_entropy": 0.999})
    assert len(warnings) == 1 and "DINO's teacher outputs are uniform" in warnings[0]


def test_a_run_folder_of_other_settings_is_not_resumed(tmp_path):
    """A stale folder (here: another batch size and method) must not be continued silently."""
    pretrain(tiny_config(tmp_path, "run", max_iterations=2))
    with pytest.raises(ValueError, match=r"global_batch_size 8 there, 4 now.*new output_dir"):
        pretrain(tiny_config(tmp_path, "run", batch_size=4))
    with pytest.raises(ValueError, match=r"method 'simclr' there, 'byol' now"):
        pretrain(tiny_config(tmp_path, "run", method="byol"))
    assert pretrain(tiny_config(tmp_path, "run", max_iterations=3)).resumed


def test_surgery_on_fresh_run_only(tmp_path):
    encoder = build_encoder("resnet18")
    with torch.no_grad():  # an inflated first stage, like an ImageNet SSL checkpoint
        for m in encoder.modules():
            if isinstance(m, torch.nn.Conv2d):
                m.weight.mul_(20)
    first = tmp_path / "first.pt"
    save_encoder(first, encoder.state_dict(), arch="resnet18", in_channels=3, normalization=None)
    cfg = dict(ssl_checkpoint=first, max_iterations=3)
    fresh = pretrain(tiny_config(tmp_path, "p2x", **cfg))
    assert fresh.surgery_applied
    report = tmp_path / "p2x" / "surgery_report.csv"
    assert report.is_file()
    stamp = report.stat().st_mtime_ns
    resumed = pretrain(tiny_config(tmp_path, "p2x", ssl_checkpoint=first))
    assert resumed.resumed and not resumed.surgery_applied
    assert report.stat().st_mtime_ns == stamp


def test_gray_data_from_rgb_checkpoint_sum_and_repeat_stems(tmp_path):
    """--gray_stem: "sum" trains a 1-channel stem, "repeat" keeps 3 channels (gray repeated)."""
    first = tmp_path / "rgb.pt"
    save_encoder(first, build_encoder("resnet18").state_dict(), "resnet18", 3, normalization=None)
    gray = Blobs(n=16, channels=1)
    for stem, channels in (("sum", 1), ("repeat", 3)):
        summary = pretrain(
            tiny_config(
                tmp_path,
                stem,
                dataset=gray,
                modality="gray",
                gray_stem=stem,
                ssl_checkpoint=first,
                max_iterations=1,
            )
        )
        state, report = read_checkpoint(summary.encoder_path, in_channels=None)  # as stored
        assert state["conv1.weight"].shape[1] == channels and report.in_channels == channels


def test_normalization_override_and_bf16_are_recorded(tmp_path):
    summary = pretrain(
        tiny_config(tmp_path, "amp", normalization="none", amp=True, max_iterations=2)
    )
    _, report = read_checkpoint(summary.encoder_path)
    assert report.normalization is None  # [0, 1] input, as the user asked
    assert all(torch.isfinite(torch.tensor(read_loss_log(tmp_path / "amp"))))
    imagenet = pretrain(tiny_config(tmp_path, "in", normalization="imagenet", max_iterations=1))
    assert read_checkpoint(imagenet.encoder_path)[1].normalization["mean"] == pytest.approx(
        [0.485, 0.456, 0.406]
    )


def test_views_crop_from_the_source_size_not_the_crop_size(tmp_path, monkeypatch):
    """source_size caps the images the views crop from (shorter side, never enlarged); by
    default it is the profile's multiple of the crop, so a crop keeps the image's detail
    instead of being enlarged from a copy shrunk to the crop size."""
    import medp2x.views as views

    seen = []
    original = views.BatchAugment.__call__

    def record(self, images, generator=None):
        seen.append(tuple(images.pixels.shape[-2:]))
        return original(self, images, generator)

    monkeypatch.setattr(views.BatchAugment, "__call__", record)
    pretrain(tiny_config(tmp_path, "src", image_size=16, source_size=24, max_iterations=1))
    pretrain(tiny_config(tmp_path, "crop", image_size=16, max_iterations=1))
    assert seen == [(24, 24), (32, 32)]  # 32 px Blobs: capped at 24; tiny default 2 x 16
    with pytest.raises(ValueError, match=r"source_size 24 there, 32 now"):
        pretrain(tiny_config(tmp_path, "src", image_size=16, max_iterations=2))


class NaNBlobs(Blobs):
    def __getitem__(self, i: int) -> dict:
        sample = super().__getitem__(i)
        return {**sample, "image": torch.full_like(sample["image"], float("nan"))}


def test_a_diverged_run_stops_and_keeps_its_last_good_checkpoint(tmp_path):
    pretrain(tiny_config(tmp_path, "run", max_iterations=3))
    with pytest.raises(FloatingPointError, match=r"simclr loss is nan at iteration 4"):
        pretrain(tiny_config(tmp_path, "run", dataset=NaNBlobs()))
    last = latest_checkpoint(tmp_path / "run" / "checkpoints")
    assert last.name == "checkpoint_3.pt"
    state = read_checkpoint(last, in_channels=None)[0]
    assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())


def test_the_bundles_composition_equals_the_python_api(tmp_path):
    """What a bundle runs (a declared network_def receiving the first-stage weights, the
    declared method/views/optimiser callables, the handler list it parses, composed from the
    engine's pieces) trains to exactly the weights of ``pretrain(cfg)``, and killed/resumed it
    still does (surgery once)."""
    from monai.bundle import ConfigParser

    from medp2x import engine
    from medp2x.methods import build_method
    from medp2x.optim import build_optimizer
    from medp2x.views import build_views

    repo = Path(__file__).resolve().parents[1]
    first = tmp_path / "first.pt"
    torch.manual_seed(3)
    save_encoder(first, build_encoder("resnet18").state_dict(), "resnet18", 3, None)
    short = dict(ssl_checkpoint=first, epochs=1, checkpoint_every=2)  # 4 iterations
    api = pretrain(tiny_config(tmp_path, "api", **short))

    def bundle_handlers() -> list:
        parser = ConfigParser(ConfigParser.load_config_files(str(repo / "bundles/p2x_histo.json")))
        parser.update({"checkpoint_every": 2, "keep_checkpoints": 10})
        parser.parse()
        return parser.get_parsed_content("train#handlers")

    def composed(**kw):
        cfg = tiny_config(tmp_path, "bundle", **short, **kw)
        run = engine.build_run(
            cfg, encoder=build_encoder("resnet18"), method=build_method, views=build_views,
            optimizer=build_optimizer,
        )  # fmt: skip
        trainer = engine.create_trainer(run)
        engine.attach_handlers(trainer, [*bundle_handlers()[:2], None])  # surgery, checkpoints
        engine.resume(trainer)
        engine.train(trainer)
        return engine.finish(trainer)

    killed = composed(max_iterations=3)
    assert killed.surgery_applied and (tmp_path / "bundle" / "surgery_report.csv").is_file()
    for path in (tmp_path / "bundle" / "checkpoints").glob("checkpoint_*.pt"):
        if int(path.stem.split("_")[1]) > 2:
            path.unlink()  # iteration 3 is lost work, redone identically
    resumed = composed()
    assert resumed.resumed and not resumed.surgery_applied
    a, b = encoder_weights(api.encoder_path), encoder_weights(resumed.encoder_path)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6, msg=key)
    with pytest.raises(TypeError, match="no attach"):
        engine.attach_handlers(
            engine.create_trainer(engine.build_run(tiny_config(tmp_path, "x"))), [1]
        )
