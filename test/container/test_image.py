"""The container images, built from the real Dockerfile and run as grand-challenge runs them.

`make container-test` runs these (they are left out of a plain `pytest`); `make test` runs
them whenever docker or podman is usable, and CI always. Both images (the invoke API, the
default, and the exec API) are built by build.sh on the pinned PyTorch base when the
engine has it or can pull it, else on a test-only stand-in made by make-base.sh (Debian
with Python 3.11 and the CPU build of the same torch), and run by scripts/platform-run.sh:
no network, read-only input and root file system, an empty /tmp, 8 GB of memory and of
RLIMIT_DATA, uid 1001, the model folder at /opt/ml/model read-only; the invoke image is
driven as the platform's shim drives it (/health polled from inside the container, then
POST /invoke per case, SIGTERM at the end). podman takes this folder's containers.conf
(runc with explicit ulimits), which the Makefile names in CONTAINERS_CONF. The times
measured are printed at the end of the run and written to .cache/test-timings.json.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest

from bench.published import published_heads_path
from helpers import SMALL_PHANTOM, THIN_PHANTOM, write_case
from stoic_ct.inference.pipeline import Balaitous
from stoic_ct.io.contract import demographics_for, read_job_inputs
from stoic_ct.io.demographics import resolve_demographics
from stoic_ct.io.imageio import read_scan
from stoic_ct.io.output_names import COVID_OUTPUT, SEVERE_OUTPUT
from stoic_ct.weights.model_files import RANDOM_WEIGHTS_MARKER
from stoic_ct.weights.random_weights import write_random_model_dir
from timings import Timings

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


def build(base_image: str, api: str) -> str:
    tag = f"{TAG}-{api}"
    done = run(["./build.sh", "--tag", tag, "--api", api, "--base-image", base_image], 1800)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "the layers added:" in done.stdout
    return tag


@pytest.fixture(scope="session")
def image(base_image: str) -> str:
    """The default image: the invoke API."""
    return build(base_image, "invoke")


@pytest.fixture(scope="session")
def exec_image(base_image: str) -> str:
    """The exec API's image (./build.sh --api exec)."""
    return build(base_image, "exec")


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
    command = ["scripts/platform-run.sh", *(["--model-dir", str(model)] if model else [])]
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


@pytest.mark.parametrize("api", ["invoke", "exec"])
def test_the_shipped_case_through_test_sh(
    api: str,
    base_image: str,
    random_model: Path,
    request: pytest.FixtureRequest,
    timings: Timings,
) -> None:
    """./test.sh as a user runs it, with either API: the outputs match the recorded values
    within 1e-4, and the only lines on stderr are warnings (random weights; no lung in the
    phantom)."""
    image = request.getfixturevalue("image" if api == "invoke" else "exec_image")
    started = time.perf_counter()
    done = run(
        [
            "./test.sh",
            *("--tag", image, "--api", api, "--base-image", base_image),
            *("--model-dir", random_model, "--allow-random-weights"),
        ],
        1800,
    )
    timings.since(f"./test.sh --api {api}: the shipped case, full-size random ViT-L", started)
    assert done.returncode == 0, done.stdout + done.stderr
    if api == "invoke":
        healthy = re.search(r"^healthy (\S+) s after the start$", done.stdout, re.MULTILINE)
        invoked = re.search(r"^POST /invoke: 201 in (\S+) s$", done.stdout, re.MULTILINE)
        assert healthy and invoked, done.stdout
        timings.add("invoke, full-size random ViT-L: start to /health 200", float(healthy[1]))
        timings.add("invoke, full-size random ViT-L: the first POST /invoke", float(invoked[1]))
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


def test_the_job_sandbox(exec_image: str, tiny_model: Path, tmp_path: Path) -> None:
    """What a process inside the job can do: uid 1001, no network, writes only to /output
    and an empty /tmp; /input and /opt/ml/model are read-only."""
    write_case(tmp_path / "input", THIN_PHANTOM)
    output = writable_folder(tmp_path / "output")
    done = platform_run(
        exec_image,
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


def test_inputs_json(exec_image: str, tiny_model: Path, tmp_path: Path) -> None:
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
    done = platform_run(exec_image, input_dir, output, tiny_model)
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
    exec_image: str,
    tiny_model: Path,
    tmp_path: Path,
    make_input: Callable[[Path], None],
    message: str,
) -> None:
    make_input(tmp_path / "input")
    output = writable_folder(tmp_path / "output")
    done = platform_run(exec_image, tmp_path / "input", output, tiny_model)
    assert done.returncode == 1
    assert message in the_error(done.stderr)
    assert list(output.iterdir()) == []


def test_an_unwritable_output_folder(exec_image: str, tiny_model: Path, tmp_path: Path) -> None:
    write_case(tmp_path / "input", THIN_PHANTOM)
    output = tmp_path / "output"
    output.mkdir(mode=0o755)  # root's: the image's user cannot write there
    done = platform_run(exec_image, tmp_path / "input", output, tiny_model)
    assert done.returncode == 1
    line = the_error(done.stderr)
    assert line.endswith("/output: the output folder is not writable (Permission denied)"), line
    assert list(output.iterdir()) == []


def test_no_model_files(exec_image: str, tmp_path: Path) -> None:
    """The default image carries no model files: without a model folder at /opt/ml/model
    the job says how to give one."""
    write_case(tmp_path / "input", THIN_PHANTOM)
    output = writable_folder(tmp_path / "output")
    done = platform_run(exec_image, tmp_path / "input", output, None)
    assert done.returncode == 1
    assert "/opt/ml/model: holds no model files, and none are baked into the image" in (
        the_error(done.stderr)
    )
    assert list(output.iterdir()) == []


CLIENT = (REPOSITORY / "scripts" / "invoke_client.py").read_text()


class InvokeContainer:
    """The invoke image started once by platform-run.sh --detach, driven as the shim drives
    it: POST /invoke from inside the container after each case is staged at /input."""

    def __init__(self, engine: str, name: str) -> None:
        self.engine, self.name = engine, name

    def invoke(self) -> tuple[int, float]:
        """The status and the time of one POST /invoke."""
        done = run([self.engine, "exec", self.name, "python", "-c", CLIENT, "invoke", "3600"], 3700)
        status, seconds = done.stdout.split()
        return int(status), float(seconds)

    def stop(self) -> tuple[float, int, str, str]:
        """SIGTERM, and SIGKILL 5 s later as the shim would: the time it took, the exit
        status (0 or 143: it stopped on SIGTERM; 137: it had to be killed), stdout and
        stderr."""
        started = time.perf_counter()
        done = run([self.engine, "stop", "--time", "5", self.name], 60)
        assert done.returncode == 0, done.stderr
        stopped = time.perf_counter() - started
        state = run([self.engine, "inspect", "--format", "{{.State.ExitCode}}", self.name], 60)
        logs = run([self.engine, "logs", self.name], 60)
        return stopped, int(state.stdout.strip()), logs.stdout, logs.stderr


@pytest.fixture
def invoke_container(engine: str) -> Iterator[Callable[..., tuple[InvokeContainer, float]]]:
    """Starts the invoke image (no arguments, as the platform does); removed afterwards."""
    names: list[str] = []

    def start(
        image: str, input_dir: Path, output: Path, model: Path, *engine_args: str
    ) -> tuple[InvokeContainer, float]:
        name = f"stoic-ct-test-{os.getpid()}-{len(names)}"
        names.append(name)
        open_to_all(input_dir)
        command = ["scripts/platform-run.sh", "--model-dir", str(model), "--detach", name]
        command += [f"--engine-arg={a}" for a in engine_args]
        done = run([*command, image, input_dir, output], 600)
        assert done.returncode == 0, done.stdout + done.stderr
        healthy = float(done.stdout.split("healthy ")[1].split(" s")[0])
        return InvokeContainer(engine, name), healthy

    yield start
    for name in names:
        run([engine, "rm", "--force", name], 60)


def stage(staging: Path, make_case: Callable[[Path], object]) -> None:
    """Replace what /input holds with the next case, as the shim does between jobs."""
    for item in staging.iterdir():
        shutil.rmtree(item) if item.is_dir() else item.unlink()
    make_case(staging)
    open_to_all(staging)


def test_three_cases_through_the_invoke_api(
    image: str,
    tiny_model: Path,
    tmp_path: Path,
    invoke_container: Callable[..., tuple[InvokeContainer, float]],
    timings: Timings,
) -> None:
    """One container, healthy once; a scan, a bad input (two images), another scan staged
    at /input in turn: 201 with the host's probabilities (within 1e-6), 422 with nothing
    written, 201; the model loaded once; SIGTERM stops it within the platform's grace."""
    staging, output = tmp_path / "input", writable_folder(tmp_path / "output")
    staging.mkdir()
    stage(staging, lambda root: write_case(root, SMALL_PHANTOM))
    container, healthy = invoke_container(image, staging, output, tiny_model)
    timings.add("invoke: container start to /health 200 (tiny model)", healthy)

    model = Balaitous.from_model_dir(tiny_model)
    cases: list[tuple[str, Callable[[Path], object]]] = [
        ("a scan", lambda root: write_case(root, SMALL_PHANTOM)),
        ("two images", _two_images),
        ("another scan", lambda root: write_case(root, THIN_PHANTOM)),
    ]
    for number, (what, make_case) in enumerate(cases, start=1):
        for item in output.iterdir():
            item.unlink()
        stage(staging, make_case)
        status, seconds = container.invoke()
        timings.add(f"invoke: POST /invoke {number} ({what})", seconds)
        if what == "two images":
            assert status == 422
            assert list(output.iterdir()) == []
            continue
        assert status == 201, what
        scan = read_scan(next((staging / "images" / "ct").iterdir()))
        expected = model.predict(
            scan.volume, demographics_for(scan, read_job_inputs(staging))
        ).probabilities
        got = outputs(output)
        assert abs(got[COVID_OUTPUT] - expected.covid) < 1e-6, what
        assert abs(got[SEVERE_OUTPUT] - expected.severe) < 1e-6, what
    stopped, status, stdout, stderr = container.stop()
    timings.add("invoke: SIGTERM to stopped", stopped)
    assert status in (0, 128 + 15), "it did not stop on SIGTERM: the platform would kill it"
    assert stdout.count("model folder /opt/ml/model: ") == 1  # loaded once for three jobs
    assert stdout.count('"POST /invoke HTTP/1.1" 201') == 2
    assert "/input/images/ct: 2 images found (1.mha, 2.mha)" in the_error(stderr)


def test_the_final_phase_in_the_form_it_ships(
    image: str,
    exec_image: str,
    tiny_model: Path,
    phantom_cohort: Path,
    cohort_masks: Path,
    tmp_path: Path,
    invoke_container: Callable[..., tuple[InvokeContainer, float]],
    timings: Timings,
) -> None:
    """train.py in the image (both systems, tiny models, 48 phantoms), its output packed by
    export.sh as model.tar.gz and extracted at /opt/ml/model, then the invoke image run
    with no argument: it scores with the ensemble the folder's system.json names, as the
    host's process.py --system ensemble does on the same folder (within 1e-6)."""
    cohort = Path(shutil.copytree(phantom_cohort, tmp_path / "cohort"))
    shutil.copytree(cohort_masks, cohort / "masks")
    output = writable_folder(tmp_path / "trained")
    started = time.perf_counter()
    done = platform_run(
        exec_image,
        cohort,
        output,
        tiny_model,
        *("train.py", "--lung-masks", "/input/masks", "--devices", "cpu"),
        *("--folds", "4", "--repeats", "2", "--convnext", "size=micro", "input_size=32"),
        *("epochs=2", "folds=2", "augment=none"),
        engine_args=["--entrypoint=python", "--tmpfs=/scratch:rw,mode=1777"],
    )
    timings.since("final phase: train.py in the image (48 phantoms, tiny)", started)
    assert done.returncode == 0, done.stderr
    warnings = [line for line in done.stderr.splitlines() if line]
    assert all(" WARNING " in line for line in warnings), warnings
    record = json.loads((output / "system.json").read_text())
    assert record["system"] == "ensemble" and record["history"][-1]["cohort"]["scans"] == 48
    assert set(record["history"][-1]["auc"]) >= {"balaitous", "convnext3d", "ensemble"}

    upload = tmp_path / "upload"
    started = time.perf_counter()
    packed = run(
        [
            "./export.sh", "--model-dir", output, "--model-only", "--allow-random-weights",
            "--dest", upload,
        ],
        600,
    )  # fmt: skip
    assert packed.returncode == 0, packed.stdout + packed.stderr
    extracted = tmp_path / "opt-ml-model"
    with tarfile.open(upload / "model.tar.gz") as archive:
        archive.extractall(extracted, filter="data")
    timings.since("final phase: export.sh --model-only, and extraction", started)
    assert (extracted / "system.json").is_file() and (extracted / "ensemble.json").is_file()
    assert (extracted / RANDOM_WEIGHTS_MARKER).is_file()
    open_to_all(extracted)

    case, served = tmp_path / "case", writable_folder(tmp_path / "served")
    write_case(case, THIN_PHANTOM)
    # From another working directory than the image's: the shim starts it from its own.
    container, healthy = invoke_container(image, case, served, extracted, "--workdir=/")
    status, seconds = container.invoke()
    timings.add("final phase: the invoke image on the trained folder, start to healthy", healthy)
    timings.add("final phase: POST /invoke with the ensemble", seconds)
    assert status == 201
    _, _, stdout, _ = container.stop()
    assert "model folder /opt/ml/model: system ensemble (encoder vit); " in stdout
    assert "/opt/ml/model/system.json: ensemble (encoder vit), written by `train.py " in stdout

    host = tmp_path / "host"
    done = run(
        [
            sys.executable, "process.py", "--input", case, "--output", host,
            "--model-dir", extracted, "--model", "ensemble", "--device", "cpu",
        ],
        600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    for name, value in outputs(host).items():
        timings.value(f"final phase: {name}, the invoke container", outputs(served)[name])
        timings.value(f"final phase: {name}, the host's process.py", value)
        assert abs(outputs(served)[name] - value) < 1e-6, name
