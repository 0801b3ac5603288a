"""The container image, built from the real Dockerfile and run as grand-challenge runs it.

`make container-test` runs these (they are left out of a plain `pytest`); `make test` runs
them whenever docker or podman is usable, and CI always. The image is built by build.sh on
the pinned PyTorch base when the engine has it or can pull it, else on a test-only stand-in
made by make-base.sh (Debian with Python 3.11 and the CPU build of the same torch), and run
by scripts/platform-run.sh: no network, read-only input and root file system, an empty
/tmp, 8 GB of memory, uid 1001, the model folder at /opt/ml/model read-only. podman takes
this folder's containers.conf (runc with explicit ulimits), which the Makefile names in
CONTAINERS_CONF.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pytest

from bench.published import published_heads_path
from helpers import SMALL_PHANTOM, THIN_PHANTOM, write_case
from stoic_ct.inference.pipeline import Balaitous
from stoic_ct.io.contract import COVID_OUTPUT, SEVERE_OUTPUT
from stoic_ct.io.demographics import resolve_demographics
from stoic_ct.io.imageio import read_scan
from stoic_ct.weights.model_files import RANDOM_WEIGHTS_MARKER
from stoic_ct.weights.random_weights import write_random_model_dir

pytestmark = pytest.mark.container

REPOSITORY = Path(__file__).resolve().parents[2]
TAG = "stoic-ct-test"
# Test-only base where the pinned one cannot be pulled; rebuilt when missing.
STAND_IN_BASE = "localhost/stoic-test-base:torch2.13.0-bookworm"
# The demo's random full-size model (scripts/demo.sh): test/expected_output.json has its values.
RANDOM_MODEL = REPOSITORY / ".cache" / "random-model"
IMAGE_USER = 1001


def run(
    command: Sequence[str | Path], timeout: float, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """`command` from the repository's root, its output captured."""
    return subprocess.run(
        [str(c) for c in command],
        cwd=REPOSITORY,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


def open_to_all(path: Path) -> Path:
    """Let the image's user (uid 1001) read `path` and everything under it."""
    for item in [path, *path.rglob("*")]:
        item.chmod(0o755 if item.is_dir() else 0o644)
    return path


def writable_folder(path: Path) -> Path:
    path.mkdir(parents=True)
    path.chmod(0o777)
    return path


@pytest.fixture(scope="session")
def engine() -> str:
    done = run(["bash", "-c", 'here=.; source scripts/engine.sh && echo "$engine"'], 60)
    assert done.returncode == 0, f"no usable container engine: {done.stderr}"
    return done.stdout.strip()


@pytest.fixture(scope="session")
def base_image(engine: str) -> str:
    """The pinned base when present or pullable, else the stand-in (built once, then kept)."""
    chosen = os.environ.get("STOIC_TEST_BASE_IMAGE")
    if chosen:
        return chosen
    dockerfile = (REPOSITORY / "Dockerfile").read_text()
    pinned = next(
        line.split("=", 1)[1] for line in dockerfile.splitlines() if line.startswith("ARG BASE_")
    )
    for candidate in (pinned, STAND_IN_BASE):
        if run([engine, "image", "inspect", candidate], 60).returncode == 0:
            return candidate
    if run([engine, "pull", pinned], 1800).returncode == 0:
        return pinned
    done = run([REPOSITORY / "test" / "container" / "make-base.sh", STAND_IN_BASE], 1200)
    assert done.returncode == 0, done.stdout + done.stderr
    return STAND_IN_BASE


@pytest.fixture(scope="session")
def image(base_image: str) -> str:
    done = run(["./build.sh", "--tag", TAG, "--base-image", base_image], 1800)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "the layers added:" in done.stdout
    return TAG


@pytest.fixture(scope="session")
def random_model() -> Path:
    """Full-size random encoders with the published heads, as `make demo` writes them."""
    if not (RANDOM_MODEL / RANDOM_WEIGHTS_MARKER).exists():
        write_random_model_dir(RANDOM_MODEL, heads=published_heads_path())
    return open_to_all(RANDOM_MODEL)


@pytest.fixture(scope="session")
def tiny_model(tiny_model_dir: Path) -> Path:
    return open_to_all(tiny_model_dir)


def platform_run(
    image: str,
    input_dir: Path,
    output: Path,
    model: Path | None,
    *args: str,
    engine_args: Sequence[str] = (),
) -> subprocess.CompletedProcess[str]:
    """The image run by scripts/platform-run.sh, as the platform runs a job; the model
    folder mounted at /opt/ml/model unless None."""
    open_to_all(input_dir)
    command = ["scripts/platform-run.sh", *(["--model", str(model)] if model else [])]
    command += [f"--engine-arg={a}" for a in engine_args]
    return run([*command, image, input_dir, output, *args], 900)


def the_error(stderr: str) -> str:
    """The one error line of a failed job; every other line on stderr must be a warning
    (here: the model's random weights)."""
    lines = stderr.splitlines()
    errors = [line for line in lines if " ERROR " in line]
    assert len(errors) == 1, lines
    assert all(" WARNING " in line for line in lines if line not in errors), lines
    return errors[0]


def outputs(folder: Path) -> dict[str, float]:
    return {p.name: json.loads(p.read_text()) for p in sorted(folder.iterdir())}


def test_the_shipped_case_through_test_sh(image: str, base_image: str, random_model: Path) -> None:
    """./test.sh as a user runs it: the outputs match the recorded values within 1e-4, and
    the only lines on stderr are warnings (random weights; no lung in the phantom)."""
    done = run(
        [
            "./test.sh",
            *("--tag", image, "--base-image", base_image),
            *("--model-dir", random_model, "--allow-random-weights"),
        ],
        1800,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "match the expected values for these model files within 0.0001" in done.stdout
    report = done.stdout.split("the container wrote ", 1)[1].splitlines()
    assert report[0].startswith("2 line(s) to stderr")
    assert all(" WARNING " in line for line in report[1:3]), report
    assert "RANDOMLY INITIALISED" in report[1] and "no lung found" in report[2]


PROBE = """
import errno, json, os, socket
def writable(folder):
    try:
        with open(os.path.join(folder, "probe"), "w"):
            pass
    except OSError as error:
        return errno.errorcode[error.errno]
    os.remove(os.path.join(folder, "probe"))
    return "yes"
try:
    socket.create_connection(("1.1.1.1", 53), timeout=3)
    network = "reached"
except OSError as error:
    network = type(error).__name__
print(json.dumps({
    "uid": os.getuid(),
    "network": network,
    "writable": {
        f: writable(f) for f in ("/", "/opt/app", "/input", "/opt/ml/model", "/tmp", "/output")
    },
    "tmp": sorted(os.listdir("/tmp")),
    "model": sorted(os.listdir("/opt/ml/model")),
}))
"""


def test_the_job_sandbox(image: str, tiny_model: Path, tmp_path: Path) -> None:
    """What a process inside the job can do: uid 1001, no network, writes only to /output
    and an empty /tmp; /input and /opt/ml/model are read-only."""
    write_case(tmp_path / "input", THIN_PHANTOM)
    output = writable_folder(tmp_path / "output")
    done = platform_run(
        image,
        tmp_path / "input",
        output,
        tiny_model,
        "-c",
        PROBE,
        engine_args=["--entrypoint=python"],
    )
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout.splitlines()[-1])
    assert seen["uid"] == IMAGE_USER
    assert seen["network"] != "reached"
    assert seen["writable"] == {
        "/": "EROFS",
        "/opt/app": "EROFS",
        "/input": "EROFS",
        "/opt/ml/model": "EROFS",
        "/tmp": "yes",
        "/output": "yes",
    }
    assert seen["tmp"] == []
    assert "balaitous.npz" in seen["model"]


def test_inputs_json(image: str, tiny_model: Path, tmp_path: Path) -> None:
    """Today's platform layout: the CT, age and sex from the sockets of inputs.json. The
    outputs are the host's for the same scan and values (the same torch on the same CPU)."""
    input_dir = tmp_path / "input"
    scan_dir = input_dir / "images" / "chest-ct"
    scan_dir.mkdir(parents=True)
    shutil.move(write_case(tmp_path / "stoic", SMALL_PHANTOM), scan_dir / "scan.mha")
    sockets = [
        ("chest-ct", "Image", "Image", "images/chest-ct", None),
        ("patient-age", "Integer", "Value", "patient-age.json", 58),
        ("patient-sex", "String", "Value", "patient-sex.json", "F"),
    ]
    (input_dir / "inputs.json").write_text(
        json.dumps(
            [
                {
                    "interface": {"slug": s, "kind": k, "super_kind": sk, "relative_path": p},
                    "value": v,
                }
                for s, k, sk, p, v in sockets
            ]
        )
    )
    output = writable_folder(tmp_path / "output")
    done = platform_run(image, input_dir, output, tiny_model)
    assert done.returncode == 0, done.stderr
    assert "age 58 (" in done.stdout and "socket patient-age)" in done.stdout
    assert "sex F (" in done.stdout

    scan = read_scan(scan_dir / "scan.mha")
    model = Balaitous.from_model_dir(tiny_model)
    expected = model.predict(
        scan.volume, resolve_demographics([("json", 58)], [("json", "F")])
    ).probabilities
    got = outputs(output)
    assert sorted(got) == [COVID_OUTPUT, SEVERE_OUTPUT]
    assert abs(got[COVID_OUTPUT] - expected.covid) < 1e-6
    assert abs(got[SEVERE_OUTPUT] - expected.severe) < 1e-6
    assert all(p.stat().st_uid == IMAGE_USER for p in output.iterdir())


def _no_image(input_dir: Path) -> None:
    (input_dir / "images" / "ct").mkdir(parents=True)


def _two_images(input_dir: Path) -> None:
    for name in ("1.mha", "2.mha"):
        write_case(input_dir, THIN_PHANTOM, name)


def _no_image_socket(input_dir: Path) -> None:
    age = {"slug": "patient-age", "kind": "Integer", "relative_path": "patient-age.json"}
    input_dir.mkdir(parents=True)
    (input_dir / "inputs.json").write_text(json.dumps([{"interface": age, "value": 50}]))


@pytest.mark.parametrize(
    ("make_input", "message"),
    [
        (_no_image, "/input/images/ct: no .mha or .mhd image found (it is empty)"),
        (_two_images, "/input/images/ct: 2 images found (1.mha, 2.mha)"),
        (_no_image_socket, "/input/inputs.json: lists no image socket"),
    ],
)
def test_a_bad_job_fails_with_one_line(
    image: str,
    tiny_model: Path,
    tmp_path: Path,
    make_input: Callable[[Path], None],
    message: str,
) -> None:
    make_input(tmp_path / "input")
    output = writable_folder(tmp_path / "output")
    done = platform_run(image, tmp_path / "input", output, tiny_model)
    assert done.returncode == 1
    assert message in the_error(done.stderr)
    assert list(output.iterdir()) == []


def test_an_unwritable_output_folder(image: str, tiny_model: Path, tmp_path: Path) -> None:
    write_case(tmp_path / "input", THIN_PHANTOM)
    output = tmp_path / "output"
    output.mkdir(mode=0o755)  # root's: the image's user cannot write there
    done = platform_run(image, tmp_path / "input", output, tiny_model)
    assert done.returncode == 1
    line = the_error(done.stderr)
    assert line.endswith("/output: the output folder is not writable (Permission denied)"), line
    assert list(output.iterdir()) == []


def test_no_model_files(image: str, tmp_path: Path) -> None:
    """The default image carries no model files: without a model folder at /opt/ml/model
    the job says how to give one."""
    write_case(tmp_path / "input", THIN_PHANTOM)
    output = writable_folder(tmp_path / "output")
    done = platform_run(image, tmp_path / "input", output, None)
    assert done.returncode == 1
    assert "/opt/ml/model: holds no model files, and none are baked into the image" in (
        the_error(done.stderr)
    )
    assert list(output.iterdir()) == []


def test_train_py_in_the_image(
    image: str, tiny_model: Path, phantom_cohort: Path, cohort_masks: Path, tmp_path: Path
) -> None:
    """The final-phase training entry point, in the same image, on 48 small phantoms with
    tiny encoders and given lung masks: a complete model folder in /output (new heads,
    the mounted encoders and U-Net, MANIFEST), nothing on stderr but warnings."""
    cohort = Path(shutil.copytree(phantom_cohort, tmp_path / "cohort"))
    shutil.copytree(cohort_masks, cohort / "masks")
    output = writable_folder(tmp_path / "output")
    done = platform_run(
        image,
        cohort,
        output,
        tiny_model,
        *("train.py", "--system", "balaitous", "--lung-masks", "/input/masks", "--devices", "cpu"),
        engine_args=["--entrypoint=python", "--tmpfs=/scratch:rw,mode=1777"],
    )
    assert done.returncode == 0, done.stderr
    model_files = ["unet_r231-d5d2fc3d.pth", "vitl_16_ct.pth", "vitl_16_pt22k.pth"]
    assert sorted(p.name for p in output.iterdir()) == sorted(
        ["MANIFEST", "RANDOM_WEIGHTS", "balaitous.npz", "heads.json", "training.json", *model_files]
    )
    manifest = (output / "MANIFEST").read_text()
    assert all(f"  {name}\n" in manifest for name in ["balaitous.npz", *model_files])
    assert json.loads((output / "heads.json").read_text())["data"]["patients"] == 48
    with np.load(output / "balaitous.npz") as heads:
        assert heads["coef_full_severe"].shape[-1] == 64 + 2  # tiny features, age and sex
    warnings = [line for line in done.stderr.splitlines() if line]
    assert all(" WARNING " in line for line in warnings), warnings
