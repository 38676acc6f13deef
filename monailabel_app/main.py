"""MONAI Label app: serves and fine-tunes the classification bundles ``medp2x export-bundle`` writes.

Run it in MONAI Label's own environment (``make label-env`` builds ``.venv-label``)::

    monailabel start_server --app monailabel_app --studies /path/to/images \\
        --conf bundles /path/to/bundles --conf models chest_classification \\
        --conf sam2 false --conf preload false --host 127.0.0.1 --port 8000

- ``bundles``: the folder holding the exported bundles (default ``monailabel_app/model``);
- ``models``: comma-separated bundle folder names to serve (default: every bundle there).

Each bundle gives one infer task (``POST /infer/<name>?image=<id>``: the classes and their
probabilities) and one train task (``POST /train/<name>``: fine-tunes on the images that have a
``final`` label and replaces the bundle's ``models/model.pt``, which the infer task reloads).

A class label is a small file uploaded with ``PUT /datastore/label?image=<id>&tag=final``: a
``.txt`` file holding the class name (or ``.json``: ``{"label": "<class>"}``). The app refuses,
with an HTTP error and the server still serving: a label for an image that is not in the
datastore (404), a label file that names no class of the served bundles (422), inference on an
unknown image id (404), training an unknown model (404) or with no usable labelled images (400).

The images folder may hold PNG, JPEG, TIFF, BMP, DICOM (``.dcm``) and NIfTI files; what a bundle
does with volumes and multi-frame files is in its ``docs/README.md``.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
from pathlib import Path
from types import ModuleType
from typing import Any

from fastapi import HTTPException
from monailabel.config import settings
from monailabel.datastore.local import LocalDatastore
from monailabel.interfaces.app import MONAILabelApp
from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.tasks.infer_v2 import InferTask
from monailabel.interfaces.tasks.strategy import Strategy
from monailabel.interfaces.tasks.train import TrainTask
from monailabel.tasks.activelearning.first import First
from monailabel.tasks.activelearning.random import Random
from monailabel.tasks.infer.bundle import BundleInferTask
from monailabel.tasks.train.bundle import BundleTrainTask

logger = logging.getLogger(__name__)

IMAGE_PATTERNS = [
    "*.png", "*.jpg", "*.jpeg", "*.tif", "*.tiff", "*.bmp", "*.dcm", "*.nii", "*.nii.gz",
]  # fmt: skip
LABEL_PATTERNS = ["*.txt", "*.json"]
SCRIPT = Path("scripts") / "p2x_classification.py"


class P2XClassificationApp(MONAILabelApp):
    """One infer and one train task per exported P2X classification bundle."""

    def __init__(self, app_dir: str, studies: str, conf: dict[str, str]):
        self.bundles = find_bundles(
            Path(conf.get("bundles") or Path(app_dir) / "model"), conf.get("models")
        )
        self.policies = {name: bundle_policy(path) for name, path in self.bundles.items()}
        super().__init__(
            app_dir=app_dir,
            studies=studies,
            conf=conf,
            name="medp2x P2X classification",
            description="Classification bundles exported from medp2x P2X encoders",
            version="1.0",
        )

    def init_datastore(self) -> Datastore:
        return ClassLabelDatastore(
            self.studies,
            classes={c for policy in self.policies.values() for c in policy.classes},
            policies=list(self.policies.values()),
            extensions=IMAGE_PATTERNS,
            auto_reload=settings.MONAI_LABEL_DATASTORE_AUTO_RELOAD,
            read_only=settings.MONAI_LABEL_DATASTORE_READ_ONLY,
        )

    def init_infers(self) -> dict[str, InferTask]:
        # add_post_restore=False: MONAI Label's Restored transform maps segmentations back onto
        # the image grid, and fails on a vector of class probabilities.
        return {
            name: BundleInferTask(
                str(path), self.conf, type="classification", add_post_restore=False
            )
            for name, path in self.bundles.items()
        }

    def init_trainers(self) -> dict[str, TrainTask]:
        return {name: BundleTrainTask(str(path), self.conf) for name, path in self.bundles.items()}

    def init_strategies(self) -> dict[str, Strategy]:
        return {"random": Random(), "first": First()}

    def on_init_complete(self):
        super().on_init_complete()
        install_train_check(self)

    def train_problem(self, model: str) -> tuple[int, str] | None:
        """Why ``model`` cannot be trained now (HTTP status, reason), or None."""
        if model not in self.bundles:
            return 404, f"no model {model!r} here (models: {', '.join(self.bundles)})"
        records = self.datastore().datalist()
        if len(records) < 2:
            return 400, (
                f"{len(records)} labelled image(s): fine-tuning needs at least 2; upload labels "
                "with PUT /datastore/label?image=<id>&tag=final"
            )
        policy = self.policies[model]
        for record in records:
            try:
                policy.index(record["label"])
            except ValueError as err:
                return 400, f"label of {Path(record['image']).name}: {err}"
        return None


# ------------------------------------------------------------------------------ the bundles


def find_bundles(root: Path, models: str | None) -> dict[str, Path]:
    """``{name: folder}`` of the bundles to serve: the names in ``models`` (comma-separated),
    or every folder under ``root`` with ``configs/metadata.json``."""
    if not root.is_dir():
        raise ValueError(f"--conf bundles {root}: no such folder")
    if models and models.strip().lower() != "all":
        names = [m.strip() for m in models.split(",") if m.strip()]
    else:
        names = sorted(
            p.name for p in root.iterdir() if (p / "configs" / "metadata.json").is_file()
        )
    if not names:
        raise ValueError(f"{root}: no bundle folders (export one with medp2x export-bundle)")
    bundles = {}
    for name in names:
        path = root / name
        for needed in (
            "configs/metadata.json",
            "configs/inference.json",
            "configs/train.json",
            "models/model.pt",
            str(SCRIPT),
        ):
            if not (path / needed).is_file():
                raise ValueError(
                    f"--conf models {name}: {path / needed} is missing; not a P2X bundle"
                )
        bundles[name] = path.resolve()
    return bundles


def bundle_policy(path: Path) -> Any:
    """The bundle's own ``ClassLabeld`` (from its ``scripts/``) with its classes: what counts
    as a valid label is what the bundle's training will accept."""
    module = _load_script(path)
    meta = json.loads((path / "configs" / "metadata.json").read_text())
    channel_def = meta["network_data_format"]["outputs"]["pred"]["channel_def"]
    classes = [channel_def[str(i)] for i in range(len(channel_def))]
    return module.ClassLabeld(keys="label", classes=classes)


def _load_script(path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"p2x_bundle_{path.name}", path / SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ------------------------------------------------------------------------------- datastore


class ClassLabelDatastore(LocalDatastore):
    """MONAI Label's local datastore with class-label files: ``labels/final/<id>.txt`` (or
    ``.json``) are found next to image labels, and a label is checked before it is stored."""

    def __init__(self, datastore_path: str, classes: set[str], policies: list, **kwargs):
        self.classes = classes
        self.policies = policies
        super().__init__(datastore_path, **kwargs)

    def _list_files(self, path, patterns):
        in_labels = os.path.commonpath(
            [os.path.abspath(path), self._datastore.label_path(None)]
        ) == os.path.abspath(self._datastore.label_path(None))
        return super()._list_files(path, list(patterns) + (LABEL_PATTERNS if in_labels else []))

    def _to_id(self, file: str) -> tuple[str, str]:
        for suffix in (".txt", ".json"):
            if file.endswith(suffix):
                return file[: -len(suffix)], suffix
        return super()._to_id(file)

    def get_image_uri(self, image_id: str) -> str:
        if image_id not in self._datastore.objects:
            raise HTTPException(status_code=404, detail=f"no image {image_id!r} in the datastore")
        return super().get_image_uri(image_id)

    def save_label(
        self, image_id: str, label_filename: str, label_tag: str, label_info: dict
    ) -> str:
        if image_id not in self._datastore.objects:
            raise HTTPException(status_code=404, detail=f"no image {image_id!r} in the datastore")
        if not label_filename.endswith((".txt", ".json")):
            raise HTTPException(
                status_code=422,
                detail='a class label is a .txt file holding the class name (or .json: {"label": ...})',
            )
        errors = []
        for policy in self.policies:
            try:
                policy.index(label_filename)
                break
            except ValueError as err:
                errors.append(str(err).replace(label_filename, "label"))
        else:
            raise HTTPException(status_code=422, detail="; ".join(errors))
        return super().save_label(image_id, label_filename, label_tag, label_info)


# --------------------------------------------------------------------------- train requests


def install_train_check(app: P2XClassificationApp) -> None:
    """Answer ``POST /train/<model>`` with an HTTP error when the run cannot work.

    MONAI Label starts training in a background process and answers 200 at once, so a run
    with no labels would only fail later, in the log. This route, put in front of MONAI
    Label's own (same path, same admin role), checks first and then hands the request on."""
    from fastapi import Depends
    from fastapi.routing import APIRoute
    from monailabel.app import app as web
    from monailabel.endpoints import train as train_endpoint
    from monailabel.endpoints.user.auth import RBAC, User

    async def checked_train(
        model: str,
        params: dict | None = None,
        run_sync: bool = False,
        enqueue: bool = False,
        user: User = Depends(RBAC(settings.MONAI_LABEL_AUTH_ROLE_ADMIN)),
    ):
        problem = app.train_problem(model)
        if problem:
            raise HTTPException(status_code=problem[0], detail=problem[1])
        return train_endpoint.run_model(model, params, run_sync, enqueue)

    path = f"{settings.MONAI_LABEL_API_STR}/train/{{model}}"
    web.router.routes.insert(0, APIRoute(path, checked_train, methods=["POST"]))
