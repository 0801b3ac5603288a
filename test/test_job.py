"""The job: evalutils' Algorithm around a system, on both input layouts, reading only
what lies inside its input folder."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import SimpleITK as sitk

from helpers import SMALL_PHANTOM, THIN_PHANTOM, write_case
from stoic_ct.errors import InputError
from stoic_ct.inference.pipeline import Balaitous
from stoic_ct.io.contract import demographics_for, read_job_inputs
from stoic_ct.io.imageio import read_scan
from stoic_ct.io.output_names import COVID_OUTPUT, SEVERE_OUTPUT
from stoic_ct.job import StoicAlgorithm, run_job


def outputs(folder: Path) -> dict[str, float]:
    return {p.name: json.loads(p.read_text()) for p in sorted(folder.iterdir())}


def test_algorithm_with_lungs(tiny_model: Balaitous, tmp_path: Path) -> None:
    """The Algorithm class end to end with the threshold segmenter: lungs found, outputs match."""
    image = write_case(tmp_path / "input", SMALL_PHANTOM)
    StoicAlgorithm(
        input_dir=tmp_path / "input", output_dir=tmp_path / "output", model=tiny_model
    ).process()
    scan = read_scan(image)
    expected = tiny_model.predict(
        scan.volume, demographics_for(scan, read_job_inputs(tmp_path / "input"))
    ).probabilities
    assert outputs(tmp_path / "output") == {
        COVID_OUTPUT: expected.covid,
        SEVERE_OUTPUT: expected.severe,
    }


def test_evalutils_predict_hook(tiny_model: Balaitous, tmp_path: Path) -> None:
    image = write_case(tmp_path / "input", SMALL_PHANTOM)
    algorithm = StoicAlgorithm(
        input_dir=tmp_path / "input", output_dir=tmp_path / "output", model=tiny_model
    )
    result = algorithm.predict(input_image=sitk.ReadImage(str(image)))
    assert set(result) == {COVID_OUTPUT, SEVERE_OUTPUT}


def test_inputs_json(tiny_model: Balaitous, tmp_path: Path) -> None:
    """The CT, age and sex from the sockets of inputs.json: the same outputs as the same
    values given in the STOIC layout."""
    stoic = tmp_path / "stoic"
    image = write_case(stoic, SMALL_PHANTOM)
    (stoic / "patient-age.json").write_text("58")
    (stoic / "patient-sex.json").write_text('"F"')
    sockets = tmp_path / "sockets"
    (sockets / "images" / "chest-ct").mkdir(parents=True)
    shutil.copy2(image, sockets / "images" / "chest-ct" / "scan.mha")
    interfaces = [
        ({"slug": "chest-ct", "kind": "Image", "super_kind": "Image"}, "images/chest-ct", None),
        ({"slug": "patient-age", "kind": "Integer", "super_kind": "Value"}, "age.json", 58),
        ({"slug": "patient-sex", "kind": "String", "super_kind": "Value"}, "sex.json", "F"),
    ]
    (sockets / "inputs.json").write_text(
        json.dumps(
            [
                {"interface": interface | {"relative_path": path}, "value": value}
                for interface, path, value in interfaces
            ]
        )
    )
    for input_dir, output in ((stoic, tmp_path / "out-stoic"), (sockets, tmp_path / "out-sockets")):
        StoicAlgorithm(input_dir=input_dir, output_dir=output, model=tiny_model).process()
    assert outputs(tmp_path / "out-sockets") == outputs(tmp_path / "out-stoic")


def _mhd_outside(input_dir: Path, elsewhere: Path) -> Path:
    """A MetaImage header in the input folder whose voxel file lies in `elsewhere`."""
    header = write_case(elsewhere, THIN_PHANTOM, "scan.mhd")
    lines = header.read_text().splitlines()
    (data,) = [line.split("=")[1].strip() for line in lines if line.startswith("ElementDataFile")]
    image_dir = input_dir / "images" / "ct"
    image_dir.mkdir(parents=True)
    text = "\n".join(
        f"ElementDataFile = {header.parent / data}" if line.startswith("ElementDataFile") else line
        for line in lines
    )
    (image_dir / "scan.mhd").write_text(text + "\n")
    return image_dir / "scan.mhd"


def test_a_header_naming_a_voxel_file_elsewhere_is_refused(
    tiny_model: Balaitous, tmp_path: Path
) -> None:
    """The header reads as a scan (read_scan alone scores it), but a job reads only its own
    input: refused with one line, nothing written."""
    header = _mhd_outside(tmp_path / "input", tmp_path / "elsewhere")
    assert read_scan(header).volume.size == THIN_PHANTOM.size
    with pytest.raises(
        InputError, match=r"names scan\.z?raw, which is .*elsewhere.* outside the input folder"
    ):
        run_job(tiny_model, tmp_path / "input", tmp_path / "output")
    assert list((tmp_path / "output").iterdir()) == []


def test_a_link_to_a_scan_elsewhere_is_refused(tiny_model: Balaitous, tmp_path: Path) -> None:
    outside = write_case(tmp_path / "elsewhere", THIN_PHANTOM)
    image_dir = tmp_path / "input" / "images" / "ct"
    image_dir.mkdir(parents=True)
    (image_dir / "scan.mha").symlink_to(outside)
    with pytest.raises(InputError, match=r"scan.mha: it is .*elsewhere.*1234.mha, outside"):
        run_job(tiny_model, tmp_path / "input", tmp_path / "output")


def test_an_input_folder_that_is_a_link_to_the_staged_case(
    tiny_model: Balaitous, tmp_path: Path
) -> None:
    """Under the invoke API /input is a symbolic link to the case's staged folder: the scan
    inside it is read, compared by resolved paths; the link replaced, the next case is read."""
    first = write_case(tmp_path / "staged" / "1-input", SMALL_PHANTOM)
    write_case(tmp_path / "staged" / "2-input", THIN_PHANTOM)
    link = tmp_path / "input"
    link.symlink_to(tmp_path / "staged" / "1-input", target_is_directory=True)
    got = run_job(tiny_model, link, tmp_path / "output")
    scan = read_scan(first)
    expected = tiny_model.predict(scan.volume, demographics_for(scan, read_job_inputs(link)))
    assert got == expected.probabilities
    link.unlink()
    link.symlink_to(tmp_path / "staged" / "2-input", target_is_directory=True)
    assert run_job(tiny_model, link, tmp_path / "output") != got
    assert outputs(tmp_path / "output")[COVID_OUTPUT] != got.covid
