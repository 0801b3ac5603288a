"""The container entry point, run as the container runs it, and its answer to every bad input."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from fileserver import Route, serving

import process
from helpers import (
    THIN_PHANTOM,
    contained,
    run_as_container,
    run_process,
    write_case,
    write_image,
)
from stoic_ct.inference.pipeline import Balaitous
from stoic_ct.io.contract import demographics_for, read_job_inputs
from stoic_ct.io.imageio import read_scan
from stoic_ct.io.output_names import COVID_OUTPUT, SEVERE_OUTPUT

REPOSITORY = Path(process.__file__).resolve().parent


@pytest.fixture
def shared_model_dir(tiny_model_dir: Path, shared_tmp: Path) -> Path:
    """The tiny model files where an unprivileged user can read them."""
    model_dir = shared_tmp / "model"
    shutil.copytree(tiny_model_dir, model_dir)
    model_dir.chmod(0o755)
    return model_dir


def written_since(marker: Path, roots: list[Path], allowed: list[Path]) -> list[str]:
    """Files under `roots` changed after `marker` by the container's user, outside `allowed`."""
    command = ["find", *map(str, roots), "-xdev", "-newer", str(marker)]
    if os.geteuid() == 0:
        command += ["-user", "nobody"]
    for folder in allowed:
        command += ["-not", "-path", f"{folder}*"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    return [line for line in done.stdout.splitlines() if line]


def outputs(folder: Path) -> dict[str, float]:
    return {p.name: json.loads(p.read_text()) for p in sorted(folder.iterdir())}


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if " ERROR " in line]


def test_container_run(shared_model_dir: Path, shared_tmp: Path) -> None:
    """process.py in a subprocess as the container runs it: no network, a non-root user,
    a read-only input folder. Its outputs are the model's, and it writes nothing but them
    (and temporary files in TMPDIR)."""
    image = write_case(shared_tmp / "input", THIN_PHANTOM)
    (shared_tmp / "input" / "patient-age.json").write_text("45")
    for path in (shared_tmp / "input").rglob("*"):
        path.chmod(0o555 if path.is_dir() else 0o444)
    (shared_tmp / "input").chmod(0o555)
    output, scratch = shared_tmp / "output", shared_tmp / "tmp"
    for folder in (output, scratch):
        folder.mkdir()
        folder.chmod(0o777)
    marker = shared_tmp / "started"
    marker.touch()

    done = run_as_container(
        shared_tmp / "input", output, shared_model_dir, env={"TMPDIR": str(scratch)}
    )
    assert done.returncode == 0, done.stderr
    # Random weights and no lung in this phantom: two warnings, and nothing else on stderr.
    assert [line.split()[1] for line in done.stderr.splitlines()] == ["WARNING", "WARNING"]
    assert "age 45 (" in done.stdout and "patient-age.json)" in done.stdout
    assert str(image) in done.stdout

    scan = read_scan(image)
    model = Balaitous.from_model_dir(shared_model_dir)
    expected = model.predict(
        scan.volume, demographics_for(scan, read_job_inputs(shared_tmp / "input"))
    )
    assert outputs(output) == {
        COVID_OUTPUT: expected.probabilities.covid,
        SEVERE_OUTPUT: expected.probabilities.severe,
    }
    roots = [Path("/tmp"), Path("/var/tmp"), Path("/dev/shm"), REPOSITORY, shared_tmp]
    assert written_since(marker, roots, allowed=[output, scratch]) == []


def test_the_write_check_sees_stray_files(shared_tmp: Path) -> None:
    marker = shared_tmp / "started"
    marker.touch()
    (shared_tmp / "open").mkdir()
    (shared_tmp / "open").chmod(0o777)
    stray = shared_tmp / "open" / "stray.txt"
    script = f"open({str(stray)!r}, 'w').write('x')"
    subprocess.run(contained([sys.executable, "-c", script]), check=True, timeout=30)
    assert written_since(marker, [shared_tmp], allowed=[]) == [str(stray)]


def test_the_container_process_has_no_network() -> None:
    """What run_as_container does to a process: the host's loopback server is out of reach."""
    probe = "import socket, sys; socket.create_connection(('127.0.0.1', int(sys.argv[1])), 2)"
    with serving() as server:
        server.routes["/"] = Route(b"hello")
        reachable = subprocess.run([sys.executable, "-c", probe, str(server.port)], timeout=30)
        isolated = subprocess.run(
            contained([sys.executable, "-c", probe, str(server.port)]),
            capture_output=True,
            text=True,
            timeout=30,
        )
    assert reachable.returncode == 0
    assert isolated.returncode != 0
    assert "Network is unreachable" in isolated.stderr or "refused" in isolated.stderr


def run_main(
    tmp_path: Path, model_dir: Path, caplog: pytest.LogCaptureFixture
) -> tuple[int, list[str]]:
    status = process.main(
        [
            "--input",
            str(tmp_path / "input"),
            "--output",
            str(tmp_path / "output"),
            "--model-dir",
            str(model_dir),
            "--device",
            "cpu",
        ]
    )
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    return status, errors


def assert_fails_cleanly(
    tmp_path: Path, model_dir: Path, caplog: pytest.LogCaptureFixture, names: str, message: str
) -> None:
    status, errors = run_main(tmp_path, model_dir, caplog)
    assert status == 1
    assert len(errors) == 1, errors
    assert names in errors[0] and message in errors[0], errors[0]
    output = tmp_path / "output"
    assert not output.exists() or list(output.iterdir()) == []


def ct_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "input" / "images" / "ct"
    folder.mkdir(parents=True)
    return folder


def test_no_image(tiny_model_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    ct_dir(tmp_path)
    assert_fails_cleanly(
        tmp_path, tiny_model_dir, caplog, "images/ct", "no .mha or .mhd image found"
    )


def test_two_images(tiny_model_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    write_case(tmp_path / "input", THIN_PHANTOM, "1.mha")
    write_case(tmp_path / "input", THIN_PHANTOM, "2.mha")
    assert_fails_cleanly(tmp_path, tiny_model_dir, caplog, "images/ct", "2 images found")


def test_unreadable_image(
    tiny_model_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (ct_dir(tmp_path) / "1.mha").write_bytes(b"\x00garbage")
    assert_fails_cleanly(tmp_path, tiny_model_dir, caplog, "1.mha", "cannot read it as an image")


def test_truncated_image(
    tiny_model_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = write_case(tmp_path / "input", THIN_PHANTOM)
    path.write_bytes(path.read_bytes()[:-500])
    assert_fails_cleanly(tmp_path, tiny_model_dir, caplog, path.name, "truncated or corrupt")


def test_2d_image(tiny_model_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    write_image(ct_dir(tmp_path) / "1.mha", np.zeros((64, 64), np.int16), spacing=(1.0, 1.0))
    assert_fails_cleanly(tmp_path, tiny_model_dir, caplog, "1.mha", "it is a 2D image")


def test_4d_image(tiny_model_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    sitk.WriteImage(sitk.Image([16, 16, 16, 2], sitk.sitkInt16), str(ct_dir(tmp_path) / "1.mha"))
    assert_fails_cleanly(tmp_path, tiny_model_dir, caplog, "1.mha", "it is a 4D image")


def test_multi_component_image(
    tiny_model_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    sitk.WriteImage(
        sitk.Image([16, 16, 16], sitk.sitkVectorInt16, 3), str(ct_dir(tmp_path) / "1.mha")
    )
    assert_fails_cleanly(tmp_path, tiny_model_dir, caplog, "1.mha", "3 components per voxel")


def test_all_nan_image(
    tiny_model_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    write_image(ct_dir(tmp_path) / "1.mha", np.full((8, 16, 16), np.nan, np.float32))
    assert_fails_cleanly(tmp_path, tiny_model_dir, caplog, "1.mha", "every voxel is NaN")


def test_too_small_volume(
    tiny_model_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    write_image(ct_dir(tmp_path) / "1.mha", np.zeros((3, 64, 64), np.int16))
    assert_fails_cleanly(tmp_path, tiny_model_dir, caplog, "1.mha", "too small to resample")


def test_missing_model_file(
    tiny_model_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    write_case(tmp_path / "input", THIN_PHANTOM)
    model_dir = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model_dir)
    (model_dir / "unet_r231-d5d2fc3d.pth").unlink()
    assert_fails_cleanly(
        tmp_path,
        model_dir,
        caplog,
        "unet_r231-d5d2fc3d.pth",
        "is missing; expected lungmask R231 U-Net",
    )


def test_nan_voxels_malformed_metadata_and_no_lung_still_give_outputs(
    tiny_model_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A readable CT with NaN voxels, bad age and sex everywhere, and no lung (random U-Net)."""
    voxels = np.full((3, 40, 40), 40.0, np.float32)
    voxels[1, :5, :5] = np.nan
    write_image(
        ct_dir(tmp_path) / "1.mha",
        voxels,
        spacing=(6.0, 6.0, 5.0),
        PatientAge="sixty-five",
        PatientSex="unknown?",
    )
    (tmp_path / "input" / "patient-age.json").write_text("{oops")
    (tmp_path / "input" / "patient-sex.json").write_text('"Z"')
    status, errors = run_main(tmp_path, tiny_model_dir, caplog)
    assert (status, errors) == (0, [])
    assert all(0 <= v <= 1 for v in outputs(tmp_path / "output").values())
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    for expected in (
        "NaN or infinite",
        "patient-age.json",
        "patient-sex.json",
        "PatientAge",
        "PatientSex",
        "no lung found",
    ):
        assert any(expected in w for w in warnings), expected


def test_error_is_one_line_on_stderr(tiny_model_dir: Path, tmp_path: Path) -> None:
    (ct_dir(tmp_path) / "1.mha").write_bytes(b"garbage")
    done = run_process(
        "--input",
        tmp_path / "input",
        "--output",
        tmp_path / "output",
        "--model-dir",
        tiny_model_dir,
    )
    assert done.returncode == 1
    (line,) = error_lines(done.stderr)
    assert line.endswith(
        f"{tmp_path}/input/images/ct/1.mha: cannot read it as an image "
        '(Unable to determine ImageIO reader for "' + f'{tmp_path}/input/images/ct/1.mha")'
    )
    assert "Traceback" not in done.stderr


def test_unwritable_output_folder(shared_model_dir: Path, shared_tmp: Path) -> None:
    write_case(shared_tmp / "input", THIN_PHANTOM)
    output = shared_tmp / "output"
    output.mkdir(mode=0o555)
    output.chmod(0o555)
    done = run_as_container(shared_tmp / "input", output, shared_model_dir)
    assert done.returncode == 1
    (line,) = error_lines(done.stderr)
    assert line.endswith(f"{output}: the output folder is not writable (Permission denied)")
    assert list(output.iterdir()) == []


def test_inputs_json_without_an_image_socket(
    tiny_model_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / "input").mkdir()
    age = {"slug": "patient-age", "kind": "Integer", "relative_path": "patient-age.json"}
    (tmp_path / "input" / "inputs.json").write_text(json.dumps([{"interface": age, "value": 50}]))
    assert_fails_cleanly(tmp_path, tiny_model_dir, caplog, "inputs.json", "lists no image socket")
