"""A P2X encoder as a MONAI classification bundle that MONAI Label can serve and fine-tune.

``export_bundle`` writes the model-zoo layout::

    <name>_classification/
        configs/metadata.json   network_data_format: input "image", output "pred" (channel_def
                                = the classes), versions, intended use, input policy
        configs/inference.json  preprocessing, network_def, inferer, postprocessing, evaluator
        configs/train.json      fine-tuning: top-level "network", train#handlers as a list
        configs/multi_gpu_train.json   the torchrun overlay (MONAI Label uses it on 2+ GPUs)
        configs/logging.conf
        models/model.pt         the encoder + a zero linear head (torchvision state dict)
        scripts/p2x_classification.py   input and label policy (numpy, torch, MONAI only)
        docs/README.md

The network is a plain torchvision ResNet whose ``fc`` is the classification head: any tool
that reads torchvision weights reads ``model.pt``. The input normalisation the encoder expects
is done by the preprocessing (``NormalizeIntensityd``), never folded into the weights, so the
configs say what the model sees. A gray (1-channel) stem becomes an exactly equivalent
3-channel one (each filter divided by 3, fed the gray image three times), so one network
definition serves gray and colour bundles. The head starts at zero: before any fine-tuning the
bundle gives every class the same score (1 / classes), so nobody mistakes an untrained head's
output for a prediction.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch

from medp2x import __version__
from medp2x.atomic import atomic_torch_save
from medp2x.checkpoints import read_checkpoint

SCRIPT_MODULE = "p2x_classification"
CHANNELS = ("auto", "gray", "rgb")
NORMALIZATIONS = ("auto", "imagenet", "none")
FINETUNE = {"lr": 3e-4, "weight_decay": 1e-4, "crop_scale": 0.08}  # medp2x evaluate's recipe
META_SCHEMA = (
    "https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/"
    "meta_schema_20240725.json"
)


@dataclass(frozen=True)
class BundleSpec:
    """Everything the configs depend on, resolved from the encoder and the options."""

    name: str
    classes: tuple[str, ...]
    arch: str
    image_size: int
    channels: str  # "gray" or "rgb": what the images are turned into before the stem
    normalization: dict | None  # per-channel mean/std for 3 channels, or None ([0, 1] as is)
    encoder_name: str
    encoder_sha256: str
    method: str | None
    batch_size: int = 8
    epochs: int = 20


def parse_classes(text: str | list[str] | tuple[str, ...]) -> tuple[str, ...]:
    """``"normal,pneumonia"`` (or a list) -> class names: at least two, distinct, non-empty."""
    names = [c.strip() for c in (text.split(",") if isinstance(text, str) else text)]
    if len(names) < 2 or any(not n for n in names):
        raise ValueError(
            f"classes: need two or more non-empty names separated by commas, got {text!r}"
        )
    if len(set(n.lower() for n in names)) != len(names):
        raise ValueError(f"classes: names must differ (case-insensitively), got {names}")
    return tuple(names)


def export_bundle(
    encoder: str | Path,
    classes: str | list[str] | tuple[str, ...],
    out: str | Path,
    image_size: int | None = None,
    channels: str = "auto",
    normalization: str = "auto",
    checkpoint_format: str = "auto",
    batch_size: int = 8,
    epochs: int = 20,
    force: bool = False,
) -> Path:
    """Write the bundle for ``encoder`` (any checkpoint medp2x reads) to ``out``; returns it.

    ``image_size`` and ``channels`` default to the pretraining run's (``run_config.json``
    beside the encoder); ``normalization`` to the one recorded with the weights."""
    out = Path(out)
    check_bundle_name(out)
    names = parse_classes(classes)
    state, report = read_checkpoint(encoder, format=checkpoint_format, in_channels=None)
    run = pretraining_record(Path(encoder))
    spec = BundleSpec(
        name=out.name,
        classes=names,
        arch=report.arch,
        image_size=resolve_image_size(image_size, run, encoder),
        channels=resolve_channels(channels, run, report.in_channels),
        normalization=resolve_normalization(normalization, report.normalization),
        encoder_name=Path(encoder).name,
        encoder_sha256=file_sha256(encoder),
        method=(run.get("meta") or {}).get("method") or run.get("method"),
        batch_size=int(batch_size),
        epochs=int(epochs),
    )
    if spec.batch_size < 2:
        raise ValueError("batch_size: fine-tuning needs at least 2 images per batch (BatchNorm)")
    network = classification_network(state, report.arch, len(names))
    prepare_folder(out, force)
    atomic_torch_save(network.state_dict(), out / "models" / "model.pt")
    write_json(out / "configs" / "metadata.json", metadata(spec))
    write_json(out / "configs" / "inference.json", inference_config(spec))
    write_json(out / "configs" / "train.json", train_config(spec))
    write_json(out / "configs" / "multi_gpu_train.json", MULTI_GPU_TRAIN)
    (out / "configs" / "logging.conf").write_text(LOGGING_CONF)
    scripts = out / "scripts"
    scripts.mkdir(parents=True, exist_ok=True)
    (scripts / "__init__.py").write_text(f"from . import {SCRIPT_MODULE}  # noqa: F401\n")
    source = resources.files("medp2x.label").joinpath("bundle_transforms.py").read_text()
    (scripts / f"{SCRIPT_MODULE}.py").write_text(source)
    (out / "docs").mkdir(exist_ok=True)
    (out / "docs" / "README.md").write_text(readme(spec))
    return out


# ------------------------------------------------------------------------- resolving options


def pretraining_record(encoder: Path) -> dict:
    """The run's ``run_config.json`` beside the encoder (or one folder up), else ``{}``."""
    for folder in (encoder.parent, encoder.parent.parent):
        path = folder / "run_config.json"
        if path.is_file():
            try:
                record = json.loads(path.read_text())
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}: not valid JSON ({err.msg})") from None
            return record if isinstance(record, dict) else {}
    return {}


def resolve_image_size(image_size: int | None, run: dict, encoder) -> int:
    """The pretraining crop size: the encoder's features are tuned to objects at that scale."""
    size = image_size if image_size is not None else run.get("image_size")
    if size is None:
        raise ValueError(
            f"{encoder}: no run_config.json beside the encoder records its crop size; "
            "pass --image-size (the pretraining crop, e.g. 224 or 64)"
        )
    size = int(size)
    if size < 16:
        raise ValueError(f"image_size: {size} px is too small for a ResNet (16 or more)")
    return size


def resolve_channels(channels: str, run: dict, stem_channels: int) -> str:
    if channels not in CHANNELS:
        raise ValueError(f"channels must be one of {', '.join(CHANNELS)}, not {channels!r}")
    if channels != "auto":
        return channels
    if run.get("modality") in ("gray", "rgb"):
        return run["modality"]
    return "gray" if stem_channels == 1 else "rgb"


def resolve_normalization(choice: str, recorded: dict | None) -> dict | None:
    """Per-channel mean/std for the 3-channel input (a gray pair is repeated), or None."""
    if choice not in NORMALIZATIONS:
        raise ValueError(
            f"normalization must be one of {', '.join(NORMALIZATIONS)}, not {choice!r}"
        )
    if choice == "none":
        return None
    if choice == "imagenet":
        from medp2x.networks import IMAGENET_MEAN, IMAGENET_STD

        return {"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)}
    if recorded is None:
        return None
    mean, std = list(recorded["mean"]), list(recorded["std"])
    if len(mean) == 1:
        mean, std = mean * 3, std * 3
    return {"mean": [float(v) for v in mean], "std": [float(v) for v in std]}


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def prepare_folder(out: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out}: exists and is not a folder")
    if out.exists() and any(out.iterdir()):
        if not force:
            raise ValueError(f"{out}: folder not empty; pass --force to replace the bundle")
        if not (out / "configs" / "metadata.json").is_file():
            raise ValueError(f"{out}: not a bundle (no configs/metadata.json); not replacing it")
        shutil.rmtree(out)
    for sub in ("configs", "models"):
        (out / sub).mkdir(parents=True, exist_ok=True)


# ------------------------------------------------------------------------------- the network


def classification_network(
    state: dict[str, torch.Tensor], arch: str, num_classes: int
) -> torch.nn.Module:
    """torchvision ``arch`` with ``num_classes`` outputs: the encoder's weights, a zero head.
    A 1-channel stem becomes the equivalent 3-channel stem (the gray image is fed 3 times)."""
    import torchvision

    net = getattr(torchvision.models, arch)(weights=None, num_classes=num_classes)
    state = dict(state)
    stem = state["conv1.weight"]
    if stem.shape[1] == 1:
        state["conv1.weight"] = (stem / 3.0).expand(-1, 3, -1, -1).contiguous()
    missing, unexpected = net.load_state_dict(state, strict=False)
    if unexpected or set(missing) != {"fc.weight", "fc.bias"}:
        raise ValueError(
            f"encoder does not fit torchvision {arch}: missing {missing}, extra {unexpected}"
        )
    torch.nn.init.zeros_(net.fc.weight)
    torch.nn.init.zeros_(net.fc.bias)
    return net


# ------------------------------------------------------------------------------- the configs

S = f"scripts.{SCRIPT_MODULE}"


def common_config(spec: BundleSpec) -> dict:
    """Definitions both configs share: paths, device, classes, network, the fixed input steps."""
    normalize = (
        {
            "_target_": "NormalizeIntensityd",
            "keys": "image",
            "subtrahend": spec.normalization["mean"],
            "divisor": spec.normalization["std"],
            "channel_wise": True,
        }
        if spec.normalization
        else {"_target_": "Identityd", "keys": "image"}
    )
    return {
        "imports": ["$import torch", "$import monai"],
        "bundle_root": ".",
        "output_dir": "$@bundle_root + '/eval'",
        "device": "$torch.device('cuda:0' if torch.cuda.is_available() else 'cpu')",
        "classes": list(spec.classes),
        "image_size": spec.image_size,
        "channels": spec.channels,
        "network_def": {
            "_target_": f"torchvision.models.{spec.arch}",
            "num_classes": len(spec.classes),
        },
        "network": "$@network_def.to(@device)",
        "load_image": {
            "_target_": "LoadImaged",
            "keys": "image",
            "reader": {"_target_": f"{S}.readers"},
            "dtype": None,
            "image_only": True,
        },
        "to_encoder_input": {
            "_target_": f"{S}.P2XImaged",
            "keys": "image",
            "channels": "@channels",
        },
        "normalize": normalize,
    }


def inference_config(spec: BundleSpec) -> dict:
    config = common_config(spec)
    config.update(
        {
            "input_dir": "$@bundle_root + '/sample_data'",
            "datalist": {"_target_": f"{S}.image_files", "path": "@input_dir"},
            "preprocessing": {
                "_target_": "Compose",
                "transforms": [
                    "@load_image",
                    "@to_encoder_input",
                    {
                        "_target_": "TorchVisiond",
                        "keys": "image",
                        "name": "Resize",
                        "size": "@image_size",
                        "antialias": True,
                    },
                    {
                        "_target_": "TorchVisiond",
                        "keys": "image",
                        "name": "CenterCrop",
                        "size": "@image_size",
                    },
                    "@normalize",
                ],
            },
            "dataset": {"_target_": "Dataset", "data": "@datalist", "transform": "@preprocessing"},
            "dataloader": {
                "_target_": "DataLoader",
                "dataset": "@dataset",
                "batch_size": 1,
                "shuffle": False,
                "num_workers": 0,
            },
            "inferer": {"_target_": "SimpleInferer"},
            "postprocessing": {
                "_target_": "Compose",
                "transforms": [{"_target_": "Activationsd", "keys": "pred", "softmax": True}],
            },
            "handlers": [
                {
                    "_target_": "CheckpointLoader",
                    "load_path": "$@bundle_root + '/models/model.pt'",
                    "load_dict": {"model": "@network"},
                    "map_location": "@device",
                    "strict": True,
                },
                {"_target_": "StatsHandler", "iteration_log": False},
                {
                    "_target_": "ClassificationSaver",
                    "output_dir": "@output_dir",
                    "filename": "predictions.csv",
                    "batch_transform": "$lambda batch: [item['image'].meta for item in batch]",
                    "output_transform": "$lambda output: [item['pred'] for item in output]",
                },
            ],
            "evaluator": {
                "_target_": "SupervisedEvaluator",
                "device": "@device",
                "val_data_loader": "@dataloader",
                "network": "@network",
                "inferer": "@inferer",
                "postprocessing": "@postprocessing",
                "val_handlers": "@handlers",
                "amp": False,
            },
            "initialize": ["$monai.utils.set_determinism(seed=0)"],
            "run": ["$@evaluator.run()"],
        }
    )
    return config


def train_config(spec: BundleSpec) -> dict:
    """Fine-tuning with medp2x's recipe (Adam 3e-4, weight decay 1e-4, random-resized crops
    and flips); the final weights replace ``models/model.pt``, which MONAI Label then serves."""
    config = common_config(spec)
    eval_view = [
        {
            "_target_": "TorchVisiond",
            "keys": "image",
            "name": "Resize",
            "size": "@image_size",
            "antialias": True,
        },
        {"_target_": "TorchVisiond", "keys": "image", "name": "CenterCrop", "size": "@image_size"},
    ]
    label = {"_target_": f"{S}.ClassLabeld", "keys": "label", "classes": "@classes"}
    config.update(
        {
            "dataset_dir": "$@bundle_root + '/train_data'",
            "ckpt_dir": "$@bundle_root + '/models'",
            "batch_size": spec.batch_size,
            "learning_rate": FINETUNE["lr"],
            "weight_decay": FINETUNE["weight_decay"],
            "crop_scale": FINETUNE["crop_scale"],
            "max_epochs": spec.epochs,
            "val_interval": 1,
            "datalist": {
                "_target_": f"{S}.labelled_files",
                "path": "@dataset_dir",
                "classes": "@classes",
            },
            "loss": {"_target_": "torch.nn.CrossEntropyLoss"},
            "optimizer": {
                "_target_": "torch.optim.Adam",
                "params": "$@network.parameters()",
                "lr": "@learning_rate",
                "weight_decay": "@weight_decay",
            },
            "train": {
                "preprocessing": {
                    "_target_": "Compose",
                    "transforms": [
                        "@load_image",
                        "@to_encoder_input",
                        {
                            "_target_": "TorchVisiond",
                            "keys": "image",
                            "name": "RandomResizedCrop",
                            "size": "@image_size",
                            "scale": "$(@crop_scale, 1.0)",
                            "antialias": True,
                        },
                        {"_target_": "RandFlipd", "keys": "image", "prob": 0.5, "spatial_axis": 1},
                        "@normalize",
                        label,
                    ],
                },
                "dataset": {
                    "_target_": "Dataset",
                    "data": "@datalist",
                    "transform": "@train#preprocessing",
                },
                "dataloader": {
                    "_target_": "DataLoader",
                    "dataset": "@train#dataset",
                    "batch_size": "@batch_size",
                    "shuffle": True,
                    "num_workers": 0,
                    # BatchNorm cannot train on a last batch of one image
                    "drop_last": "$len(@train#dataset) > 1 and len(@train#dataset) % @batch_size == 1",
                },
                "inferer": {"_target_": "SimpleInferer"},
                "handlers": [
                    {
                        "_target_": "CheckpointLoader",
                        "load_path": "$@bundle_root + '/models/model.pt'",
                        "load_dict": {"model": "@network"},
                        "map_location": "@device",
                        "strict": True,
                    },
                    {
                        "_target_": "ValidationHandler",
                        "validator": "@validate#evaluator",
                        "epoch_level": True,
                        # no validation images (val_split 0): never validate
                        "interval": "$@val_interval if len(@validate#dataset) > 0 else 10 ** 9",
                    },
                    {
                        "_target_": "StatsHandler",
                        "tag_name": "train_loss",
                        "output_transform": "$monai.handlers.from_engine(['loss'], first=True)",
                    },
                    {
                        "_target_": "CheckpointSaver",
                        "save_dir": "@ckpt_dir",
                        "save_dict": {"model": "@network"},
                        "save_final": True,
                        "final_filename": "model.pt",
                    },
                ],
                "trainer": {
                    "_target_": "SupervisedTrainer",
                    "device": "@device",
                    "max_epochs": "@max_epochs",
                    "train_data_loader": "@train#dataloader",
                    "network": "@network",
                    "optimizer": "@optimizer",
                    "loss_function": "@loss",
                    "inferer": "@train#inferer",
                    "train_handlers": "@train#handlers",
                    "amp": False,
                },
            },
            "validate": {
                "preprocessing": {
                    "_target_": "Compose",
                    "transforms": [
                        "@load_image",
                        "@to_encoder_input",
                        *eval_view,
                        "@normalize",
                        label,
                    ],
                },
                "dataset": {
                    "_target_": "Dataset",
                    "data": [],
                    "transform": "@validate#preprocessing",
                },
                "dataloader": {
                    "_target_": "DataLoader",
                    "dataset": "@validate#dataset",
                    "batch_size": "@batch_size",
                    "shuffle": False,
                    "num_workers": 0,
                },
                "postprocessing": {
                    "_target_": "Compose",
                    "transforms": [
                        {"_target_": "Activationsd", "keys": "pred", "softmax": True},
                        {
                            "_target_": "AsDiscreted",
                            "keys": ["pred", "label"],
                            "argmax": [True, False],
                            "to_onehot": len(spec.classes),
                        },
                    ],
                },
                "handlers": [
                    {
                        "_target_": "StatsHandler",
                        "iteration_log": False,
                    },
                ],
                "key_metric": {
                    "val_accuracy": {
                        "_target_": "ignite.metrics.Accuracy",
                        "output_transform": "$monai.handlers.from_engine(['pred', 'label'])",
                    }
                },
                "evaluator": {
                    "_target_": "SupervisedEvaluator",
                    "device": "@device",
                    "val_data_loader": "@validate#dataloader",
                    "network": "@network",
                    "inferer": "@train#inferer",
                    "postprocessing": "@validate#postprocessing",
                    "key_val_metric": "@validate#key_metric",
                    "val_handlers": "@validate#handlers",
                    "amp": False,
                },
            },
            "initialize": ["$monai.utils.set_determinism(seed=0)"],
            "run": ["$@train#trainer.run()"],
        }
    )
    return config


# Overlay on train.json for torchrun (one process per GPU; MONAI Label uses it on a machine with
# more than one GPU, and without it skips training there). Each process trains on its shard;
# rank 0 alone logs and writes models/model.pt. Falls back to gloo on CPU processes.
MULTI_GPU_TRAIN = {
    "imports": [
        "$import torch",
        "$import monai",
        "$import os",
        "$import torch.distributed as dist",
    ],
    "device": "$torch.device(f\"cuda:{os.environ['LOCAL_RANK']}\") if torch.cuda.is_available() else torch.device('cpu')",
    "network": {
        "_target_": "torch.nn.parallel.DistributedDataParallel",
        "module": "$@network_def.to(@device)",
        "device_ids": "$[@device] if torch.cuda.is_available() else None",
    },
    "train#sampler": {
        "_target_": "DistributedSampler",
        "dataset": "@train#dataset",
        "even_divisible": True,
        "shuffle": True,
    },
    "train#dataloader#sampler": "@train#sampler",
    "train#dataloader#shuffle": False,
    "train#trainer#train_handlers": "$@train#handlers[: -2 if dist.get_rank() > 0 else None]",
    "validate#sampler": {
        "_target_": "DistributedSampler",
        "dataset": "@validate#dataset",
        "even_divisible": False,
        "shuffle": False,
    },
    "validate#dataloader#sampler": "@validate#sampler",
    "validate#evaluator#val_handlers": "$None if dist.get_rank() > 0 else @validate#handlers",
    "initialize": [
        "$dist.is_initialized() or dist.init_process_group(backend='nccl' if torch.cuda.is_available() else 'gloo')",
        "$torch.cuda.set_device(@device) if torch.cuda.is_available() else None",
        "$monai.utils.set_determinism(seed=0)",
    ],
    "run": ["$@train#trainer.run()"],
    "finalize": ["$dist.is_initialized() and dist.destroy_process_group()"],
}


def metadata(spec: BundleSpec) -> dict:
    import monai
    import numpy
    import torchvision

    classes = {str(i): name for i, name in enumerate(spec.classes)}
    channel_names = ["gray", "gray", "gray"] if spec.channels == "gray" else ["R", "G", "B"]
    input_scaling = (
        f"then (x - mean) / std per channel, mean {spec.normalization['mean']}, std {spec.normalization['std']}"
        if spec.normalization
        else "no mean/std (the encoder was pretrained on [0, 1] images)"
    )
    return {
        "schema": META_SCHEMA,
        "version": "0.1.0",
        "changelog": {"0.1.0": f"exported by medp2x {__version__} export-bundle"},
        "monai_version": monai.__version__,
        "pytorch_version": torch.__version__.split("+")[0],
        "numpy_version": numpy.__version__,
        "required_packages_version": {"torchvision": torchvision.__version__.split("+")[0]},
        "supported_apps": {"monai-label": "0.8.5"},
        "name": spec.name,
        "task": f"Image classification ({', '.join(spec.classes)}) from a P2X-pretrained {spec.arch}",
        "description": (
            f"A {spec.arch} encoder pretrained by medp2x (P2X double pretraining"
            + (f", {spec.method}" if spec.method else "")
            + f"; file {spec.encoder_name}, sha256 {spec.encoder_sha256[:16]}) with a linear head "
            f"for {len(spec.classes)} classes. The head starts at zero (every class scores "
            f"1/{len(spec.classes)}) until the bundle is fine-tuned on labelled images."
        ),
        "authors": "exported with medp2x",
        "copyright": "the owner of the encoder's pretraining data and of the annotations",
        "data_source": "your own images; labels from MONAI Label annotations or a labelled folder",
        "data_type": "png, jpeg, tiff, bmp, dicom, nifti",
        "image_classes": (
            f"{spec.channels} image, one 2D plane per file (middle slice of a volume, middle frame "
            f"of a multi-frame DICOM), resized (shorter side) and centre-cropped to "
            f"{spec.image_size}x{spec.image_size}, intensities in [0, 1] "
            f"(scripts/{SCRIPT_MODULE}.py), {input_scaling}"
        ),
        "label_classes": f"one class per image: an index, a name ({', '.join(spec.classes)}) or a label file holding one",
        "pred_classes": f"softmax probabilities of {', '.join(spec.classes)}",
        "intended_use": "research: a starting point for annotation with MONAI Label; not for clinical use",
        "references": [
            "Ciga, Xu, Martel. Self supervised contrastive learning for digital histopathology. "
            "Machine Learning with Applications 7 (2022). (P2X: arXiv 2011.13971)"
        ],
        "network_data_format": {
            "inputs": {
                "image": {
                    "type": "image",
                    "format": "magnitude",
                    "modality": spec.channels,
                    "num_channels": 3,
                    "spatial_shape": [spec.image_size, spec.image_size],
                    "dtype": "float32",
                    "value_range": [0, 1],
                    "is_patch_data": False,
                    "channel_def": {str(i): c for i, c in enumerate(channel_names)},
                }
            },
            "outputs": {
                "pred": {
                    "type": "probabilities",
                    "format": "classes",
                    "num_channels": len(spec.classes),
                    "spatial_shape": [1],
                    "dtype": "float32",
                    "value_range": [0, 1],
                    "is_patch_data": False,
                    "channel_def": classes,
                }
            },
        },
    }


def readme(spec: BundleSpec) -> str:
    classes = ", ".join(spec.classes)
    return f"""# {spec.name}

A {spec.arch} encoder pretrained with medp2x (file `{spec.encoder_name}`, sha256
`{spec.encoder_sha256}`) and a linear head for: {classes}. Exported by medp2x {__version__}.
The head is zero until fine-tuned: an unfine-tuned bundle scores every class 1/{len(spec.classes)}.

## Inputs

One 2D {spec.channels} image per file: PNG, JPEG, TIFF, BMP, DICOM (a multi-frame file gives
its middle frame) or NIfTI (the middle axial slice of the volume in RAS+ orientation, anterior
up). Intensities go to [0, 1] as medp2x's readers map them (integer image files by their type's
maximum; DICOM through its modality LUT and its VOI LUT or window, else the frame's 0.5-99.5
percentile window, MONOCHROME1 inverted; NIfTI between the volume's 1 and 99 percentiles), the
shorter side
is resized to {spec.image_size} px and the centre {spec.image_size} x {spec.image_size} cropped,
then {"normalised with mean " + str(spec.normalization["mean"]) + ", std " + str(spec.normalization["std"]) if spec.normalization else "left in [0, 1] (no mean/std)"}.
The code is in `scripts/{SCRIPT_MODULE}.py`.

## Inference

```bash
python -m monai.bundle run --config_file configs/inference.json --bundle_root . \\
    --input_dir /path/to/images --output_dir predictions
```

writes `predictions/predictions.csv`: one row per file, the probabilities of {classes} in
that order.

## Fine-tuning

```bash
python -m monai.bundle run --config_file configs/train.json --bundle_root . \\
    --dataset_dir /path/to/labelled --max_epochs 20
```

`dataset_dir` is a folder with one sub-folder per class ({classes}), a MONAI Label studies
folder (labels in `labels/final/`, one text file per image holding its class name) or a JSON
list of `{{"image": ..., "label": ...}}` records. Adam (lr {FINETUNE["lr"]}, weight decay
{FINETUNE["weight_decay"]}), random-resized crops (scale {FINETUNE["crop_scale"]} to 1) and flips,
batch {spec.batch_size}; the final weights replace `models/model.pt`. Set `validate#dataset#data`
to a list of records to see validation accuracy each epoch.

## Requirements

MONAI, PyTorch, torchvision; pydicom for DICOM, nibabel for NIfTI, Pillow for image files.
"""


def write_json(path: Path, content: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(content, indent=2) + "\n")


LOGGING_CONF = """[loggers]
keys=root

[handlers]
keys=consoleHandler

[formatters]
keys=fullFormatter

[logger_root]
level=INFO
handlers=consoleHandler

[handler_consoleHandler]
class=StreamHandler
level=INFO
formatter=fullFormatter
args=(sys.stdout,)

[formatter_fullFormatter]
format=%(asctime)s - %(name)s - %(levelname)s - %(message)s
"""


def check_bundle_name(out: Path) -> None:
    """MONAI Label names a model after its folder: letters, digits, ``_`` and ``-`` only."""
    if not re.fullmatch(r"[A-Za-z0-9_\-]+", out.name):
        raise ValueError(f"{out}: the bundle folder name may hold letters, digits, _ and - only")


def describe(out: str | Path) -> str:
    """What was written and how to run it (printed by ``medp2x export-bundle``)."""
    out = Path(out)
    meta = json.loads((out / "configs" / "metadata.json").read_text())
    classes = meta["network_data_format"]["outputs"]["pred"]["channel_def"]
    return "\n".join(
        [
            f"wrote {out}",
            f"  network  {meta['task']}",
            f"  classes  {', '.join(classes[str(i)] for i in range(len(classes)))}",
            f"  input    {meta['image_classes']}",
            "  infer    python -m monai.bundle run --config_file "
            f"{out}/configs/inference.json --bundle_root {out} --input_dir IMAGES --output_dir OUT",
            "  train    python -m monai.bundle run --config_file "
            f"{out}/configs/train.json --bundle_root {out} --dataset_dir LABELLED",
            f"  serve    monailabel start_server --app monailabel_app --studies IMAGES "
            f"--conf bundles {out.parent} --conf models {out.name} --conf sam2 false",
        ]
    )
