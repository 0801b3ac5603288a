"""system.json: what a model folder holds, where it came from, and every refusal."""

from __future__ import annotations

import json
import logging
import shutil
import sys
from pathlib import Path

import pytest

from stoic_ct.errors import ModelFileError
from stoic_ct.weights import system_record
from stoic_ct.weights.model_files import (
    ALL_FILES,
    CONVNEXT_COVID,
    CONVNEXT_SEVERE,
    ENSEMBLE_WEIGHTS,
    SYSTEM_RECORD,
    read_manifest,
    sha256_of,
    system_files,
    write_manifest,
)
from stoic_ct.weights.system_record import (
    SystemRecord,
    check_model_folder,
    choose,
    current_command,
    invoked_as,
    origin,
    read_system_record,
    write_system_record,
)


@pytest.fixture
def folder(tiny_model_dir: Path, tmp_path: Path) -> Path:
    """The four published files (tiny) with their MANIFEST, and ConvNeXt stand-ins."""
    model = Path(shutil.copytree(tiny_model_dir, tmp_path / "model"))
    for spec in (CONVNEXT_COVID, CONVNEXT_SEVERE):
        (model / spec.name).write_bytes(b"weights")
    (model / ENSEMBLE_WEIGHTS.name).write_text("{}")
    write_manifest(model, {p.name: sha256_of(p) for p in model.iterdir() if p.suffix != ""})
    return model


def test_a_folder_without_a_record_holds_the_published_balaitous(folder: Path) -> None:
    assert read_system_record(folder) is None
    choice = choose(folder)
    assert (choice.system, choice.encoder, choice.record) == ("balaitous", "vit", None)
    assert "has no system.json: the published Balaitous files" in choice.describe(folder)


def test_write_then_read(folder: Path) -> None:
    entry = origin("trained", cohort={"scans": 48}, auc={"covid": 0.9})
    written = write_system_record(folder, "ensemble", "vit", entry)
    assert written == read_system_record(folder)
    assert written.files == tuple(s.name for s in system_files("ensemble"))
    assert written.history == (entry,)
    assert entry["command"] == current_command() and entry["written"]
    document = json.loads((folder / SYSTEM_RECORD.name).read_text())
    assert document["format"] == 1 and document["system"] == "ensemble"
    # The MANIFEST lists it, so that export.sh packs it.
    assert read_manifest(folder)[SYSTEM_RECORD.name] == sha256_of(folder / SYSTEM_RECORD.name)
    choice = choose(folder)
    assert (choice.system, choice.encoder) == ("ensemble", "vit")
    assert "system.json: ensemble (encoder vit), written by `" in choice.describe(folder)


def test_updates_keep_the_history(folder: Path) -> None:
    write_system_record(folder, "ensemble", "vit", origin("first"))
    record = write_system_record(folder, "balaitous", "vit", origin("second"))
    assert [h["what"] for h in record.history] == ["first", "second"]
    assert record.system == "balaitous" and CONVNEXT_COVID.name not in record.files


def test_no_manifest_is_made_where_there_was_none(folder: Path) -> None:
    (folder / "MANIFEST").unlink()
    write_system_record(folder, "balaitous", "vit", origin("x"))
    assert not (folder / "MANIFEST").exists()


def test_a_system_is_not_recorded_without_its_files(folder: Path) -> None:
    (folder / CONVNEXT_SEVERE.name).unlink()
    with pytest.raises(ModelFileError, match="lacks convnext3d_severe.pth, which the ensemble"):
        write_system_record(folder, "ensemble", "vit", origin("x"))
    assert not (folder / SYSTEM_RECORD.name).exists()


def test_a_record_naming_a_missing_file_is_refused_in_one_line(folder: Path) -> None:
    write_system_record(folder, "ensemble", "vit", origin("x"))
    (folder / CONVNEXT_COVID.name).unlink()
    with pytest.raises(ModelFileError) as error:
        choose(folder)
    message = str(error.value)
    assert message == (
        f"{folder / 'system.json'}: names convnext3d_covid.pth for the ensemble system, "
        "but the folder lacks it"
    )


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("not json", "is not JSON"),
        ('{"format": 2, "system": "balaitous", "files": []}', "format 1"),
        ('{"format": 1, "system": "resnet", "files": []}', "not 'resnet'"),
        ('{"format": 1, "system": "balaitous", "encoder": "x", "files": []}', "not 'x'"),
        ('{"format": 1, "system": "balaitous", "files": ["../x.pth"]}', "file names in the"),
        ('{"format": 1, "system": "balaitous", "files": [], "history": 3}', "history must"),
    ],
)
def test_a_malformed_record(folder: Path, text: str, message: str) -> None:
    (folder / SYSTEM_RECORD.name).write_text(text)
    with pytest.raises(ModelFileError, match=message) as error:
        read_system_record(folder)
    assert str(error.value).startswith(f"{folder / 'system.json'}: ")
    # A writer leaves it as it is: its history is not lost.
    with pytest.raises(ModelFileError):
        write_system_record(folder, "balaitous", "vit", origin("x"))
    assert (folder / SYSTEM_RECORD.name).read_text() == text


def test_overrides_are_logged(folder: Path, caplog: pytest.LogCaptureFixture) -> None:
    write_system_record(folder, "ensemble", "vit", origin("x"))
    caplog.clear()
    choice = choose(folder, "convnext3d", "convnext3d-frozen")
    assert (choice.system, choice.encoder) == ("convnext3d", "convnext3d-frozen")
    lines = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    assert any(line.startswith("--system convnext3d overrides what ") for line in lines)
    assert any(line.endswith("system.json holds: vit") for line in lines)
    caplog.clear()
    choose(folder, "ensemble", "vit")  # the same as the folder's: nothing to say
    assert caplog.records == []


def test_an_old_encoder_name_is_read(folder: Path) -> None:
    record = SystemRecord.of("balaitous", "convnext3d")
    assert record.encoder == "convnext3d-frozen"
    assert "convnext3d.pth" in record.files and "convnext3d_heads.npz" in record.files


def test_check_model_folder(folder: Path) -> None:
    """Every file of the system, listed in the MANIFEST with its sha256."""
    assert check_model_folder(folder).system == "balaitous"
    write_system_record(folder, "ensemble", "vit", origin("x"))
    assert check_model_folder(folder).system == "ensemble"
    (folder / ENSEMBLE_WEIGHTS.name).write_text('{"changed": 1}')
    with pytest.raises(ModelFileError, match="ensemble.json: differs from the sha256"):
        check_model_folder(folder)
    manifest = read_manifest(folder)
    del manifest[ENSEMBLE_WEIGHTS.name]
    write_manifest(folder, manifest)
    with pytest.raises(ModelFileError, match="not listed in the folder's MANIFEST"):
        check_model_folder(folder)
    (folder / ALL_FILES[0].name).unlink()
    with pytest.raises(ModelFileError, match="names vitl_16_ct.pth .* the folder lacks it"):
        check_model_folder(folder)


def test_the_command_line_as_typed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(system_record, "_COMMAND", [])
    monkeypatch.setattr(sys, "argv", ["/opt/app/train.py", "--system", "ensemble", "--out", "a b"])
    assert current_command() == "train.py --system ensemble --out 'a b'"
    monkeypatch.setattr(sys, "argv", ["/x/stoic_ct/__main__.py", "install-heads", "h/"])
    assert current_command() == "python -m stoic_ct install-heads h/"
    invoked_as("train.py", ["--system", "ensemble"])  # an entry point called with its own argv
    assert current_command() == "train.py --system ensemble"
