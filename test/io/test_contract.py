"""The container contract: finding the input, JSON inputs, and atomic outputs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from helpers import write_image
from stoic_ct.errors import InputError
from stoic_ct.io.contract import (
    Probabilities,
    demographics_for,
    find_input_image,
    prepare_output_dir,
    read_job_inputs,
    write_outputs,
)
from stoic_ct.io.imageio import Scan
from stoic_ct.io.output_names import COVID_OUTPUT, SEVERE_OUTPUT
from stoic_ct.io.volume import Volume

VOLUME = Volume(
    np.zeros((2, 2, 2), np.int16),
    (1.0, 1.0, 1.0),
    (0.0, 0.0, 0.0),
    (1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0),
)


def test_finds_the_one_image(tmp_path: Path) -> None:
    image = write_image(tmp_path / "1234.mha", np.zeros((2, 2, 2), np.int16))
    (tmp_path / ".hidden.mha").write_text("editor swap file")
    (tmp_path / "notes.txt").write_text("not an image")
    assert find_input_image(tmp_path) == image


def test_mhd_with_its_raw_file_is_one_image(tmp_path: Path) -> None:
    image = write_image(tmp_path / "1234.mhd", np.zeros((2, 2, 2), np.int16))
    assert sorted(p.suffix for p in tmp_path.iterdir()) == [".mhd", ".raw"]
    assert find_input_image(tmp_path) == image


def test_no_image(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(InputError, match=r"no .mha or .mhd image found \(it holds: notes.txt\)"):
        find_input_image(tmp_path)


def test_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="ct: the input image folder does not exist"):
        find_input_image(tmp_path / "images" / "ct")


def test_two_images(tmp_path: Path) -> None:
    for name in ("1.mha", "2.mha"):
        write_image(tmp_path / name, np.zeros((2, 2, 2), np.int16))
    with pytest.raises(InputError, match=r"2 images found \(1.mha, 2.mha\); .* exactly one"):
        find_input_image(tmp_path)


def test_json_inputs_override_the_header(tmp_path: Path) -> None:
    (tmp_path / "patient-age.json").write_text("55")
    (tmp_path / "patient-sex.json").write_text('"F"')
    scan = Scan(tmp_path / "x.mha", VOLUME, {"PatientAge": "075Y", "PatientSex": "M"})
    result = demographics_for(scan, read_job_inputs(tmp_path))
    assert (result.age_years, result.sex) == (55.0, "F")
    assert result.age_source.endswith("patient-age.json")


@pytest.mark.parametrize(("age_json", "sex_json"), [("{not json", "42"), ('"old"', '["M"]')])
def test_malformed_json_falls_back_to_the_header(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, age_json: str, sex_json: str
) -> None:
    (tmp_path / "patient-age.json").write_text(age_json)
    (tmp_path / "patient-sex.json").write_text(sex_json)
    scan = Scan(tmp_path / "x.mha", VOLUME, {"PatientAge": "075Y", "PatientSex": "M"})
    result = demographics_for(scan, read_job_inputs(tmp_path))
    assert (result.age_years, result.sex) == (75.0, "M")
    assert "patient-age.json" in caplog.text and "patient-sex.json" in caplog.text


def test_malformed_everything_gives_defaults(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / "patient-age.json").write_text("-3")
    scan = Scan(tmp_path / "x.mha", VOLUME, {"PatientAge": "abcY", "PatientSex": "?"})
    result = demographics_for(scan, read_job_inputs(tmp_path))
    assert (result.age_years, result.sex, result.age_source) == (65.0, None, "default")
    assert caplog.text.count("WARNING") == 3


def socket(slug: str, kind: str, relative_path: str, value: object = None) -> dict[str, object]:
    """One entry of inputs.json, as grand-challenge writes it."""
    super_kind = "Image" if kind == "Image" else "Value"
    interface = {"slug": slug, "kind": kind, "super_kind": super_kind}
    return {"interface": interface | {"relative_path": relative_path}, "value": value}


def write_inputs_json(input_dir: Path, *sockets: dict[str, object]) -> Path:
    input_dir.mkdir(parents=True, exist_ok=True)
    path = input_dir / "inputs.json"
    path.write_text(json.dumps(list(sockets)))
    return path


def test_inputs_json_sockets_with_inline_values(tmp_path: Path) -> None:
    """The image socket's folder is the CT's; inline values win over the header and any file."""
    (tmp_path / "patient-age.json").write_text("30")  # the STOIC layout's file: not read
    listing = write_inputs_json(
        tmp_path,
        socket("chest-ct", "Image", "images/chest-ct"),
        socket("patient-age", "Integer", "age.json", 58),
        socket("patient-sex", "String", "sex.json", "F"),
    )
    inputs = read_job_inputs(tmp_path)
    assert inputs.image_dir == tmp_path / "images" / "chest-ct"
    scan = Scan(tmp_path / "x.mha", VOLUME, {"PatientAge": "075Y", "PatientSex": "M"})
    result = demographics_for(scan, inputs)
    assert (result.age_years, result.sex) == (58.0, "F")
    assert result.age_source == f"{listing} socket patient-age"


def test_inputs_json_values_in_their_files(tmp_path: Path) -> None:
    """A simple socket without an inline value is read from /input/<relative_path>."""
    write_inputs_json(
        tmp_path,
        socket("ct", "Image", "images/ct"),
        socket("patient-age", "Integer", "patient-age.json"),
    )
    (tmp_path / "patient-age.json").write_text("47")
    (tmp_path / "patient-sex.json").write_text('"F"')  # no socket lists it: not read
    scan = Scan(tmp_path / "x.mha", VOLUME, {"PatientAge": "075Y", "PatientSex": "M"})
    result = demographics_for(scan, read_job_inputs(tmp_path))
    assert (result.age_years, result.age_source) == (47.0, str(tmp_path / "patient-age.json"))
    assert (result.sex, result.sex_source) == ("M", f"{scan.path} header PatientSex")


@pytest.mark.parametrize(
    ("sockets", "message"),
    [
        ([socket("patient-age", "Integer", "a.json", 50)], "lists no image socket; "),
        (
            [socket("ct", "Image", "images/ct"), socket("mask", "Image", "images/mask")],
            r"lists 2 image sockets \(ct, mask\); the algorithm takes exactly one, the CT",
        ),
        ([{"value": 3}], "entry 0 has no interface with a slug and a relative_path"),
        ([socket("ct", "Image", "../etc")], "socket ct: relative_path '../etc' leaves /input"),
    ],
)
def test_inputs_json_that_cannot_be_used(
    tmp_path: Path, sockets: list[dict[str, object]], message: str
) -> None:
    write_inputs_json(tmp_path, *sockets)
    with pytest.raises(InputError, match=f"inputs.json: {message}"):
        read_job_inputs(tmp_path)


@pytest.mark.parametrize(
    ("text", "message"), [("{not json", "not readable as JSON"), ('{"a": 1}', "is not a list")]
)
def test_unreadable_inputs_json(tmp_path: Path, text: str, message: str) -> None:
    (tmp_path / "inputs.json").write_text(text)
    with pytest.raises(InputError, match=f"inputs.json: {message}"):
        read_job_inputs(tmp_path)


def test_outputs_are_bare_json_floats(tmp_path: Path) -> None:
    write_outputs(tmp_path, Probabilities(covid=0.25, severe=0.125))
    assert (tmp_path / COVID_OUTPUT).read_text() == "0.25\n"
    assert json.loads((tmp_path / SEVERE_OUTPUT).read_text()) == 0.125
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([COVID_OUTPUT, SEVERE_OUTPUT])


def test_invalid_probability_writes_nothing(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="is not a probability"):
        write_outputs(tmp_path, Probabilities(covid=float("nan"), severe=0.5))
    assert list(tmp_path.iterdir()) == []


def test_failed_rename_leaves_no_output(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_replace = Path.replace
    calls = []

    def replace_then_fail(self: Path, target: Path) -> Path:
        calls.append(target)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return real_replace(self, target)

    monkeypatch.setattr(Path, "replace", replace_then_fail)
    with pytest.raises(InputError, match="cannot write the outputs"):
        write_outputs(tmp_path, Probabilities(covid=0.25, severe=0.125))
    assert list(tmp_path.iterdir()) == []


def test_stale_outputs_are_removed(tmp_path: Path) -> None:
    (tmp_path / COVID_OUTPUT).write_text("0.9")
    prepare_output_dir(tmp_path)
    assert not (tmp_path / COVID_OUTPUT).exists()


def test_output_folder_that_is_a_file(tmp_path: Path) -> None:
    (tmp_path / "out").write_text("a file")
    with pytest.raises(InputError, match="out: the output folder is not writable"):
        prepare_output_dir(tmp_path / "out")
