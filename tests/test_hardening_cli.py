"""Hardening (#21), classes 6-8: one line where a traceback was due (bad overrides, output
paths, ``@``/``$`` data folders, unknown keys, poisoned checkpoints), the skipped-file line of
every run summary, and ``medp2x surgery`` keeping what it does not transform. Each test fails
on the code before the fix; none trains, so the module takes a few seconds."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torchvision

from medp2x.bundle import check_command_line
from medp2x.checkpoints import read_checkpoint
from medp2x.cli import main
from medp2x.engine import PretrainConfig
from medp2x.pipeline import P2XJob
from medp2x.settings import SettingError


# ------------------------------------------------------------------ class 8: surgery keeps fc
def torchvision_checkpoint(path) -> dict[str, torch.Tensor]:
    """A torchvision ResNet-18's full state dict, ``fc`` included (1000 ImageNet classes)."""
    torch.manual_seed(0)
    state = torchvision.models.resnet18(num_classes=1000).state_dict()
    torch.save(state, path)
    return state


def test_surgery_keeps_the_tensors_it_does_not_transform(tmp_path, capsys):
    source = torchvision_checkpoint(tmp_path / "in.pth")
    argv = ["surgery", str(tmp_path / "in.pth"), str(tmp_path / "out.pth"), "--filters", "none"]
    assert main(argv) == 0
    written = torch.load(tmp_path / "out.pth", weights_only=True)
    assert written.keys() == source.keys()  # fc.weight and fc.bias too
    assert torch.equal(written["fc.weight"], source["fc.weight"])
    assert torch.equal(written["fc.bias"], source["fc.bias"])
    assert "kept 2 tensor(s) surgery does not touch" in capsys.readouterr().out
    backbone, report = read_checkpoint(tmp_path / "out.pth")  # read back as before: fc ignored
    assert report.format == "torchvision" and "fc.weight" not in backbone


def test_surgery_backbone_only_drops_the_head(tmp_path):
    source = torchvision_checkpoint(tmp_path / "in.pth")
    argv = ["surgery", str(tmp_path / "in.pth"), str(tmp_path / "out.pth"), "--backbone-only",
            "--filters", "none"]  # fmt: skip
    assert main(argv) == 0
    written = torch.load(tmp_path / "out.pth", weights_only=True)
    assert written.keys() == {k for k in source if not k.startswith("fc.")}


# ------------------------------------------------- class 6: settings of the wrong type or range
BAD_SETTINGS = [
    ("batch_size", "eight", "positive integer"),
    ("image_size", -8, "positive integer"),
    ("image_size", 3.5, "positive integer"),
    ("image_size", 0, "positive integer"),
    ("epochs", -1, "positive integer"),
    ("epochs", 0, "positive integer"),
    ("lr", float("nan"), "finite number > 0"),
    ("lr", "nan", "finite number > 0"),
    ("amp", "maybe", "true, false or auto"),
    ("normalization", "bogus", "auto, imagenet, none"),
    ("checkpoint_every", -5, "integer >= 0"),
]


@pytest.mark.parametrize(("name", "value", "allowed"), BAD_SETTINGS)
def test_pretrain_config_names_the_setting_the_value_and_what_is_allowed(
    tmp_path, name, value, allowed
):
    with pytest.raises(SettingError) as err:
        PretrainConfig(dataset=[], output_dir=tmp_path, **{name: value})
    message = str(err.value)
    assert message.startswith(f"{name} = {value!r} is not allowed") and allowed in message
    assert "\n" not in message


def test_pretrain_config_accepts_the_documented_values(tmp_path):
    PretrainConfig(dataset=[], output_dir=tmp_path, batch_size=8, image_size=32, lr=0.1,
                   amp="true", normalization={"mean": [0.5], "std": [0.25]}, epochs=1)  # fmt: skip
    PretrainConfig(dataset=[], output_dir=tmp_path, amp=False, normalization=None)


def job(tmp_path, **settings) -> P2XJob:
    def no_data(data_dir, size):  # never reached: settings are checked first
        raise AssertionError("the job read data before checking its settings")

    return P2XJob(name="t", make_dataset=no_data, output_dir=str(tmp_path / "run"), **settings)


@pytest.mark.parametrize(("name", "value", "allowed"), BAD_SETTINGS)
def test_job_refuses_a_bad_setting_in_one_line_before_reading_data(
    tmp_path, capsys, name, value, allowed
):
    with pytest.raises(SystemExit) as exit_:
        job(tmp_path, data_dir=str(tmp_path), **{name: value}).run()
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err == f"t: error: {name} = {value!r} is not allowed: " + err.split("allowed: ")[1]
    assert allowed in err and "Traceback" not in err


def test_job_refuses_an_output_folder_that_is_a_file_or_under_one(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    for output_dir, why in [
        (tmp_path / "file", "is a file, not a folder"),
        (tmp_path / "file" / "run", "cannot be created: Not a directory"),
    ]:
        bad = P2XJob(name="t", make_dataset=None, output_dir=str(output_dir))
        with pytest.raises(SystemExit) as exit_:
            bad.run()
        assert exit_.value.code == 2
        assert capsys.readouterr().err.strip() == f"t: error: output_dir '{output_dir}' {why}"


# ------------------------------------------------ class 6: the bundle's command line, checked
BUNDLE = ["/venv/lib/monai/bundle/__main__.py", "run", "--config_file", "bundles/p2x_histo.json"]


def bundle_error(capsys, *overrides: str) -> str:
    with pytest.raises(SystemExit) as exit_:
        check_command_line([*BUNDLE, *overrides])
    assert exit_.value.code == 2
    return capsys.readouterr().err.strip()


@pytest.fixture
def in_repo(monkeypatch):
    monkeypatch.chdir(Path(__file__).resolve().parents[1])


def test_unknown_override_is_refused_with_the_closest_setting(capsys, in_repo):
    err = bundle_error(capsys, "--batchsize", "8", "--output_dir", "runs/x")
    assert err.startswith("error: --batchsize: no such setting in this bundle")
    assert "did you mean batch_size?" in err and "\n" not in err
    assert "did you mean on_error?" in bundle_error(capsys, "--on_eror=raise")


def test_known_overrides_nested_ids_and_references_pass(in_repo):
    check_command_line([*BUNDLE, "--batch_size", "8", "--method_options#temperature", "0.2",
                        "--data_dir", "./@scans", "--eval_dir", "@data_dir", "--on_error", "raise",
                        "--output_dir", "$'runs/' + @name", "--run_id", "run"])  # fmt: skip
    check_command_line(["pytest", "--batchsize", "8"])  # not a bundle run: nothing checked


@pytest.mark.parametrize("value", ["@scans", "$scans", "$scans/2024", "@scans#1"])
def test_a_folder_named_like_a_reference_or_expression_is_explained(capsys, in_repo, value):
    err = bundle_error(capsys, "--data_dir", value)
    assert err.startswith(f"error: data_dir = {value!r}: MONAI reads a value starting with")
    assert f"write './{value}'" in err


def test_on_error_is_skip_or_raise(capsys, in_repo):
    assert bundle_error(capsys, "--on_error", "maybe") == (
        "error: on_error = 'maybe' is not allowed: one of skip, raise"
    )


# ------------------------------------------ class 7: every summary ends with the skipped files
def test_run_summary_ends_with_the_skipped_files_and_their_list(tmp_path, capsys):
    from PIL import Image
    from torch.utils.data import ConcatDataset, Subset

    from medp2x.data.folder import ImageFileDataset
    from medp2x.engine import RunSummary, skipped_files, write_skipped_list
    from medp2x.pipeline import print_summary

    Image.new("RGB", (8, 8)).save(tmp_path / "good.png")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    reader = ImageFileDataset([(tmp_path / "good.png", 0), (tmp_path / "broken.png", 0)],
                              on_error="skip")  # fmt: skip
    reader[1]  # a bad file found while training is listed too
    dataset = ConcatDataset([Subset(reader, [0, 1]), Subset(reader, [1])])
    skipped = skipped_files(dataset)
    assert [path for path, _ in skipped] == [str(tmp_path / "broken.png")]
    listing = write_skipped_list(tmp_path / "run", skipped)
    assert listing.read_text().startswith(f"{tmp_path / 'broken.png'}\t")
    summary = RunSummary(tmp_path, tmp_path / "encoder.pt", "simclr", "resnet18", 4, 1, 4, 4,
                         False, 1.0, 0.5, False, True, skipped=1, skipped_list=listing)  # fmt: skip
    report = {"summary": summary, "results": [], "minutes": 0.1}
    print_summary(job(tmp_path), report)
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last == f"skipped files: 1 (list with reasons: {listing})"
    assert write_skipped_list(tmp_path / "run", []) is None and not listing.exists()


# ------------------------------------------------ class 6: the medp2x command's output paths
@pytest.mark.parametrize("where", ["under_a_file", "is_a_folder"])
def test_cli_output_that_cannot_be_written_is_one_line(tmp_path, capsys, where):
    torchvision_checkpoint(tmp_path / "in.pth")
    (tmp_path / "file").write_text("x")
    (tmp_path / "folder").mkdir()
    out = tmp_path / "file" / "out.pth" if where == "under_a_file" else tmp_path / "folder"
    assert main(["surgery", str(tmp_path / "in.pth"), str(out), "--backbone-only"]) == 2
    printed = capsys.readouterr()
    err = printed.err.strip()
    assert err.startswith("medp2x surgery: error: cannot write ") and "\n" not in err
    assert printed.out == ""  # refused before the checkpoint is read or repaired
    assert str(tmp_path / ("file" if where == "under_a_file" else "folder")) in err


# -------------------------------------------- class 6: a poisoned checkpoint, refused safely
class RunsCode:
    def __reduce__(self):
        return (print, ("code from the checkpoint ran",))


@pytest.mark.parametrize("reader", ["inspect", "run_checkpoint", "resume"])
def test_poisoned_checkpoint_is_refused_without_advice_to_load_it_unsafely(
    tmp_path, capsys, reader
):
    from medp2x.eval.encoders import read_run_checkpoint
    from medp2x.recovery import why_unloadable

    path = tmp_path / "checkpoint_4.pt"
    torch.save({"model": {}, "trainer": {"iteration": 4}, "x": RunsCode()}, path)
    if reader == "inspect":
        assert main(["inspect", str(path)]) == 2
        message = capsys.readouterr().err
    elif reader == "run_checkpoint":
        with pytest.raises(ValueError) as err:
            read_run_checkpoint(path)
        message = str(err.value)
    else:
        try:
            torch.load(path, weights_only=True)
        except Exception as err:  # noqa: BLE001 - what the resume path sees
            message = why_unloadable(path, err)
    assert "checkpoint_4.pt" in message or reader == "resume"
    assert "RunsCode" in message or "refused" in message
    assert "weights_only=False" not in message and "set to `False`" not in message
    assert "code from the checkpoint ran" not in capsys.readouterr().out
