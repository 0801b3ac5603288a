"""The scheduler files of scripts/cluster/: the Slurm scripts pass shellcheck and, run with
a stand-in scheduler, start the commands they document; the Kubernetes Job parses and
names the image and the shard variables predict reads."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest
import yaml  # type: ignore[import-untyped]  # PyYAML ships no type hints

REPOSITORY = Path(__file__).resolve().parent.parent
CLUSTER = REPOSITORY / "scripts" / "cluster"
SHELLCHECK = REPOSITORY / ".venv" / "bin" / "shellcheck"


@pytest.mark.parametrize("script", ["features.sbatch", "train.sbatch"])
def test_the_slurm_scripts_pass_shellcheck(script: str) -> None:
    subprocess.run([str(SHELLCHECK), str(CLUSTER / script)], check=True)


def _stand_in(folder: Path, name: str, body: str) -> None:
    path = folder / name
    path.write_text(f"#!/usr/bin/env bash\n{body}\n")
    path.chmod(0o755)


def test_a_feature_array_task_extracts_its_shard_into_the_shared_cache(tmp_path: Path) -> None:
    _stand_in(tmp_path, "python", 'echo "$@"')
    environment = os.environ | {"PYTHON": str(tmp_path / "python"), "SLURM_ARRAY_TASK_ID": "3"}
    script = [str(CLUSTER / "features.sbatch"), "/data/cohort", str(tmp_path / "out")]
    ran = subprocess.run(
        [*script, "--precision", "fast"], env=environment, capture_output=True, text=True
    )
    assert ran.returncode == 0, ran.stderr
    assert ran.stdout.split() == [
        *("-m", "stoic_ct", "extract-features", "/data/cohort"),
        *("--out", f"{tmp_path}/out/shard-3.npz", "--cache", f"{tmp_path}/out/cache"),
        *("--precision", "fast"),
    ]
    del environment["SLURM_ARRAY_TASK_ID"]
    alone = subprocess.run(script, env=environment, capture_output=True, text=True)
    assert alone.returncode != 0 and "run it as a job array" in alone.stderr


def _training_job(
    tmp_path: Path, hosts: str, nodes: int, *arguments: str
) -> subprocess.CompletedProcess[str]:
    """train.sbatch under stand-in scontrol (printing `hosts`) and srun (echoing)."""
    _stand_in(tmp_path, "scontrol", hosts)
    _stand_in(tmp_path, "srun", 'echo "$@"')
    environment = os.environ | {
        "PATH": f"{tmp_path}:{os.environ['PATH']}",
        "PYTHON": "python",
        "SLURM_JOB_NODELIST": f"gpu-node-[1-{nodes}]",
        "SLURM_NNODES": str(nodes),
        "SLURM_JOB_ID": "4242",
        "GPUS_PER_NODE": "4",
    }
    return subprocess.run(
        [str(CLUSTER / "train.sbatch"), "/in", "/out", "/scratch", *arguments],
        env=environment,
        capture_output=True,
        text=True,
    )


def test_the_training_job_starts_one_torchrun_per_node_meeting_at_the_first(
    tmp_path: Path,
) -> None:
    hosts = 'printf "gpu-node-7\\ngpu-node-8\\n"'
    ran = _training_job(tmp_path, hosts, 2, "--system", "convnext3d")
    assert ran.returncode == 0, ran.stderr
    assert ran.stdout.split() == [
        *("--ntasks-per-node=1", "python", "-m", "torch.distributed.run"),
        *("--nnodes=2", "--nproc_per_node=4", "--rdzv_id=4242", "--rdzv_backend=c10d"),
        "--rdzv_endpoint=gpu-node-7:29500",
        *("train.py", "--input", "/in", "--output", "/out", "--scratch", "/scratch"),
        *("--system", "convnext3d"),
    ]


def test_the_training_job_reads_a_node_list_longer_than_a_pipe_holds(tmp_path: Path) -> None:
    # Under pipefail, a reader that stops at the first host makes scontrol die of SIGPIPE.
    ran = _training_job(tmp_path, 'seq -f "gpu-node-%g" 1 20000', 20000)
    assert ran.returncode == 0, (ran.returncode, ran.stderr)
    assert "--rdzv_endpoint=gpu-node-1:29500" in ran.stdout.split()


def test_the_indexed_job_names_the_image_and_the_shard_variables() -> None:
    job = yaml.safe_load((CLUSTER / "predict-job.yaml").read_text())
    assert (job["apiVersion"], job["kind"]) == ("batch/v1", "Job")
    spec = job["spec"]
    assert spec["completionMode"] == "Indexed"
    (container,) = spec["template"]["spec"]["containers"]
    default_tag = re.search(r"^tag=(\S+)$", (REPOSITORY / "scripts/args.sh").read_text(), re.M)
    assert default_tag is not None and container["image"] == f"{default_tag[1]}:latest"
    environment = {e["name"]: e["value"] for e in container["env"]}
    # predict reads JOB_COMPLETION_INDEX (Kubernetes sets it) with WORLD_SIZE: the count.
    assert int(environment["WORLD_SIZE"]) == spec["completions"] == spec["parallelism"]
    command = " ".join(container["command"] + container["args"])
    assert "python -m stoic_ct predict" in command and "--resume" in command
    assert '--csv "/results/part-$JOB_COMPLETION_INDEX.csv"' in command
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert mounts == {"scans": "/scans", "results": "/results"}
