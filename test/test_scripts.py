"""build.sh, test.sh and export.sh, run against a stand-in `docker` (no engine here).

The stand-in logs every call and plays the engine's part: `info` and `build` succeed,
`run --entrypoint true` says whether a GPU is available, a real `run` writes two outputs
into the folder mounted at /output, `save` prints some bytes. The scripts run in a copy of
the repository whose model/ holds tiny random files (with a MANIFEST, so that
fetch-weights accepts them without the network).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest

from stoic_ct.model_files import (
    ALL_FILES,
    MANIFEST,
    RANDOM_WEIGHTS_MARKER,
    sha256_of,
    write_manifest,
)

REPOSITORY = Path(__file__).resolve().parent.parent
SCRIPTS = ("build.sh", "test.sh", "export.sh")

FAKE_DOCKER = r"""#!/usr/bin/env bash
printf '%s\n' "$*" >> "$DOCKER_LOG"
case "$1" in
    info) exit "${DOCKER_INFO_RC:-0}" ;;
    build) exit 0 ;;
    save) echo "image bytes"; exit 0 ;;
    run)
        for arg in "$@"; do [ "$arg" = true ] && exit "${DOCKER_GPU_RC:-0}"; done
        previous=""
        for arg in "$@"; do
            if [ "$previous" = --volume ] && [[ "$arg" == *:/output ]]; then
                out="${arg%:/output}"
                echo "${COVID:-0.25}" > "$out/probability-covid-19.json"
                echo 0.5 > "$out/probability-severe-covid-19.json"
            fi
            previous="$arg"
        done
        exit 0 ;;
esac
exit 3
"""


@pytest.fixture
def checkout(tmp_path: Path, tiny_model_dir: Path) -> Path:
    """A copy of the scripts beside links to the code, .venv and test case, and a model/."""
    root = tmp_path / "repo"
    (root / "scripts").mkdir(parents=True)
    for script in SCRIPTS:
        shutil.copy2(REPOSITORY / script, root / script)
    shutil.copy2(REPOSITORY / "scripts" / "args.sh", root / "scripts" / "args.sh")
    for name in ("stoic_ct", ".venv", "test"):
        (root / name).symlink_to(REPOSITORY / name)
    model = root / "model"
    model.mkdir()
    for spec in ALL_FILES:
        shutil.copy2(tiny_model_dir / spec.name, model / spec.name)
    write_manifest(model, {spec.name: sha256_of(model / spec.name) for spec in ALL_FILES})
    return root


@pytest.fixture
def docker(tmp_path: Path) -> dict[str, str]:
    """Environment whose PATH finds the stand-in docker first; its log file is DOCKER_LOG."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "docker").write_text(FAKE_DOCKER)
    (bin_dir / "docker").chmod(0o755)
    return {
        **os.environ,
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "DOCKER_LOG": str(tmp_path / "docker.log"),
    }


def run(script: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(script), *args], env=env, capture_output=True, text=True, timeout=300, cwd="/"
    )


def calls(env: dict[str, str]) -> list[str]:
    log = Path(env["DOCKER_LOG"])
    return log.read_text().splitlines() if log.exists() else []


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_and_bad_arguments(script: str) -> None:
    done = subprocess.run([str(REPOSITORY / script), "--help"], capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.startswith(f"Usage: ./{script}")
    done = subprocess.run(
        [str(REPOSITORY / script), "--frobnicate"], capture_output=True, text=True
    )
    assert done.returncode == 2 and "unknown argument '--frobnicate'" in done.stderr


def test_no_docker(checkout: Path, tmp_path: Path) -> None:
    bare = tmp_path / "bare-bin"  # what the script needs before it looks for docker
    bare.mkdir()
    (bare / "dirname").symlink_to(shutil.which("dirname") or "/usr/bin/dirname")
    done = subprocess.run(
        ["/bin/bash", str(checkout / "build.sh")],
        env={"PATH": str(bare)},
        capture_output=True,
        text=True,
        cwd="/",
    )
    assert done.returncode == 1
    assert "docker is not installed or not on PATH" in done.stderr


def test_engine_down(checkout: Path, docker: dict[str, str]) -> None:
    done = run(checkout / "build.sh", {**docker, "DOCKER_INFO_RC": "1"})
    assert done.returncode == 1 and "cannot reach the Docker engine" in done.stderr


def test_build(checkout: Path, docker: dict[str, str]) -> None:
    done = run(checkout / "build.sh", docker, "--tag", "mine")
    assert done.returncode == 0, done.stderr
    assert calls(docker)[-1] == f"build --tag mine {checkout}"
    assert "present and matches the MANIFEST" in done.stderr


def test_build_refuses_random_weights(checkout: Path, docker: dict[str, str]) -> None:
    (checkout / "model" / RANDOM_WEIGHTS_MARKER).write_text("random")
    done = run(checkout / "build.sh", docker)
    assert done.returncode == 1 and "randomly initialised weights" in done.stderr
    assert not any(c.startswith("build") for c in calls(docker))


def test_build_stops_on_a_missing_model_file(checkout: Path, docker: dict[str, str]) -> None:
    """The missing file cannot be fetched here (no network): the message says where to get it."""
    (checkout / "model" / "vitl_16_pt22k.pth").unlink()
    done = run(checkout / "build.sh", {**docker, "no_proxy": "*"})
    assert done.returncode == 1
    assert "https://zenodo.org/record/6547999/files/vitl_16_pt22k.pth" in done.stderr
    assert f"-> {checkout}/model/vitl_16_pt22k.pth" in done.stderr
    assert "the image was not built" in done.stderr
    assert not any(c.startswith("build") for c in calls(docker))


def test_test_script_runs_as_the_platform(checkout: Path, docker: dict[str, str]) -> None:
    done = run(checkout / "test.sh", docker)
    assert done.returncode == 0, done.stderr
    run_call = calls(docker)[-1]
    for flag in (
        "--gpus all",
        "--network none",
        "--memory=16g",
        "--cap-drop=ALL",
        "--security-opt=no-new-privileges",
        "--pids-limit 256",
        "--shm-size=128m",
        f"--volume {checkout}/test/input:/input:ro",
    ):
        assert flag in run_call, flag
    assert "format and range ok" in done.stdout and "not compared" in done.stdout


def test_test_script_without_gpu(checkout: Path, docker: dict[str, str]) -> None:
    done = run(checkout / "test.sh", {**docker, "DOCKER_GPU_RC": "1"})
    assert done.returncode == 0, done.stderr
    assert "cannot give this container a GPU" in done.stderr
    assert "--gpus" not in calls(docker)[-1]


def test_test_script_fails_on_a_bad_output(checkout: Path, docker: dict[str, str]) -> None:
    done = run(checkout / "test.sh", {**docker, "COVID": "1.7"})
    assert done.returncode == 1
    assert "1.7 is not a probability" in done.stdout


def test_test_script_compares_recorded_values(
    checkout: Path, docker: dict[str, str], tmp_path: Path
) -> None:
    """With expected values for these model files, a different output fails."""
    expected = tmp_path / "expected.json"
    key = {"sha256": {spec.name: sha256_of(checkout / "model" / spec.name) for spec in ALL_FILES}}
    expected.write_text(
        json.dumps(
            {
                "cases": [
                    {
                        "note": "trusted",
                        "model": key,
                        "outputs": {
                            "probability-covid-19.json": 0.3,
                            "probability-severe-covid-19.json": 0.5,
                        },
                    }
                ]
            }
        )
    )
    (checkout / "test").unlink()
    shutil.copytree(REPOSITORY / "test" / "input", checkout / "test" / "input")
    shutil.copy2(expected, checkout / "test" / "expected_output.json")
    # stoic_ct.expected reads test/expected_output.json beside the package it runs from.
    (checkout / "stoic_ct").unlink()
    shutil.copytree(
        REPOSITORY / "stoic_ct", checkout / "stoic_ct", ignore=shutil.ignore_patterns("__pycache__")
    )
    done = run(checkout / "test.sh", docker)
    assert done.returncode == 1
    assert "probability-covid-19.json 0.250000 instead of 0.300000" in done.stdout
    done = run(checkout / "test.sh", {**docker, "COVID": "0.30004"})
    assert done.returncode == 0 and "match the expected values" in done.stdout


def test_export(checkout: Path, docker: dict[str, str]) -> None:
    done = run(checkout / "export.sh", docker, "--tag", "mine")
    assert done.returncode == 0, done.stderr
    assert "save mine" in calls(docker)
    assert (checkout / "mine.tar.gz").is_file()
    with tarfile.open(checkout / "model.tar.gz") as archive:
        assert sorted(archive.getnames()) == sorted([*(s.name for s in ALL_FILES), MANIFEST])
