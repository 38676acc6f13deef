"""Official checkpoint layouts -> torchvision, read back exactly; malicious files refused.

One random torchvision ResNet-50 (random BN statistics) is written in each publisher's layout,
built here independently of the loader (prefixes, wrappers, heads, MoCo's queue and optimizer,
Separius' module tree, BYOL's Haiku/dill pickle with HWIO kernels and average/hidden BN
statistics). Reading it back must give the same tensors and the same eval-mode outputs.
"""

from __future__ import annotations

import builtins
import collections
import json
import os
import pickle
import pickletools
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from torch import nn

from medp2x.checkpoints import (
    IMAGENET,
    SWAV_NORMALIZATION,
    infer_arch,
    load_encoder,
    read_checkpoint,
    save_encoder,
)
from medp2x.cli import main as cli_main

# ------------------------------------------------------------------------------------------
# The source network and its expected outputs
# ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny forward passes: one thread avoids OpenMP barrier waits on a shared 2-core box."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def source() -> dict:
    torch.manual_seed(0)
    model = torchvision.models.resnet50(weights=None)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                n = module.num_features
                module.weight.copy_(torch.rand(n, generator=generator) + 0.5)
                module.bias.copy_(torch.randn(n, generator=generator) * 0.1)
                module.running_mean.copy_(torch.randn(n, generator=generator) * 0.2)
                module.running_var.copy_(torch.rand(n, generator=generator) * 1.5 + 0.5)
                module.num_batches_tracked.fill_(
                    int(torch.randint(1, 10_000, (1,), generator=generator))
                )
    fc = {"fc.weight": model.fc.weight.detach().clone(), "fc.bias": model.fc.bias.detach().clone()}
    model.fc = nn.Identity()
    model.eval()
    backbone = {k: v.detach().clone() for k, v in model.state_dict().items()}
    images = torch.rand(2, 3, 32, 32, generator=generator)
    with torch.no_grad():
        reference = model(images)
    return {
        "model": model,
        "backbone": backbone,
        "fc": fc,
        "images": images,
        "reference": reference,
    }


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("official")


def assert_same_network(path: Path, source: dict, fmt: str, normalization, **kwargs):
    encoder, report = load_encoder(path, **kwargs)
    assert report.format == fmt and report.detected == ("format" not in kwargs)
    assert report.arch == "resnet50" and report.missing == [] and report.mismatched == []
    assert report.normalization == normalization
    state = encoder.state_dict()
    assert set(state) == set(source["backbone"])
    for key, value in source["backbone"].items():
        assert torch.equal(state[key], value), key
    encoder.eval()
    with torch.no_grad():
        assert torch.equal(encoder(source["images"]), source["reference"])
    return report


# ------------------------------------------------------------------------------------------
# Publisher layouts, each built as its publisher does
# ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def torchvision_file(source, files) -> Path:
    """torchvision's own ``resnet50-*.pth``: a flat state dict with fc."""
    path = files / "resnet50-0676ba61.pth"
    torch.save(collections.OrderedDict({**source["backbone"], **source["fc"]}), path)
    return path


def test_torchvision_supervised(source, torchvision_file):
    report = assert_same_network(torchvision_file, source, "torchvision", IMAGENET)
    assert sorted(report.ignored) == ["fc.bias", "fc.weight"]
    assert "fc.* (2)" in str(report)


def swav_state(source) -> dict:
    """facebookresearch/swav ``swav_800ep_pretrain.pth.tar``: DDP ``module.`` names, no fc,
    projection head Linear-BN-ReLU-Linear (2048-2048-128) and 3000 prototypes."""
    state = collections.OrderedDict(("module." + k, v) for k, v in source["backbone"].items())
    head = nn.Sequential(
        nn.Linear(2048, 2048), nn.BatchNorm1d(2048), nn.ReLU(), nn.Linear(2048, 128)
    )
    state.update(("module.projection_head." + k, v) for k, v in head.state_dict().items())
    state["module.prototypes.weight"] = torch.randn(3000, 128)
    return state


def test_swav(source, files):
    path = files / "swav_800ep_pretrain.pth.tar"
    torch.save(swav_state(source), path, _use_new_zipfile_serialization=False)  # a 2020 file
    report = assert_same_network(path, source, "swav", SWAV_NORMALIZATION)
    assert len(report.ignored) == 10 and all(
        k.startswith(("module.projection_head.", "module.prototypes.")) for k in report.ignored
    )


def test_swav_under_state_dict(source, files):
    path = files / "swav_wrapped.pth"
    torch.save({"state_dict": swav_state(source), "epoch": 800}, path)
    report = assert_same_network(path, source, "swav", SWAV_NORMALIZATION)
    assert "epoch" in report.ignored


def test_moco_v2(source, files):
    """facebookresearch/moco ``moco_v2_800ep_pretrain.pth.tar``: epoch, arch, optimizer and the
    whole MoCo module under ``module.`` (query and key encoders with MLP fc, queue, pointer)."""
    backbone = source["backbone"]
    mlp = nn.Sequential(nn.Linear(2048, 2048), nn.ReLU(), nn.Linear(2048, 128)).state_dict()
    state = collections.OrderedDict()
    for encoder, shift in (("encoder_q", 0.0), ("encoder_k", 1.0)):  # key encoder differs
        state.update(
            (f"module.{encoder}.{k}", v + shift if v.is_floating_point() else v)
            for k, v in backbone.items()
        )
        state.update((f"module.{encoder}.fc.{k}", v) for k, v in mlp.items())
    state["module.queue"] = nn.functional.normalize(torch.randn(128, 65536), dim=0)
    state["module.queue_ptr"] = torch.zeros(1, dtype=torch.long)
    params = [
        nn.Parameter(v.clone())
        for k, v in state.items()
        if k.startswith("module.encoder_q.") and v.is_floating_point()
    ]
    optimizer = torch.optim.SGD(params, lr=0.03, momentum=0.9, weight_decay=1e-4)
    for p in params[:5]:
        optimizer.state[p]["momentum_buffer"] = torch.randn_like(p)
    path = files / "moco_v2_800ep_pretrain.pth.tar"
    checkpoint = {
        "epoch": 800,
        "arch": "resnet50",
        "state_dict": state,
        "optimizer": optimizer.state_dict(),
    }
    torch.save(checkpoint, path, _use_new_zipfile_serialization=False)
    report = assert_same_network(path, source, "moco", IMAGENET)
    assert {"epoch", "arch", "optimizer", "module.queue", "module.queue_ptr"} <= set(report.ignored)
    assert sum(k.startswith("module.encoder_k.") for k in report.ignored) == len(backbone) + 4
    assert sorted(k for k in report.ignored if k.startswith("module.encoder_q.")) == sorted(
        f"module.encoder_q.fc.{k}" for k in mlp
    )


@pytest.fixture(scope="module")
def tonylins_file(source, files) -> Path:
    """tonylins/simclr-converter: ``{'state_dict': model.state_dict()}`` in torchvision names,
    fc.bias left at its random init."""
    path = files / "resnet50-1x.pth"
    torch.save(
        {"state_dict": collections.OrderedDict({**source["backbone"], **source["fc"]})}, path
    )
    return path


def test_simclr_tonylins(source, tonylins_file):
    report = assert_same_network(tonylins_file, source, "simclr-tonylins", None)
    assert "no mean/std" in str(report)


class SepariusProjection(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.shortcut = nn.Conv2d(cin, cout, 1, stride, bias=False)
        self.bn = nn.Sequential(nn.BatchNorm2d(cout), nn.Identity())

    def forward(self, x):
        return self.bn(self.shortcut(x))


class SepariusBottleneck(nn.Module):
    """The module tree of Separius/SimCLRv2-Pytorch resnet.py (sk_ratio 0), to get its exact
    state-dict names and its own forward pass."""

    def __init__(self, cin: int, width: int, stride: int, projection: bool):
        super().__init__()

        def bn_relu(c: int, relu: bool = True) -> nn.Module:
            return nn.Sequential(nn.BatchNorm2d(c), nn.ReLU() if relu else nn.Identity())

        self.projection = (
            SepariusProjection(cin, width * 4, stride) if projection else nn.Identity()
        )
        self.net = nn.Sequential(
            nn.Conv2d(cin, width, 1, bias=False),
            bn_relu(width),
            nn.Conv2d(width, width, 3, stride, 1, bias=False),
            bn_relu(width),
            nn.Conv2d(width, width * 4, 1, bias=False),
            bn_relu(width * 4, relu=False),
        )

    def forward(self, x):
        return torch.relu(self.projection(x) + self.net(x))


class SepariusResNet50(nn.Module):
    def __init__(self):
        super().__init__()
        stem = nn.Sequential(
            nn.Conv2d(3, 64, 7, 2, 3, bias=False),
            nn.Sequential(nn.BatchNorm2d(64), nn.ReLU()),
            nn.MaxPool2d(3, 2, 1),
        )
        stages, cin = [stem], 64
        for width, count, stride in ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)):
            stage = nn.Module()
            stage.blocks = nn.ModuleList(
                [
                    SepariusBottleneck(
                        cin if j == 0 else width * 4, width, stride if j == 0 else 1, j == 0
                    )
                    for j in range(count)
                ]
            )
            stages.append(stage)
            cin = width * 4
        self.net = nn.Sequential(*stages)
        self.fc = nn.Linear(2048, 1000)

    def forward(self, x):
        x = self.net[0](x)
        for stage in self.net[1:]:
            for block in stage.blocks:
                x = block(x)
        return x.mean(dim=[2, 3])


def separius_name(key: str) -> str:
    """torchvision name -> Separius name, written from their module tree (not the loader's)."""
    parts = key.split(".")
    if parts[0] in ("conv1", "bn1"):
        return {"conv1": "net.0.0.", "bn1": "net.0.1.0."}[parts[0]] + parts[-1]
    stage, block, layer = int(parts[0][5:]), parts[1], parts[2]
    prefix = f"net.{stage}.blocks.{block}."
    if layer == "downsample":
        return (
            prefix + ("projection.shortcut." if parts[3] == "0" else "projection.bn.0.") + parts[-1]
        )
    index = int(layer[-1])
    return (
        prefix
        + (f"net.{2 * index - 2}." if layer.startswith("conv") else f"net.{2 * index - 1}.0.")
        + parts[-1]
    )


@pytest.fixture(scope="module")
def separius_file(source, files) -> Path:
    """Separius/SimCLRv2-Pytorch ``r50_1x_sk0.pth``: ``{'resnet': ..., 'head': ...}``, filled
    through their module tree; their own forward must match torchvision's."""
    model = SepariusResNet50()
    state = model.state_dict()
    for key, value in source["backbone"].items():
        state[separius_name(key)] = value
    state["fc.weight"], state["fc.bias"] = source["fc"]["fc.weight"], source["fc"]["fc.bias"]
    model.load_state_dict(state)  # strict: every Separius name was filled
    model.eval()
    with torch.no_grad():  # their network, their forward: same function as the torchvision one
        assert torch.allclose(model(source["images"]), source["reference"], atol=1e-5)
    head = nn.Sequential(
        nn.Linear(2048, 2048, bias=False), nn.BatchNorm1d(2048), nn.ReLU(),
        nn.Linear(2048, 2048, bias=False), nn.BatchNorm1d(2048), nn.ReLU(),
        nn.Linear(2048, 128, bias=False), nn.BatchNorm1d(128),
    )  # fmt: skip
    path = files / "r50_1x_sk0.pth"
    torch.save(
        {
            "resnet": model.state_dict(),
            "head": {f"layers.{k}": v for k, v in head.state_dict().items()},
        },
        path,
    )
    return path


def test_simclr_separius(source, separius_file):
    head_keys = 18  # three Linear (no bias) + three BatchNorm1d (5 entries each)
    report = assert_same_network(separius_file, source, "simclr-separius", None)
    assert {
        "resnet.fc.weight",
        "resnet.fc.bias",
        "head.layers.0.weight",
        "head.layers.7.running_var",
    } <= set(report.ignored)
    assert len(report.ignored) == 2 + head_keys


# ------------------------------------------------------------------------------------------
# BYOL: the Haiku parameters pickled with dill (and with plain pickle by reference)
# ------------------------------------------------------------------------------------------

BYOL_FIELDS = ("online_params", "target_params", "online_state", "target_state", "opt_state")


def haiku_module(key: str) -> tuple[str, str]:
    """torchvision name -> (Haiku module path in BYOL's ResNet50, parameter name)."""
    *module, param = key.split(".")
    if module[0] in ("conv1", "bn1"):
        path = "initial_conv" if module[0] == "conv1" else "initial_batchnorm"
    else:
        group, block, layer = int(module[0][5:]) - 1, module[1], module[2]
        if layer == "downsample":
            leaf = "shortcut_conv" if module[3] == "0" else "shortcut_batchnorm"
        else:
            leaf = f"{'conv' if layer.startswith('conv') else 'batchnorm'}_{int(layer[-1]) - 1}"
        path = f"block_group_{group}/~/block_{block}/~/{leaf}"
    return f"res_net50/~/{path}", param


def byol_trees(backbone: dict) -> tuple[dict, dict]:
    params: dict = collections.defaultdict(dict)
    state: dict = {}
    for key, value in backbone.items():
        module, param = haiku_module(key)
        array = value.numpy()
        if param == "weight" and value.dim() == 4:
            params[module]["w"] = np.ascontiguousarray(array.transpose(2, 3, 1, 0))  # OIHW -> HWIO
        elif param in ("weight", "bias"):
            params[module]["scale" if param == "weight" else "offset"] = array.reshape(
                1, 1, 1, -1
            ).copy()
        elif param in ("running_mean", "running_var"):
            ema = "mean_ema" if param == "running_mean" else "var_ema"
            counter = np.array(
                backbone[key.rsplit(".", 1)[0] + ".num_batches_tracked"].item(), dtype=np.int32
            )
            average = array.reshape(1, 1, 1, -1).copy()
            state[f"{module}/~/{ema}"] = {
                "hidden": average.copy(),
                "average": average,
                "counter": counter,
            }
    rng = np.random.default_rng(0)
    hidden, out = 64, 16  # BYOL uses 4096 and 256; the names and nesting are what matter here
    heads = {
        "projector/~/linear": {"w": (2048, hidden), "b": (hidden,)},
        "projector/~/batch_norm": {"scale": (1, hidden), "offset": (1, hidden)},
        "projector/~/linear_1": {"w": (hidden, out)},
        "predictor/~/linear": {"w": (out, hidden), "b": (hidden,)},
        "predictor/~/batch_norm": {"scale": (1, hidden), "offset": (1, hidden)},
        "predictor/~/linear_1": {"w": (hidden, out)},
        "classifier": {"w": (2048, 1000), "b": (1000,)},
    }
    for module, shapes in heads.items():
        params[module] = {k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}
        if "batch_norm" in module:
            for ema in ("mean_ema", "var_ema"):
                average = rng.random((1, hidden)).astype(np.float32)
                state[f"{module}/~/{ema}"] = {
                    "hidden": average,
                    "average": average,
                    "counter": np.array(7, np.int32),
                }
    return dict(params), state


def byol_checkpoint(
    backbone: dict, record: type, lars: type, empty: type, scale: type, frozen=dict
) -> dict:
    """``{'experiment_state': _ByolExperimentState(...), 'step', 'rng'}`` as byol/utils/
    checkpointing.py writes it (arrays taken from device 0, optimizer = chain(weight decay,
    LARS momentum, scale))."""
    params, state = byol_trees(backbone)
    target = {m: dict(v) for m, v in params.items()}
    target["res_net50/~/initial_conv"] = {
        "w": params["res_net50/~/initial_conv"]["w"] + 1.0
    }  # target differs
    zeros: dict = {}
    mu = {
        m: {k: zeros.setdefault(v.shape, np.zeros(v.shape, np.float32)) for k, v in p.items()}
        for m, p in params.items()
    }
    freeze = lambda tree: frozen({m: frozen(v) for m, v in tree.items()})  # noqa: E731
    experiment = record(
        online_params=freeze(params),
        target_params=freeze(target),
        online_state=freeze(state),
        target_state=freeze(state),
        opt_state=(empty(), lars(mu=freeze(mu)), scale()),
    )
    return {
        "experiment_state": experiment,
        "step": 300_000,
        "rng": np.array([0, 42], dtype=np.uint32),
    }


def pickle_globals(data: bytes) -> set[str]:
    found, strings = set(), []
    for op, arg, _ in pickletools.genops(data):
        if op.name in ("SHORT_BINUNICODE", "BINUNICODE", "UNICODE"):
            strings.append(arg)
        elif op.name == "GLOBAL":
            found.add(arg.replace(" ", "."))
        elif op.name == "STACK_GLOBAL":
            found.add(".".join(strings[-2:]))
    return found


def assert_byol(path: Path, source: dict) -> None:
    report = assert_same_network(path, source, "byol", IMAGENET)
    assert {"experiment_state.target_params", "experiment_state.opt_state", "step", "rng"} <= set(
        report.ignored
    )
    assert "classifier/w" in report.ignored and "projector/~/linear/w" in report.ignored
    assert "projector/~/batch_norm/~/mean_ema" in report.ignored


def test_byol_dill_pickle(source, files):
    dill = pytest.importorskip("dill")  # test-only: the loader never imports dill
    record = collections.namedtuple("_ByolExperimentState", BYOL_FIELDS)
    lars = collections.namedtuple("ScaleByLarsState", ["mu"])
    empty = collections.namedtuple("AddWeightDecayState", [])
    scale = collections.namedtuple("ScaleState", [])
    for cls, module in (
        (record, "byol.byol_experiment"),
        (lars, "byol.utils.optimizers"),
        (empty, "byol.utils.optimizers"),
        (scale, "optax._src.transform"),
    ):
        cls.__module__ = module  # not importable here, as for a user without byol/optax
    data = dill.dumps(byol_checkpoint(source["backbone"], record, lars, empty, scale), protocol=2)
    used = pickle_globals(data)
    assert {"dill._dill._create_namedtuple", "dill._dill._create_array", "_codecs.encode"} <= used
    path = files / "pretrain_res50x1.pkl"
    path.write_bytes(data)
    assert_byol(path, source)


def test_byol_pickled_by_reference(source, files, monkeypatch):
    """The same checkpoint pickled with byol, optax and an older Haiku (``frozendict``)
    importable, and numpy 1.x array names: still read, without importing any of them."""
    fake = {
        name: types.ModuleType(name)
        for name in (
            "byol",
            "byol.byol_experiment",
            "byol.utils",
            "byol.utils.optimizers",
            "optax",
            "optax._src",
            "optax._src.transform",
            "haiku",
            "haiku._src",
            "haiku._src.data_structures",
        )
    }
    classes = {
        ("byol.byol_experiment", "_ByolExperimentState"): BYOL_FIELDS,
        ("byol.utils.optimizers", "ScaleByLarsState"): ("mu",),
        ("byol.utils.optimizers", "AddWeightDecayState"): (),
        ("optax._src.transform", "ScaleState"): (),
    }
    made = {}
    for (module, name), fields in classes.items():
        cls = collections.namedtuple(name, fields)
        cls.__module__ = module
        setattr(fake[module], name, cls)
        made[name] = cls

    class frozendict(dict):  # noqa: N801 - Haiku's name
        def __reduce__(self):
            return frozendict, (dict(self),)

    frozendict.__module__ = "haiku._src.data_structures"
    frozendict.__qualname__ = "frozendict"
    fake["haiku._src.data_structures"].frozendict = frozendict
    for name, module in fake.items():
        monkeypatch.setitem(sys.modules, name, module)
    checkpoint = byol_checkpoint(
        source["backbone"],
        made["_ByolExperimentState"],
        made["ScaleByLarsState"],
        made["AddWeightDecayState"],
        made["ScaleState"],
        frozen=frozendict,
    )
    data = pickle.dumps(checkpoint, protocol=2).replace(
        b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n"
    )
    monkeypatch.undo()
    assert "byol" not in sys.modules and "haiku._src.data_structures" not in sys.modules
    assert {
        "byol.byol_experiment._ByolExperimentState",
        "haiku._src.data_structures.frozendict",
        "numpy.core.multiarray._reconstruct",
    } <= pickle_globals(data)
    path = files / "pretrain_res50x1_byref.pkl"
    path.write_bytes(data)
    assert_byol(path, source)
    assert "byol" not in sys.modules and "haiku._src.data_structures" not in sys.modules


def test_byol_hwio_kernel_convention(source):
    """Independent check of the kernel layout: Haiku's NHWC convolution with an HWIO kernel,
    written out in numpy, equals torch's conv2d with the loaded OIHW weight."""
    params, _ = byol_trees({"conv1.weight": source["backbone"]["conv1.weight"]})
    hwio = params["res_net50/~/initial_conv"]["w"]
    nhwc = np.random.default_rng(1).standard_normal((1, 9, 9, 3)).astype(np.float32)
    windows = np.lib.stride_tricks.sliding_window_view(
        nhwc, (7, 7), axis=(1, 2)
    )  # N, 3, 3, C, kh, kw
    haiku = np.einsum("nyxchw,hwco->nyxo", windows, hwio)
    torch_out = nn.functional.conv2d(
        torch.from_numpy(nhwc).permute(0, 3, 1, 2), source["backbone"]["conv1.weight"]
    )
    assert np.allclose(haiku, torch_out.permute(0, 2, 3, 1).numpy(), atol=1e-4)


# ------------------------------------------------------------------------------------------
# medp2x's own files
# ------------------------------------------------------------------------------------------


def test_medp2x_encoder_file(source, files):
    path = files / "encoder.pt"
    normalization = {"mean": [0.5, 0.4, 0.3], "std": [0.2, 0.25, 0.3]}
    save_encoder(path, source["backbone"], "resnet50", 3, normalization, method="swav")
    assert not list(files.glob(".encoder.pt.*"))  # no temporary file left by the atomic write
    header = torch.load(path, weights_only=True)["medp2x"]
    assert (
        header["arch"] == "resnet50" and header["method"] == "swav" and header["in_channels"] == 3
    )
    assert_same_network(path, source, "medp2x", normalization)


def test_medp2x_training_checkpoint(source, files):
    model = {f"encoder.{k}": v for k, v in source["backbone"].items()}
    model["projector.0.weight"] = torch.randn(16, 2048)
    model.update({f"target_encoder.{k}": v for k, v in list(source["backbone"].items())[:3]})
    checkpoint = {
        "model": model,
        "optimizer": {"state": {}, "param_groups": [{"lr": 0.1, "params": [0, 1]}]},
        "trainer": {"iteration": 40, "epoch_length": 20, "max_epochs": 2},
        "lr_scheduler": {"last_epoch": 40, "lr_lambdas": [None]},
        "meta": {
            "version": "0.1.0",
            "arch": "resnet50",
            "in_channels": 3,
            "normalization": None,
            "method": "simclr",
        },
    }
    path = files / "checkpoint_40.pt"
    torch.save(checkpoint, path)
    report = assert_same_network(path, source, "medp2x", None)
    assert {"optimizer", "trainer", "lr_scheduler", "meta", "model.projector.0.weight"} <= set(
        report.ignored
    )


def test_forced_format(source, files):
    path = files / "forced.pth"
    torch.save(
        {"state_dict": collections.OrderedDict(source["backbone"])}, path
    )  # looks like simclr-converter
    assert read_checkpoint(path)[1].format == "simclr-tonylins"
    assert_same_network(path, source, "torchvision", IMAGENET, format="torchvision")


# ------------------------------------------------------------------------------------------
# Strictness
# ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_state() -> dict:
    torch.manual_seed(3)
    model = torchvision.models.resnet18(weights=None)
    return {k: v for k, v in model.state_dict().items() if not k.startswith("fc.")}


def test_strict_missing_key(small_state, tmp_path):
    state = dict(small_state)
    del state["layer3.1.bn1.running_var"]
    path = tmp_path / "missing.pth"
    torch.save(state, path)
    with pytest.raises(
        ValueError,
        match=r"missing.pth.*1 backbone tensor\(s\) missing: layer3\.1\.bn1\.running_var",
    ):
        read_checkpoint(path)
    encoder, report = load_encoder(path, allow_partial=True)
    assert (
        report.missing == ["layer3.1.bn1.running_var"]
        and len(report.loaded) == len(small_state) - 1
    )
    assert "missing  layer3.1.bn1.running_var" in str(report)
    assert torch.equal(
        encoder.state_dict()["layer3.1.bn1.weight"], small_state["layer3.1.bn1.weight"]
    )


def test_strict_shape_mismatch(small_state, tmp_path):
    state = dict(small_state)
    state["layer1.0.conv2.weight"] = torch.randn(64, 64, 5, 5)
    path = tmp_path / "mismatch.pth"
    torch.save(state, path)
    with pytest.raises(
        ValueError,
        match=r"mismatch.pth.*layer1\.0\.conv2\.weight \(file \(64, 64, 5, 5\), resnet18 \(64, 64, 3, 3\)\)",
    ):
        read_checkpoint(path)
    with pytest.raises(ValueError, match="resnet50"):
        read_checkpoint(path, arch="resnet50", allow_partial=False)
    state_out, report = read_checkpoint(path, allow_partial=True)
    assert "layer1.0.conv2.weight" not in state_out and len(report.mismatched) == 1


def test_half_precision_file_loads_as_float32(small_state, tmp_path):
    path = tmp_path / "half.pth"
    torch.save({k: v.half() if v.is_floating_point() else v for k, v in small_state.items()}, path)
    encoder, report = load_encoder(path)
    assert all(p.dtype == torch.float32 for p in encoder.parameters())
    assert torch.equal(encoder.conv1.weight, small_state["conv1.weight"].half().float())
    assert "weights stored as float16: converted to float32" in report.notes


def test_infer_arch():
    for arch in ("resnet18", "resnet34", "resnet50", "resnet101", "wide_resnet50_2"):
        with torch.device("meta"):
            state = getattr(torchvision.models, arch)(weights=None).state_dict()
        assert infer_arch(state) == arch
    with pytest.raises(ValueError, match="not a torchvision ResNet"):
        infer_arch({"conv1.weight": torch.zeros(1)})


@pytest.mark.parametrize(
    ("name", "content", "error"),
    [
        ("model.ckpt-250228.index", b"\x00tf", "TensorFlow checkpoint"),
        ("garbage.pth", b"not a checkpoint at all", "not a PyTorch file or a readable pickle"),
        ("list.pkl", pickle.dumps([1, 2, 3], protocol=2), "expected a dict of weights"),
    ],
)
def test_bad_files(tmp_path, name, content, error):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(ValueError, match=error):
        read_checkpoint(path)
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        read_checkpoint(tmp_path / "nope.pth")


# ------------------------------------------------------------------------------------------
# Malicious files: nothing runs, the error says why
# ------------------------------------------------------------------------------------------


class Payload:
    """A pickle whose ``__reduce__`` would create a marker file."""

    def __init__(self, how: str, marker: Path):
        self.how, self.marker = how, str(marker)

    def __reduce__(self):
        if self.how == "system":
            return os.system, (f"touch {self.marker}",)
        if self.how == "open":
            return builtins.open, (self.marker, "w")
        return builtins.eval, (f"open({self.marker!r}, 'w')",)


def raw_pickle_with(payload, where: str) -> bytes:
    if where == "top":
        obj = payload
    elif where == "state_dict":
        obj = {"state_dict": {"conv1.weight": payload}}
    else:  # deep inside a BYOL-like structure
        obj = {
            "experiment_state": {
                "online_params": {"res_net50/~/initial_conv": {"w": [np.zeros(2), payload]}}
            },
            "step": 1,
        }
    return pickle.dumps(obj, protocol=2)


@pytest.mark.parametrize("how", ["system", "open", "eval"])
@pytest.mark.parametrize("container", ["zip", "legacy", "pkl-top", "pkl-state_dict", "pkl-nested"])
def test_malicious_files_are_refused(tmp_path, how, container):
    marker = tmp_path / "PWNED"
    payload = Payload(how, marker)
    path = tmp_path / ("evil.pth" if container in ("zip", "legacy") else "evil.pkl")
    if container in ("zip", "legacy"):
        torch.save(
            {"state_dict": {"conv1.weight": payload}},
            path,
            _use_new_zipfile_serialization=container == "zip",
        )
    else:
        path.write_bytes(raw_pickle_with(payload, container.split("-")[1]))
    assert not marker.exists()
    with pytest.raises(
        ValueError, match=r"evil\.(pth|pkl): refused to (load|unpickle) .*(system|open|eval)"
    ) as err:
        read_checkpoint(path)
    assert "Nothing in the file was run" in str(err.value) or "nothing in the file was run" in str(
        err.value
    )
    assert "weights_only=False" not in str(err.value)
    assert not marker.exists()


def crafted(*ops: bytes) -> bytes:
    return b"\x80\x02" + b"".join(ops) + b"."


@pytest.mark.parametrize(
    ("data", "error"),
    [
        # dill helpers that would import or fetch attributes are not on the allow-list
        (
            crafted(b"cdill._dill\n_import_module\n", b"X\x02\x00\x00\x00os\x85R"),
            r"refused to unpickle dill\._dill\._import_module",
        ),
        (
            crafted(
                b"cdill._dill\n_get_attr\n", b"X\x02\x00\x00\x00os", b"X\x06\x00\x00\x00system\x86R"
            ),
            r"refused to unpickle dill\._dill\._get_attr",
        ),
        (
            crafted(b"cdill._dill\n_load_type\n", b"X\x04\x00\x00\x00dict\x85R"),
            r"refused to unpickle dill\._dill\._load_type",
        ),
        # dill's array helper must be given numpy's reconstructor, nothing else
        (
            crafted(b"cdill._dill\n_create_array\n", b"(c_codecs\nencode\n)NNt", b"R"),
            "_create_array with anything but a plain ndarray",
        ),
        # object arrays (whose elements could be anything) are not read
        (crafted(b"cnumpy\ndtype\n", b"X\x02\x00\x00\x00O8\x85R"), "numpy dtype 'O8'"),
        # numpy.ndarray itself is never handed out as a callable
        (crafted(b"cnumpy\nndarray\n", b"K\x01\x85R"), "not a PyTorch file or a readable pickle"),
        # protocol-0 style INST
        (b"(ios\nsystem\nS'echo hi'\np0\n.", r"refused to unpickle os\.system"),
        (
            crafted(b"ctorch._utils\n_rebuild_tensor_v2\n", b")R"),
            r"refused to unpickle torch\._utils\._rebuild_tensor_v2",
        ),
    ],
)
def test_crafted_pickles_are_refused(tmp_path, data, error):
    path = tmp_path / "crafted.pkl"
    path.write_bytes(data)
    with pytest.raises(ValueError, match=error):
        read_checkpoint(path)


def test_cli_reports_refusal_in_one_line(tmp_path, capsys):
    marker = tmp_path / "PWNED"
    path = tmp_path / "evil.pkl"
    path.write_bytes(raw_pickle_with(Payload("system", marker), "state_dict"))
    assert cli_main(["convert", str(path), str(tmp_path / "out.pth")]) == 2
    err = capsys.readouterr().err.strip()
    assert "refused to unpickle posix.system" in err and len(err.splitlines()) == 1
    assert not marker.exists() and not (tmp_path / "out.pth").exists()


# ------------------------------------------------------------------------------------------
# Command line and gray stems
# ------------------------------------------------------------------------------------------


def test_cli_convert_round_trip(source, separius_file, tmp_path, capsys):
    inp = separius_file
    out = tmp_path / "simclr_r50.pth"
    assert cli_main(["convert", str(inp), str(out)]) == 0
    printed = capsys.readouterr().out
    assert (
        "simclr-separius" in printed
        and f"loaded   {len(source['backbone'])} tensors" in printed
        and f"wrote {out}" in printed
    )
    state = torch.load(out, weights_only=True)
    assert list(state) == list(source["backbone"])
    assert all(torch.equal(state[k], v) for k, v in source["backbone"].items())
    sidecar = json.loads(Path(f"{out}.json").read_text())
    assert sidecar["source_format"] == "simclr-separius" and sidecar["normalization"] is None
    report = assert_same_network(
        out, source, "torchvision", None
    )  # the sidecar keeps SimCLR's "no mean/std"
    assert any("converted by medp2x from simclr-separius" in note for note in report.notes)

    gray_out = tmp_path / "simclr_r50_gray.pth"
    assert (
        cli_main(["convert", str(inp), str(gray_out), "--in-channels", "1", "--gray", "sum"]) == 0
    )
    gray = torch.load(gray_out, weights_only=True)
    assert gray["conv1.weight"].shape == (64, 1, 7, 7)
    assert torch.allclose(
        gray["conv1.weight"], source["backbone"]["conv1.weight"].sum(1, keepdim=True)
    )


def test_gray_sum_without_normalization_is_exact(source, tonylins_file):
    encoder, report = load_encoder(tonylins_file, in_channels=1, gray="sum")
    assert report.in_channels == 1 and report.normalization is None
    gray = source["images"][:, :1]
    encoder.eval()
    with torch.no_grad():
        expected = source["model"](gray.expand(-1, 3, -1, -1))
        assert torch.allclose(encoder(gray), expected, atol=1e-4, rtol=1e-4)


def test_gray_sum_folds_mean_and_std(source, torchvision_file):
    gray_state, report = read_checkpoint(torchvision_file, in_channels=1, gray="sum")
    assert report.in_channels == 1
    mean, std = (
        torch.tensor(IMAGENET["mean"]).view(1, 3, 1, 1),
        torch.tensor(IMAGENET["std"]).view(1, 3, 1, 1),
    )
    assert report.normalization["mean"] == pytest.approx([mean.mean().item()])
    assert report.normalization["std"] == pytest.approx([std.mean().item()])
    rgb = source["backbone"]

    def stem(state, x):
        bn = nn.BatchNorm2d(64).eval()
        bn.load_state_dict({k[4:]: v for k, v in state.items() if k.startswith("bn1.")})
        return bn(nn.functional.conv2d(x, state["conv1.weight"], stride=2, padding=3))

    gray = source["images"][:, :1]
    with torch.no_grad():
        repeated = stem(rgb, (gray.expand(-1, 3, -1, -1) - mean) / std)
        folded = stem(
            gray_state, (gray - report.normalization["mean"][0]) / report.normalization["std"][0]
        )
        naive = stem(
            {**rgb, "conv1.weight": rgb["conv1.weight"].sum(1, keepdim=True)},
            (gray - mean.mean()) / std.mean(),
        )
    interior = (
        slice(None),
        slice(None),
        slice(2, -2),
        slice(2, -2),
    )  # away from conv1's zero padding
    assert torch.allclose(folded[interior], repeated[interior], atol=1e-4)
    assert (
        naive[interior] - repeated[interior]
    ).abs().max() > 1e-2  # the fold is what makes it exact


def test_gray_repeat_keeps_rgb_stem(source, torchvision_file):
    path = torchvision_file
    state, report = read_checkpoint(path, in_channels=1, gray="repeat")
    assert report.in_channels == 3 and report.normalization == IMAGENET
    assert torch.equal(state["conv1.weight"], source["backbone"]["conv1.weight"])
    assert any("repeat" in note for note in report.notes)
    with pytest.raises(ValueError, match="gray must be one of"):
        read_checkpoint(path, in_channels=1, gray="mean")


def test_gray_encoder_file_stays_gray(source, tmp_path):
    state = dict(source["backbone"])
    state["conv1.weight"] = state["conv1.weight"].sum(1, keepdim=True)
    path = tmp_path / "gray_encoder.pt"
    save_encoder(path, state, "resnet50", 1, {"mean": [0.5], "std": [0.25]})
    encoder, report = load_encoder(path, in_channels=1)
    assert (
        report.in_channels == 1
        and encoder.conv1.in_channels == 1
        and report.normalization == {"mean": [0.5], "std": [0.25]}
    )
    with pytest.raises(ValueError, match="stem takes 1 channel"):
        read_checkpoint(path, in_channels=3)
