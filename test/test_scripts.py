"""build.sh, test.sh, export.sh and platform-run.sh, run against a stand-in `docker`.

The container test (test/container/) builds and runs the real image; these check in
seconds what it cannot: the choice of engine, GPU requests, the refusals, the options. The
stand-in logs every call and plays the engine's part: `info` answers (with or without the
NVIDIA runtime), `image inspect` finds every image, `history` lists two layers, a `run`
writes two outputs into the folder mounted at /output and a warning on stderr, `save`
prints some bytes. The scripts run in a copy of the repository whose model/ holds tiny
random files (with a MANIFEST, so that fetch-weights accepts them without the network) and
whose scripts/wheelhouse.sh only logs (the container test runs the real one).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest

from stoic_ct.weights.model_files import (
    ALL_FILES,
    MANIFEST,
    RANDOM_WEIGHTS_MARKER,
    SYSTEM_RECORD,
    sha256_of,
    write_manifest,
)
from stoic_ct.weights.system_record import origin, write_system_record

REPOSITORY = Path(__file__).resolve().parent.parent
SCRIPTS = ("build.sh", "test.sh", "export.sh")
PINNED_BASE = re.search(
    r"^ARG BASE_IMAGE=(\S+)$", (REPOSITORY / "Dockerfile").read_text(), flags=re.MULTILINE
)

FAKE_DOCKER = r"""#!/usr/bin/env bash
all="$*"
printf '%s\n' "${all//$'\n'/ }" >> "$DOCKER_LOG"
write_outputs() {
    echo "${COVID:-0.25}" > "$1/probability-covid-19.json"
    echo 0.5 > "$1/probability-severe-covid-19.json"
}
case "$1" in
    info)
        [ "${DOCKER_INFO_RC:-0}" = 0 ] || exit "$DOCKER_INFO_RC"
        [ "$2" = --format ] && echo "${DOCKER_RUNTIMES:-{\"runc\":{}\}}"
        exit 0 ;;
    image)
        case "$*" in *Labels*) echo "${API_LABEL-invoke}"; exit 0 ;; esac
        [ "$3" = --format ] && echo 2000000000; exit 0 ;;
    history)
        # The base image's one layer under the Dockerfile's three.
        [ "$2" = --quiet ] && case "$3" in
            *pytorch*|*base*) echo c; exit 0 ;;
            *) printf 'a\nb\nc\n'; exit 0 ;;
        esac
        printf '700MB\tRUN pip install\n1.5kB\tCOPY stoic_ct\n0B\tUSER 1001\n'; exit 0 ;;
    build) exit 0 ;;
    save) echo "image bytes"; exit 0 ;;
    run)
        previous="" out=""
        for arg in "$@"; do
            [ "$previous" = --volume ] && [[ "$arg" == *:/output ]] && out="${arg%:/output}"
            previous="$arg"
        done
        if [[ " $* " == *" --detach "* ]]; then
            echo "$out" > "$DOCKER_LOG.output"  # the invoke API: outputs at POST /invoke
            echo 0123abcd
            exit 0
        fi
        write_outputs "$out"
        echo "12:00:00 WARNING a warning the platform would show" >&2
        exit 0 ;;
    exec)
        call="${*: -2:1}"
        if [ "$call" = health ]; then
            echo "200 0.010"
            exit 0
        fi
        [ "${INVOKE_STATUS:-201}" != 201 ] || write_outputs "$(cat "$DOCKER_LOG.output")"
        echo "${INVOKE_STATUS:-201} 1.500"
        [ "${INVOKE_STATUS:-201}" = 201 ]; exit ;;
    inspect) echo true; exit 0 ;;
    stop|rm) exit 0 ;;
    logs)
        echo "12:00:00 WARNING a warning the platform would show" >&2
        echo "12:00:00 INFO model loaded"
        exit 0 ;;
esac
exit 3
"""

FAKE_WHEELHOUSE = """#!/usr/bin/env bash
printf 'wheelhouse %s\\n' "$*" >> "$DOCKER_LOG"
"""


@pytest.fixture
def checkout(tmp_path: Path, tiny_model_dir: Path) -> Path:
    """A copy of the scripts beside links to the code, .venv and test case, and a model/."""
    root = tmp_path / "repo"
    (root / "scripts").mkdir(parents=True)
    for script in (*SCRIPTS, "Dockerfile"):
        shutil.copy2(REPOSITORY / script, root / script)
    for script in (
        *("args.sh", "engine.sh", "model.sh", "platform-run.sh", "invoke_client.py"),
        *("__init__.py", "check_outputs.py"),
    ):
        shutil.copy2(REPOSITORY / "scripts" / script, root / "scripts" / script)
    (root / "scripts" / "wheelhouse.sh").write_text(FAKE_WHEELHOUSE)
    (root / "scripts" / "wheelhouse.sh").chmod(0o755)
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
    # A podman that never answers, whether or not this machine has a real one.
    (bin_dir / "podman").write_text("#!/bin/sh\nexit 125\n")
    (bin_dir / "podman").chmod(0o755)
    environment = {k: v for k, v in os.environ.items() if k != "CONTAINER_ENGINE"}
    return {
        **environment,
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "DOCKER_LOG": str(tmp_path / "docker.log"),
    }


def run(script: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(script), *args], env=env, capture_output=True, text=True, timeout=300, cwd="/"
    )


def calls(env: dict[str, str], verb: str | None = None) -> list[str]:
    """The stand-in's calls (and wheelhouse.sh's), those starting with `verb` if given."""
    log = Path(env["DOCKER_LOG"])
    lines = log.read_text().splitlines() if log.exists() else []
    return [c for c in lines if verb is None or c.startswith(f"{verb} ")]


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_and_bad_arguments(script: str) -> None:
    done = subprocess.run([str(REPOSITORY / script), "--help"], capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.startswith(f"Usage: ./{script}")
    done = subprocess.run(
        [str(REPOSITORY / script), "--frobnicate"], capture_output=True, text=True
    )
    assert done.returncode == 2 and "unknown argument '--frobnicate'" in done.stderr


def test_options_a_script_does_not_take() -> None:
    """export.sh uploads the model separately: it takes no --bake-model."""
    done = subprocess.run(
        [str(REPOSITORY / "export.sh"), "--bake-model"], capture_output=True, text=True
    )
    assert done.returncode == 2 and "unknown argument '--bake-model'" in done.stderr


def test_no_engine(checkout: Path, tmp_path: Path) -> None:
    bare = tmp_path / "bare-bin"  # what the scripts need before they look for an engine
    bare.mkdir()
    for tool in ("dirname", "sed"):
        (bare / tool).symlink_to(shutil.which(tool) or f"/usr/bin/{tool}")
    done = subprocess.run(
        ["/bin/bash", str(checkout / "build.sh")],
        env={"PATH": str(bare)},
        capture_output=True,
        text=True,
        cwd="/",
    )
    assert done.returncode == 1
    assert "no container engine: install Docker or podman" in done.stderr


def test_docker_engine_down(checkout: Path, docker: dict[str, str]) -> None:
    done = run(checkout / "build.sh", {**docker, "DOCKER_INFO_RC": "1"})
    assert done.returncode == 1
    assert "cannot reach the Docker engine" in done.stderr
    assert "podman is not usable either" in done.stderr


def test_the_engine_can_be_chosen(checkout: Path, docker: dict[str, str]) -> None:
    done = run(checkout / "build.sh", {**docker, "CONTAINER_ENGINE": "nerdctl"})
    assert done.returncode == 1
    assert "CONTAINER_ENGINE=nerdctl is not on PATH" in done.stderr


def test_build(checkout: Path, docker: dict[str, str]) -> None:
    """The default image holds no model files: nothing in model/ is fetched or checked."""
    (checkout / "model" / "vitl_16_ct.pth").unlink()
    done = run(checkout / "build.sh", docker, "--tag", "mine")
    assert done.returncode == 0, done.stderr
    assert PINNED_BASE is not None
    base = PINNED_BASE.group(1)
    assert calls(docker, "wheelhouse") == [f"wheelhouse {base} {checkout}/wheelhouse"]
    assert calls(docker, "build") == [
        f"build --target invoke --build-arg BASE_IMAGE={base} --tag mine {checkout}"
    ]
    assert "MANIFEST" not in done.stderr
    # The size report: both sizes, and the layers the Dockerfile adds (not the empty one).
    assert "2.0GB, of which the base 2.0GB; the layers added:" in done.stdout
    assert "700MB  RUN pip install" in done.stdout and "USER 1001" not in done.stdout


def test_build_on_another_base(checkout: Path, docker: dict[str, str]) -> None:
    done = run(checkout / "build.sh", docker, "--base-image", "mine/base:1")
    assert done.returncode == 0, done.stderr
    assert "--build-arg BASE_IMAGE=mine/base:1" in calls(docker, "build")[0]
    assert calls(docker, "wheelhouse")[0].startswith("wheelhouse mine/base:1 ")


def test_bake_model(checkout: Path, docker: dict[str, str]) -> None:
    done = run(checkout / "build.sh", docker, "--bake-model")
    assert done.returncode == 0, done.stderr
    assert "present and matches the MANIFEST" in done.stderr
    assert "--target invoke-model-baked" in calls(docker, "build")[0]
    done = run(checkout / "build.sh", docker, "--bake-model", "--api", "exec")
    assert done.returncode == 0, done.stderr
    assert "--target exec-model-baked" in calls(docker, "build")[-1]


def test_build_the_exec_image(checkout: Path, docker: dict[str, str]) -> None:
    done = run(checkout / "build.sh", docker, "--api", "exec")
    assert done.returncode == 0, done.stderr
    assert "--target exec " in calls(docker, "build")[0]
    done = run(checkout / "build.sh", docker, "--api", "batch")
    assert done.returncode == 2 and "--api must be invoke or exec, not 'batch'" in done.stderr


def test_bake_model_refuses_random_weights(checkout: Path, docker: dict[str, str]) -> None:
    (checkout / "model" / RANDOM_WEIGHTS_MARKER).write_text("random")
    done = run(checkout / "build.sh", docker, "--bake-model")
    assert done.returncode == 1 and "randomly initialised weights" in done.stderr
    assert "--allow-random-weights" in done.stderr
    assert calls(docker, "build") == []
    done = run(checkout / "build.sh", docker, "--bake-model", "--allow-random-weights")
    assert done.returncode == 0, done.stderr
    assert "RANDOMLY INITIALISED weights (--allow-random-weights)" in done.stderr
    assert "--target invoke-model-baked" in calls(docker, "build")[0]


def test_bake_model_stops_on_a_missing_model_file(checkout: Path, docker: dict[str, str]) -> None:
    """The missing file cannot be fetched here (no network): the message says where to get it."""
    (checkout / "model" / "vitl_16_pt22k.pth").unlink()
    done = run(checkout / "build.sh", {**docker, "no_proxy": "*"}, "--bake-model")
    assert done.returncode == 1
    assert "https://zenodo.org/record/6547999/files/vitl_16_pt22k.pth" in done.stderr
    assert f"-> {checkout}/model/vitl_16_pt22k.pth" in done.stderr
    assert "does not hold the four checked model files" in done.stderr
    assert calls(docker, "build") == []


PLATFORM_FLAGS = (
    "--network none",
    "--memory=8g --memory-swap=8g",
    "--ulimit data=8589934592:8589934592",  # the shim's RLIMIT_DATA: the job's memory
    "--cap-drop=ALL",
    "--security-opt=no-new-privileges",
    "--pids-limit 256",
    "--shm-size=128m",
    "--read-only",
    "--tmpfs /tmp:rw,exec,mode=1777",
)


def test_test_script_runs_as_the_platform(checkout: Path, docker: dict[str, str]) -> None:
    """The default (invoke) image: started once, /health polled from inside the container,
    one POST /invoke, stopped with SIGTERM; its stderr listed."""
    done = run(checkout / "test.sh", docker)
    assert done.returncode == 0, done.stderr
    run_call = calls(docker, "run")[-1]
    for flag in (
        *PLATFORM_FLAGS,
        "--detach --name stoic-invoke-",
        f"--volume {REPOSITORY}/test/input:/input:ro",  # the checkout's test/ links there
        f"--volume {checkout}/model:/opt/ml/model:ro",
    ):
        assert flag in run_call, flag
    assert "--gpus" not in run_call
    name = run_call.split("--name ")[1].split()[0]
    exec_calls = calls(docker, "exec")
    assert [c.split()[-2:] for c in exec_calls] == [["health", "10"], ["invoke", "3600"]]
    assert all(c.startswith(f"exec {name} python -c ") for c in exec_calls)
    assert calls(docker, "stop") == [f"stop --time 5 {name}"]
    assert calls(docker, "rm") == [f"rm --force {name}"]
    assert "the job runs on the CPU" in done.stdout
    assert "POST /invoke: 201 in 1.500 s" in done.stdout
    assert "format and range ok" in done.stdout and "not compared" in done.stdout
    assert "the container wrote 1 line(s) to stderr" in done.stdout
    assert "    12:00:00 WARNING a warning the platform would show" in done.stdout


def test_test_script_with_the_exec_api(checkout: Path, docker: dict[str, str]) -> None:
    """The exec image runs to completion; platform-run.sh reads the API from its label."""
    done = run(checkout / "test.sh", {**docker, "API_LABEL": "exec"}, "--api", "exec")
    assert done.returncode == 0, done.stderr
    assert "--target exec " in calls(docker, "build")[0]
    run_call = calls(docker, "run")[-1]
    assert all(flag in run_call for flag in PLATFORM_FLAGS)
    assert run_call.startswith("run --rm ") and "--detach" not in run_call
    assert calls(docker, "exec") == []
    assert "the container wrote 1 line(s) to stderr" in done.stdout


def test_a_failed_invoke_fails_the_test(checkout: Path, docker: dict[str, str]) -> None:
    done = run(checkout / "test.sh", {**docker, "INVOKE_STATUS": "422"})
    assert done.returncode == 1
    assert "POST /invoke: 422" in done.stdout
    assert len(calls(docker, "stop")) == 1  # the server is stopped all the same


def test_a_gpu_only_where_the_engine_can_give_one(checkout: Path, docker: dict[str, str]) -> None:
    runtimes = json.dumps({"nvidia": {"path": "nvidia-container-runtime"}, "runc": {}})
    done = run(checkout / "test.sh", {**docker, "DOCKER_RUNTIMES": runtimes})
    assert done.returncode == 0, done.stderr
    assert "--gpus all --network none" in calls(docker, "run")[-1]
    assert "runs on the CPU" not in done.stdout


def test_test_script_with_a_baked_model(checkout: Path, docker: dict[str, str]) -> None:
    done = run(checkout / "test.sh", docker, "--bake-model")
    assert done.returncode == 0, done.stderr
    assert "--target invoke-model-baked" in calls(docker, "build")[0]
    assert "/opt/ml/model" not in calls(docker, "run")[-1]
    done = run(checkout / "test.sh", docker, "--bake-model", "--model-dir", "x")
    assert done.returncode == 2 and "it takes no --model-dir" in done.stderr


def test_test_script_with_random_weights(
    checkout: Path, docker: dict[str, str], tmp_path: Path
) -> None:
    random = Path(shutil.copytree(checkout / "model", tmp_path / "random"))
    (random / RANDOM_WEIGHTS_MARKER).write_text("random")
    done = run(checkout / "test.sh", docker, "--model-dir", str(random))
    assert done.returncode == 1 and "pass --allow-random-weights for a test" in done.stderr
    assert calls(docker, "run") == []
    done = run(checkout / "test.sh", docker, "--model-dir", str(random), "--allow-random-weights")
    assert done.returncode == 0, done.stderr
    assert f"--volume {random}:/opt/ml/model:ro" in calls(docker, "run")[-1]


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
    done = run(checkout / "test.sh", docker)
    assert done.returncode == 1
    assert "probability-covid-19.json 0.250000 instead of 0.300000" in done.stdout
    done = run(checkout / "test.sh", {**docker, "COVID": "0.30004"})
    assert done.returncode == 0 and "match the expected values" in done.stdout


def test_export(checkout: Path, docker: dict[str, str]) -> None:
    done = run(checkout / "export.sh", docker, "--tag", "mine")
    assert done.returncode == 0, done.stderr
    assert "--target invoke " in calls(docker, "build")[0]
    assert "save mine" in calls(docker)
    assert (checkout / "mine.tar.gz").is_file()
    with tarfile.open(checkout / "model.tar.gz") as archive:
        assert sorted(archive.getnames()) == sorted([*(s.name for s in ALL_FILES), MANIFEST])


def test_export_refuses_random_weights(checkout: Path, docker: dict[str, str]) -> None:
    (checkout / "model" / RANDOM_WEIGHTS_MARKER).write_text("random")
    done = run(checkout / "export.sh", docker)
    assert done.returncode == 1 and "randomly initialised weights" in done.stderr
    assert calls(docker, "build") == [] and calls(docker, "save") == []
    assert not (checkout / "model.tar.gz").exists()


def test_export_a_trained_folder(checkout: Path, docker: dict[str, str], tmp_path: Path) -> None:
    """A folder with a system.json is checked against its MANIFEST (check-model), with no
    download; --model-only packs it alone, the random weights' marker with it."""
    folder = Path(shutil.copytree(checkout / "model", tmp_path / "trained"))
    (folder / RANDOM_WEIGHTS_MARKER).write_text("random")
    write_system_record(folder, "balaitous", "vit", origin("a test"))
    out = tmp_path / "upload"
    arguments = ["--model-dir", str(folder), "--model-only", "--dest", str(out)]
    done = run(checkout / "export.sh", docker, *arguments, "--allow-random-weights")
    assert done.returncode == 0, done.stderr
    assert "system balaitous (encoder vit)" in done.stdout
    assert calls(docker, "build") == [] and not (out / "stoic-balaitous.tar.gz").exists()
    with tarfile.open(out / "model.tar.gz") as archive:
        names = sorted(archive.getnames())
    assert names == sorted(
        [*(s.name for s in ALL_FILES), SYSTEM_RECORD.name, RANDOM_WEIGHTS_MARKER, MANIFEST]
    )
    (folder / "balaitous.npz").write_bytes(b"changed")
    done = run(checkout / "export.sh", docker, *arguments, "--allow-random-weights")
    assert done.returncode == 1
    assert "balaitous.npz: differs from the sha256 its MANIFEST line gives" in done.stderr
