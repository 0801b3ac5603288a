"""The image's build context and recipe, read (test/container/ builds and runs the image)."""

from __future__ import annotations

import fnmatch
import re
import subprocess
from pathlib import Path

REPOSITORY = Path(__file__).resolve().parent.parent
DOCKERFILE = (REPOSITORY / "Dockerfile").read_text()


def _matches(path: str, pattern: str) -> bool:
    """A .dockerignore pattern covers the path or a folder above it; "**/" is any depth."""
    parts = path.split("/")
    if pattern.startswith("**/"):
        spans = (
            "/".join(parts[i:j]) for i in range(len(parts)) for j in range(i + 1, len(parts) + 1)
        )
        return any(fnmatch.fnmatchcase(span, pattern[3:]) for span in spans)
    return any(fnmatch.fnmatchcase("/".join(parts[: i + 1]), pattern) for i in range(len(parts)))


def _ignored(path: str, rules: list[tuple[bool, str]]) -> bool:
    """Docker's rule: the last line that matches decides; "!" lines put paths back."""
    ignored = False
    for negated, pattern in rules:
        if _matches(path, pattern):
            ignored = not negated
    return ignored


def build_context(files: list[str]) -> set[str]:
    lines = (REPOSITORY / ".dockerignore").read_text().splitlines()
    rules = [
        (line.startswith("!"), line.lstrip("!").strip().rstrip("/"))
        for line in lines
        if line.strip() and not line.startswith("#")
    ]
    return {f for f in files if not _ignored(f, rules)}


def test_build_context_holds_the_code_wheels_and_model_files_only() -> None:
    kept = [
        "process.py",
        "train.py",
        "wheelhouse/requirements.txt",
        "wheelhouse/numpy-2.4.6-cp311-cp311-manylinux_2_27_x86_64.whl",
        "stoic_ct/inference/pipeline.py",
        "stoic_ct/__init__.py",
        "model/README.md",
        "model/vitl_16_ct.pth",
        "model/MANIFEST",
    ]
    left_out = [
        "model/.vitl_16_ct.pth.part",
        "stoic_ct/__pycache__/pipeline.cpython-311.pyc",
        "test/input/images/ct/phantom.mha",
        "test/test_process.py",
        ".git/HEAD",
        ".venv/bin/python",
        "README.md",
        "requirements.txt",
        "Dockerfile",
        ".cache/random-model/vitl_16_ct.pth",
    ]
    assert build_context(kept + left_out) == set(kept)


def test_every_copied_path_is_in_the_context() -> None:
    tracked = subprocess.run(
        ["git", "ls-files"], cwd=REPOSITORY, capture_output=True, text=True, check=True
    ).stdout.split()
    context = build_context(tracked)
    for line in re.findall(r"^COPY (.+)$", DOCKERFILE, flags=re.MULTILINE):
        *sources, _destination = [w for w in line.split() if not w.startswith("--")]
        for source in sources:
            assert any(f == source or f.startswith(source) for f in context), source


def test_the_base_image_is_pinned_by_digest() -> None:
    """The FROM line names one image by its content: a tag alone can be moved."""
    base = re.search(r"^ARG BASE_IMAGE=(\S+)$", DOCKERFILE, flags=re.MULTILINE)
    assert base is not None
    name, _, digest = base.group(1).partition("@")
    assert name == "pytorch/pytorch:2.13.0-cuda12.6-cudnn9-runtime"
    assert re.fullmatch(r"sha256:[0-9a-f]{64}", digest), digest
    assert re.search(r"^FROM \$\{BASE_IMAGE\} AS code$", DOCKERFILE, flags=re.MULTILINE)
    assert "CUDA 12.6" in DOCKERFILE and "580" in DOCKERFILE  # the reason is written there


def _stages() -> dict[str, str]:
    """Each stage's text by its name (the last, unnamed one as "default")."""
    stages = re.split(r"^FROM ", DOCKERFILE, flags=re.MULTILINE)[1:]
    named = {}
    for stage in stages:
        head, _, body = stage.partition("\n")
        named[head.split(" AS ")[1] if " AS " in head else "default"] = head + "\n" + body
    return named


def test_recipe() -> None:
    torch_pin = re.search(
        r"^torch==(\S+)$", (REPOSITORY / "requirements.txt").read_text(), flags=re.MULTILINE
    )
    assert torch_pin is not None and torch_pin.group(1) == "2.13.0"
    assert "assert sys.version_info >= (3, 11)" in DOCKERFILE
    assert re.search(r"^ENV PYTHONUNBUFFERED=1", DOCKERFILE, flags=re.MULTILINE)
    assert "    PYTHONPATH=/opt/app " in DOCKERFILE  # the entry points run from any directory
    users = re.findall(r"^USER (\S+)$", DOCKERFILE, flags=re.MULTILINE)
    assert users and users[-1] not in ("root", "0", "0:0")
    # The two APIs, each labelled as the platform reads it, with and without model/; a
    # plain build gives the invoke image.
    stages = _stages()
    assert list(stages) == [
        "code",
        "exec",
        "invoke",
        "exec-model-baked",
        "invoke-model-baked",
        "default",
    ]
    assert 'LABEL org.grand-challenge.api-method="exec"' in stages["exec"]
    assert 'ENTRYPOINT ["python", "-m", "process"]' in stages["exec"]
    assert 'LABEL org.grand-challenge.api-method="invoke"' in stages["invoke"]
    assert 'ENTRYPOINT ["python", "-m", "stoic_ct", "serve"]' in stages["invoke"]
    assert stages["default"].strip() == "invoke"
    for api in ("exec", "invoke"):
        assert stages[f"{api}-model-baked"].startswith(f"{api} AS {api}-model-baked")
        assert "COPY --chown=user:user model/" in stages[f"{api}-model-baked"]
        assert "model/" not in stages[api]
    assert "model/" not in stages["code"].split("FROM", 1)[0].replace("/opt/ml/model", "")
    # No network in the build: the wheels come from the host's wheelhouse, nothing else.
    installs = re.findall(r"pip install[^\n]*\n[^\n]*", DOCKERFILE)
    assert installs and all("--no-index" in i and "--no-deps" in i for i in installs), installs
    # Every requirement is pinned to one version.
    requirements = [
        line
        for line in (REPOSITORY / "requirements.txt").read_text().splitlines()
        if line and not line.startswith("#")
    ]
    assert all(re.fullmatch(r"[A-Za-z0-9_.\-]+==[0-9][^ ]*", r) for r in requirements), requirements
