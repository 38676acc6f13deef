"""End-to-end test of a P2X bundle in a real MONAI Label server (``make test-label``).

1. export the shared first-stage encoder as a 2-class bundle (``medp2x export-bundle``);
2. write balanced PneumoniaMNIST test images (normal / pneumonia) as PNG studies;
3. start ``monailabel start_server`` from ``.venv-label`` on 127.0.0.1 with the repository's
   app (``monailabel_app/``, copied into the work folder so that the server's logs stay out of
   the repository), in its own process group;
4. ``GET /info/``, ``POST /infer`` (the prediction before training), bad requests (unknown image
   id, label for a missing image, a label naming no class, training with no labels: each must
   get an HTTP error and leave the server serving), upload every image's label,
   ``POST /train`` (2 epochs), poll ``GET /train/``, check that the new ``model.pt`` is served
   and infer again (the prediction after training);
5. stop the server's process group (SIGTERM, then SIGKILL after a bounded wait) in every case,
   and check that no process of it is left.

Each step's wall time is logged. Exit status 0 when every check passed.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
CLASSES = ("normal", "pneumonia")  # PneumoniaMNIST's labels 0 and 1
MODEL = "pneumonia_classification"


def log(message: str) -> None:
    print(f"[test-label {time.strftime('%H:%M:%S')}] {message}", flush=True)


@contextmanager
def step(name: str):
    start = time.monotonic()
    log(f"{name} ...")
    yield
    log(f"{name}: done in {time.monotonic() - start:.1f} s")


class Check(AssertionError):
    pass


def check(condition: bool, message: str) -> None:
    if not condition:
        raise Check(message)


# ------------------------------------------------------------------------------------ HTTP


def request(
    method: str,
    url: str,
    body: bytes | None = None,
    headers: dict | None = None,
    timeout: float = 300,
):
    """(status, parsed JSON or text) of one request; HTTP errors are returned, not raised."""
    req = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as response:
            status, raw = response.status, response.read()
    except urllib.error.HTTPError as err:
        status, raw = err.code, err.read()
    try:
        return status, json.loads(raw)
    except ValueError:
        return status, raw.decode("utf-8", "replace")


def multipart(field: str, filename: str, content: bytes) -> tuple[bytes, dict]:
    boundary = uuid.uuid4().hex
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="{field}"; filename="{filename}"\r\n'
            "Content-Type: text/plain\r\n\r\n"
        ).encode()
        + content
        + f"\r\n--{boundary}--\r\n".encode()
    )
    return body, {"Content-Type": f"multipart/form-data; boundary={boundary}"}


class Server:
    """A MONAI Label server in its own process group, stopped by that group's id (its PID)."""

    def __init__(self, monailabel: Path, app: Path, studies: Path, bundles: Path, log_file: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_file = log_file
        command = [
            str(monailabel), "start_server", "--app", str(app), "--studies", str(studies),
            "--conf", "bundles", str(bundles), "--conf", "models", MODEL,
            "--conf", "sam2", "false", "--conf", "preload", "false",
            "--host", "127.0.0.1", "--port", str(self.port),
        ]  # fmt: skip
        self.output = open(log_file, "w")
        # The monailabel launcher runs the ``python`` found on PATH: its environment's first.
        env = {
            **os.environ,
            "PATH": f"{monailabel.parent}{os.pathsep}{os.environ.get('PATH', '')}",
            "MONAI_LABEL_SESSION_PATH": str(studies.parent / "sessions"),
        }
        env.pop("PYTHONPATH", None)
        self.process = subprocess.Popen(
            command,
            stdout=self.output,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env=env,
            cwd=studies.parent,  # the launcher puts its working folder on PYTHONPATH
        )
        log(f"server PID {self.process.pid} on {self.url} (log: {log_file})")

    def wait_until_up(self, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise Check(f"server exited with {self.process.returncode}; see {self.log_file}")
            try:
                status, info = request("GET", f"{self.url}/info/", timeout=5)
                if status == 200:
                    return info
            except OSError:
                pass
            time.sleep(1)
        raise Check(f"server not answering after {timeout:.0f} s; see {self.log_file}")

    def serving(self) -> bool:
        try:
            return request("GET", f"{self.url}/info/", timeout=30)[0] == 200
        except OSError:
            return False

    def stop(self, timeout: float = 30) -> None:
        """SIGTERM to the server's process group (training workers included), SIGKILL after
        ``timeout`` seconds; then check that no process of the group is left."""
        pgid = self.process.pid
        for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 10)):
            try:
                os.killpg(pgid, sig)
            except ProcessLookupError:
                break
            deadline = time.monotonic() + wait
            while time.monotonic() < deadline and group_alive(pgid):
                self.process.poll()
                time.sleep(0.5)
            if not group_alive(pgid):
                break
        self.process.poll()
        self.output.close()
        left = group_alive(pgid)
        log(
            f"server process group {pgid} stopped"
            + (" (PROCESSES LEFT)" if left else ", none left")
        )
        if left:
            raise Check(f"processes of group {pgid} still running after SIGKILL")


def group_alive(pgid: int) -> bool:
    """Whether a process of group ``pgid`` other than a zombie is still there."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ----------------------------------------------------------------------------------- data


def write_studies(npz: Path, folder: Path, per_class: int) -> dict[str, str]:
    """``per_class`` test images of each class as PNG files; ``{image id: class name}``."""
    data = np.load(npz)
    images, labels = data["test_images"], data["test_labels"].ravel()
    folder.mkdir(parents=True)
    truth = {}
    for label, name in enumerate(CLASSES):
        for index in np.flatnonzero(labels == label)[:per_class]:
            image_id = f"pneumoniamnist_test_{index:04d}"
            Image.fromarray(images[index]).save(folder / f"{image_id}.png")
            truth[image_id] = name
    return truth


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def prediction(result: dict) -> str:
    scores = sorted(result["prediction"], key=lambda p: -p["score"])
    return ", ".join(f"{p['label']} {p['score']:.3f}" for p in scores)


# ------------------------------------------------------------------------------------ test


def run(args: argparse.Namespace, work: Path) -> None:
    bundles, studies, app = work / "bundles", work / "studies", work / "app"
    bundle = bundles / MODEL
    with step("export the bundle"):
        subprocess.run(
            [sys.executable, "-m", "medp2x", "export-bundle", "--encoder", str(args.encoder),
             "--classes", ",".join(CLASSES), "--out", str(bundle), "--image-size", "64"],
            check=True,
        )  # fmt: skip
    with step("write the studies"):
        truth = write_studies(args.data, studies, args.per_class)
        log(f"{len(truth)} PNG images of PneumoniaMNIST's test split in {studies}")
        for sample in args.volumes:  # unlabelled: they exercise the DICOM / NIfTI input path
            shutil.copy(sample, studies / sample.name)
        log(f"and, unlabelled, {', '.join(v.name for v in args.volumes)}")
    app.mkdir()
    shutil.copy(REPO / "monailabel_app" / "main.py", app / "main.py")

    server = Server(args.monailabel, app, studies, bundles, work / "server.log")
    try:
        with step("start the server"):
            server.wait_until_up(args.start_timeout)
        exercise(server, bundle, truth, args)
    finally:
        with step("stop the server"):
            server.stop()


def exercise(server: Server, bundle: Path, truth: dict[str, str], args) -> None:
    url = server.url
    ids = sorted(truth)
    probe = [ids[0], ids[-1]]  # one image of each class
    with step("GET /info/"):
        status, info = request("GET", f"{url}/info/")
        check(status == 200 and MODEL in info["models"], f"/info/: {status} {info}")
        check(MODEL in info["trainers"], f"/info/ trainers: {info['trainers']}")
        labels = info["models"][MODEL]["labels"]
        log(f"model {MODEL}: type {info['models'][MODEL]['type']}, labels {labels}")
        check(set(labels) == set(CLASSES), f"labels {labels}")

    before = {}
    with step("POST /infer before training"):
        for image_id in probe:
            status, result = request("POST", f"{url}/infer/{MODEL}?image={image_id}&output=json")
            check(status == 200, f"infer {image_id}: {status} {result}")
            before[image_id] = result
            log(f"before training: {image_id} (truth {truth[image_id]}): {prediction(result)}")

    with step("bad requests"):
        status, result = request("POST", f"{url}/infer/{MODEL}?image=no_such_image&output=json")
        log(f"infer unknown image id -> {status} {result}")
        check(400 <= status < 600, "infer on an unknown image id was accepted")
        body, headers = multipart("label", "label.txt", b"normal")
        status, result = request(
            "PUT", f"{url}/datastore/label?image=no_such_image&tag=final", body, headers
        )
        log(f"label for a missing image -> {status} {result}")
        check(status == 404, "a label for a missing image was accepted")
        body, headers = multipart("label", "label.txt", b"fracture")
        status, result = request(
            "PUT", f"{url}/datastore/label?image={ids[0]}&tag=final", body, headers
        )
        log(f"label naming no class -> {status} {result}")
        check(status == 422, "a label naming no class was accepted")
        train_body = json.dumps({"max_epochs": 2, "val_split": 0.2}).encode()
        json_headers = {"Content-Type": "application/json"}
        status, result = request("POST", f"{url}/train/{MODEL}", train_body, json_headers)
        log(f"train with no labels -> {status} {result}")
        check(status == 400, "training with no labels was accepted")
        status, result = request("POST", f"{url}/train/no_such_model", train_body, json_headers)
        log(f"train an unknown model -> {status} {result}")
        check(status == 404, "training an unknown model was accepted")
        check(server.serving(), "the server stopped serving after the bad requests")
        log("server still serving")

    with step(f"upload {len(ids)} labels"):
        for image_id in ids:
            body, headers = multipart("label", f"{image_id}.txt", truth[image_id].encode())
            status, result = request(
                "PUT", f"{url}/datastore/label?image={image_id}&tag=final", body, headers
            )
            check(status == 200, f"label {image_id}: {status} {result}")
        status, listing = request("GET", f"{url}/datastore/?output=stats")
        log(f"datastore: {listing}")
        check(listing.get("completed") == len(ids), f"datastore stats: {listing}")

    model_file = bundle / "models" / "model.pt"
    old_hash = sha256(model_file)
    with step("POST /train (2 epochs), poll GET /train/"):
        status, result = request("POST", f"{url}/train/{MODEL}", train_body, json_headers)
        check(status == 200, f"train: {status} {result}")
        deadline = time.monotonic() + args.train_timeout
        while True:
            time.sleep(3)
            status, task = request("GET", f"{url}/train/")
            state = task.get("status") if isinstance(task, dict) else None
            if state not in ("RUNNING", "QUEUED", None):
                break
            check(
                time.monotonic() < deadline, f"training still {state} after {args.train_timeout} s"
            )
        log(
            f"training task: status {state}, started {task.get('start_ts')}, ended {task.get('end_ts')}"
        )
        check(state == "DONE", f"training ended {state}: {json.dumps(task)[-2000:]}")
        check(sha256(model_file) != old_hash, "training did not replace models/model.pt")

    with step("POST /infer after training"):
        status, info = request("GET", f"{url}/info/")
        check(status == 200, "the server stopped serving after training")
        changed = False
        for image_id in probe:
            status, result = request("POST", f"{url}/infer/{MODEL}?image={image_id}&output=json")
            check(status == 200, f"infer {image_id}: {status} {result}")
            log(f"after training: {image_id} (truth {truth[image_id]}): {prediction(result)}")
            changed |= prediction(result) != prediction(before[image_id])
        check(changed, "the served predictions did not change after training: old model served?")
        for sample in args.volumes:  # not chest X-rays: only the input path is under test
            image_id = sample.name.removesuffix(".gz").rsplit(".", 1)[0]
            status, result = request("POST", f"{url}/infer/{MODEL}?image={image_id}&output=json")
            check(status == 200, f"infer {image_id}: {status} {result}")
            log(f"{sample.name} (middle slice / frame): {prediction(result)}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    shared = REPO.parent / "shared"
    parser.add_argument(
        "--monailabel", type=Path, default=REPO / ".venv-label" / "bin" / "monailabel"
    )
    parser.add_argument(
        "--encoder", type=Path, default=shared / "models" / "stage1_resnet18_simclr64.pth"
    )
    parser.add_argument(
        "--data", type=Path, default=shared / "data" / "medmnist" / "pneumoniamnist_official.npz"
    )
    parser.add_argument("--per-class", type=int, default=8, help="images per class (default 8)")
    samples = shared / "data"
    parser.add_argument(
        "--volumes",
        type=Path,
        nargs="*",
        default=[
            samples / "dicom_samples" / "MR" / "DICOMSamples_MR_heart_16f.dcm",
            samples / "nifti_brain" / "dipy" / "S0_10slices.nii.gz",
        ],
        help="DICOM / NIfTI files served unlabelled, to infer on after training",
    )
    parser.add_argument("--start-timeout", type=float, default=180)
    parser.add_argument("--train-timeout", type=float, default=600)
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    args = parser.parse_args()
    # A SIGTERM (make or CI stopping us) unwinds like Ctrl-C, through the server's stop().
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    for path, what in (
        (args.monailabel, "MONAI Label (make label-env)"),
        (args.encoder, "encoder"),
        (args.data, "PneumoniaMNIST"),
        *((volume, "sample file") for volume in args.volumes),
    ):
        if not path.exists():
            print(f"test-label: {path}: missing {what}", file=sys.stderr)
            return 2
    work = Path(tempfile.mkdtemp(prefix="medp2x-test-label-"))
    start = time.monotonic()
    try:
        run(args, work)
    except (Check, subprocess.CalledProcessError) as err:
        log(f"FAILED: {err}")
        log(f"server log: {work / 'server.log'} (kept)")
        return 1
    log(f"all checks passed in {time.monotonic() - start:.1f} s")
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
