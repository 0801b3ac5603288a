"""The invoke API as the platform's shim drives it: `python -m stoic_ct serve` in its own
process, /health polled, cases staged behind a symbolic link /input one after another,
POST /invoke for each, SIGTERM at the end; and the service's states, in this process."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from helpers import SMALL_PHANTOM, THIN_PHANTOM, write_case
from stoic_ct.errors import ModelFileError
from stoic_ct.inference.pipeline import Balaitous
from stoic_ct.inference.prediction import Prediction
from stoic_ct.io.contract import Probabilities, demographics_for, read_job_inputs
from stoic_ct.io.demographics import Demographics
from stoic_ct.io.imageio import read_scan
from stoic_ct.io.output_names import COVID_OUTPUT, SEVERE_OUTPUT
from stoic_ct.io.volume import Volume
from stoic_ct.serving import InvokeService, JobFolders

REPOSITORY = Path(__file__).resolve().parent.parent
# The platform's shim sends SIGKILL this long after SIGTERM.
SIGTERM_GRACE_S = 5


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def call(port: int, route: str, timeout: float = 600) -> tuple[int, dict[str, object]]:
    """(status, JSON body) of GET /health or POST /invoke (no body, as the shim sends)."""
    method, data = ("GET", None) if route == "health" else ("POST", b"")
    request = urllib.request.Request(f"http://127.0.0.1:{port}/{route}", method=method, data=data)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        text = error.read().decode("utf-8", "replace")
        return error.code, json.loads(text) if text.startswith("{") else {"text": text}


class Server:
    """`python -m stoic_ct serve` in a process of its own (its own group, as the shim
    starts it), its stdout and stderr in files."""

    def __init__(
        self, work: Path, model_dir: Path, input_dir: Path, output: Path, pid1: bool = False
    ) -> None:
        """With `pid1` the server is the first process of a PID namespace of its own, as in
        a container: the kernel then ignores the signals it has no handler for."""
        self.port, self.pid1 = free_port(), pid1
        self.stdout, self.stderr = work / "stdout", work / "stderr"
        command = [
            sys.executable, "-m", "stoic_ct", "serve", "--model-dir", str(model_dir),
            "--input", str(input_dir), "--output", str(output), "--device", "cpu",
            "--host", "127.0.0.1", "--port", str(self.port),
        ]  # fmt: skip
        if pid1:
            namespace = ["unshare", "--pid", "--fork", "--mount-proc"]
            if os.geteuid() != 0:
                namespace[1:1] = ["--user", "--map-root-user"]
            command = [*namespace, *command]
        with self.stdout.open("w") as out, self.stderr.open("w") as err:
            self.process = subprocess.Popen(
                command, cwd=REPOSITORY, stdout=out, stderr=err, start_new_session=True
            )

    @property
    def server_pid(self) -> int:
        """The server's process id, as this process sees it."""
        if not self.pid1:
            return self.process.pid
        children = Path(f"/proc/{self.process.pid}/task/{self.process.pid}/children")
        return int(children.read_text().split()[0])

    def wait_healthy(self, deadline_s: float = 300) -> list[int]:
        """Poll /health as the shim does (a refused connection or another status: again),
        until 200; returns the statuses seen (0: refused)."""
        seen, started = [], time.monotonic()
        while time.monotonic() - started < deadline_s:
            assert self.process.poll() is None, self.stderr.read_text()
            try:
                status, _ = call(self.port, "health", timeout=10)
            except OSError:
                status = 0
            seen.append(status)
            if status == 200:
                return seen
            time.sleep(0.2)
        raise AssertionError(f"not healthy within {deadline_s} s: {seen}")

    def terminate(self) -> int:
        """SIGTERM to the server (to its process group, as the shim sends it, unless it is
        a namespace's first process); the exit status (uvicorn stops gracefully, then
        ends the process with the signal it received where the kernel lets it)."""
        if self.pid1:
            os.kill(self.server_pid, signal.SIGTERM)
        else:
            os.killpg(self.process.pid, signal.SIGTERM)
        try:
            return self.process.wait(timeout=SIGTERM_GRACE_S)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            raise AssertionError("still running when the shim would SIGKILL it") from None


@pytest.fixture
def server_factory(tmp_path: Path) -> Iterator[list[Server]]:
    started: list[Server] = []
    yield started
    for server in started:
        if server.process.poll() is None:
            os.killpg(server.process.pid, signal.SIGKILL)
            server.process.wait()


def stage(link: Path, case: Path) -> None:
    """Point /input at the next case's staged folder, as the shim does."""
    if link.is_symlink():
        link.unlink()
    link.symlink_to(case, target_is_directory=True)


def empty(output: Path) -> None:
    for item in output.iterdir():
        item.unlink()


def outputs(folder: Path) -> dict[str, float]:
    return {p.name: json.loads(p.read_text()) for p in sorted(folder.iterdir())}


def test_three_cases_in_a_row_as_the_shim_runs_them(
    tiny_model_dir: Path, tmp_path: Path, server_factory: list[Server]
) -> None:
    """A scan, a bad input, another scan: 201 with the outputs the model gives in this
    process, 422 with one error line and nothing written (the server stays healthy), 201;
    the model loaded once; uvicorn's lines on stdout; SIGTERM stops it in the grace."""
    staged = tmp_path / "staged"
    first = write_case(staged / "1-input", SMALL_PHANTOM)
    for name in ("a.mha", "b.mha"):
        write_case(staged / "2-input", THIN_PHANTOM, name)
    third = write_case(staged / "3-input", THIN_PHANTOM)
    link, output = tmp_path / "input", tmp_path / "output"
    output.mkdir()
    stage(link, staged / "1-input")
    server = Server(tmp_path, tiny_model_dir, link, output)
    server_factory.append(server)
    server.wait_healthy()

    model = Balaitous.from_model_dir(tiny_model_dir)
    for number, (case, image) in enumerate(
        [("1-input", first), ("2-input", None), ("3-input", third)], start=1
    ):
        empty(output)
        stage(link, staged / case)
        status, body = call(server.port, "invoke")
        if image is None:
            assert status == 422, body
            assert "2 images found (a.mha, b.mha)" in str(body["error"])
            assert list(output.iterdir()) == []
            assert call(server.port, "health")[0] == 200
            continue
        assert status == 201, (number, body, server.stderr.read_text())
        scan = read_scan(image)
        expected = model.predict(scan.volume, demographics_for(scan, read_job_inputs(link)))
        got = outputs(output)
        assert got == {
            COVID_OUTPUT: pytest.approx(expected.probabilities.covid, abs=1e-6),
            SEVERE_OUTPUT: pytest.approx(expected.probabilities.severe, abs=1e-6),
        }
        assert body["covid"] == got[COVID_OUTPUT]

    assert server.terminate() == -signal.SIGTERM
    stdout, stderr = server.stdout.read_text(), server.stderr.read_text()
    assert stdout.count("model folder ") == 1  # loaded once, for three jobs
    assert "Uvicorn running on http://127.0.0.1:" in stdout
    assert '"POST /invoke HTTP/1.1" 422' in stdout and "Uvicorn" not in stderr
    errors = [line for line in stderr.splitlines() if " ERROR " in line]
    assert len(errors) == 1 and f"{link}/images/ct: 2 images found" in errors[0], stderr
    assert all(" WARNING " in line for line in stderr.splitlines() if line not in errors)


def test_a_model_that_cannot_load_stops_the_server(
    tmp_path: Path, server_factory: list[Server]
) -> None:
    """The error on stderr, naming the file; status 1 (the shim would otherwise poll an
    unhealthy server for 300 s)."""
    empty_model = tmp_path / "model"
    empty_model.mkdir()
    server = Server(tmp_path, empty_model, tmp_path, tmp_path / "output")
    server_factory.append(server)
    assert server.process.wait(timeout=120) == 1
    errors = [line for line in server.stderr.read_text().splitlines() if " ERROR " in line]
    assert len(errors) == 1 and f"{empty_model}/balaitous.npz: is missing" in errors[0]


@pytest.mark.parametrize("pid1", [False, True], ids=["process", "container-init"])
def test_sigterm_during_a_job(
    pid1: bool, tiny_model_dir: Path, tmp_path: Path, server_factory: list[Server]
) -> None:
    """The platform stops the server when a job's time is up: it exits within the grace,
    also as a container's first process, and the job's outputs are not written."""
    write_case(tmp_path / "case", SMALL_PHANTOM)
    output = tmp_path / "output"
    output.mkdir()
    server = Server(tmp_path, tiny_model_dir, tmp_path / "case", output, pid1=pid1)
    server_factory.append(server)
    server.wait_healthy()
    answers: list[object] = []

    def invoke() -> None:
        try:
            answers.append(call(server.port, "invoke"))
        except OSError as error:
            answers.append(error)

    caller = threading.Thread(target=invoke)
    caller.start()
    while "job 1:" not in server.stdout.read_text():
        time.sleep(0.05)
    status = server.terminate()
    assert status == (0 if pid1 else -signal.SIGTERM), server.stderr.read_text()
    if pid1:  # the kernel ignored uvicorn's second signal: the job was abandoned here
        assert "stopped during job 1: its outputs are not written" in server.stderr.read_text()
    caller.join(timeout=30)
    assert not any(p.name.startswith("probability") for p in output.iterdir())
    assert not answers or not isinstance(answers[0], tuple) or answers[0][0] != 201


class Waiting:
    """A system whose predictions wait for `release`."""

    def __init__(self) -> None:
        self.release, self.started = threading.Event(), threading.Event()

    def predict(
        self, volume: Volume, demographics: Demographics, lung_labels: Volume | None = None
    ) -> Prediction:
        self.started.set()
        assert self.release.wait(timeout=60)
        return Prediction(Probabilities(covid=0.25, severe=0.5), {})


def test_health_while_loading_then_ready(tmp_path: Path) -> None:
    gate, model = threading.Event(), Waiting()

    def load() -> Waiting:
        assert gate.wait(timeout=60)
        return model

    service = InvokeService(load, JobFolders(tmp_path, tmp_path / "output"))
    service.start_loading()
    assert service.health() == (503, {"status": "loading"})
    assert service.invoke()[0] == 503
    gate.set()
    assert service.loaded.wait(timeout=60)
    assert service.health() == (200, {"status": "ready", "jobs": 0})


def test_one_job_at_a_time(tmp_path: Path) -> None:
    write_case(tmp_path / "input", THIN_PHANTOM)
    model = Waiting()
    service = InvokeService(lambda: model, JobFolders(tmp_path / "input", tmp_path / "output"))
    service.start_loading()
    assert service.loaded.wait(timeout=60)
    first: list[tuple[int, dict[str, object]]] = []
    runner = threading.Thread(target=lambda: first.append(service.invoke()))
    runner.start()
    assert model.started.wait(timeout=60)
    assert service.invoke()[0] == 409
    model.release.set()
    runner.join(timeout=60)
    assert first[0][0] == 201 and service.health()[1]["jobs"] == 1


def test_a_failed_load_is_reported(tmp_path: Path) -> None:
    def load() -> Waiting:
        raise ModelFileError("is missing", tmp_path / "x.pth")

    stopped = threading.Event()
    service = InvokeService(load, JobFolders(tmp_path, tmp_path))
    service.start_loading(on_failure=stopped.set).join(timeout=60)
    assert stopped.is_set()
    assert service.health() == (500, {"status": "failed", "error": f"{tmp_path}/x.pth: is missing"})


def test_the_image_entry_point_needs_no_argument() -> None:
    """The platform starts the invoke image with no argument: every default is the
    container's (/input, /output, /opt/ml/model or the baked model/, port 4743)."""
    from stoic_ct.cli import _parser

    args = _parser().parse_args(["serve"])
    assert (args.input, args.output, args.port, args.model_dir, args.system) == (
        Path("/input"),
        Path("/output"),
        4743,
        None,
        None,
    )
