"""Where the model files are, and what happens when one is missing or unreadable."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import unprivileged
from stoic_ct.errors import ModelFileError
from stoic_ct.weights.model_files import (
    ALL_FILES,
    HEADS,
    MANIFEST,
    REPOSITORY_MODEL_DIR,
    VIT_CT,
    ModelFiles,
    default_model_dir,
    encoder_kind,
    read_manifest,
    sha256_of,
    write_manifest,
)

REPOSITORY = Path(__file__).resolve().parents[2]


def test_published_names() -> None:
    assert [f.name for f in ALL_FILES] == [
        "vitl_16_ct.pth",
        "vitl_16_pt22k.pth",
        "unet_r231-d5d2fc3d.pth",
        "balaitous.npz",
    ]


def test_default_dir_is_the_uploaded_model_when_it_holds_files(tmp_path: Path) -> None:
    assert default_model_dir(tmp_path / "absent") == REPOSITORY_MODEL_DIR
    baked = tmp_path / "baked"
    baked.mkdir()
    (baked / "vitl_16_ct.pth").write_bytes(b"")
    uploaded = tmp_path / "uploaded"
    uploaded.mkdir()
    assert default_model_dir(uploaded, baked) == baked  # exists, but empty
    (uploaded / "balaitous.npz").write_bytes(b"")
    assert default_model_dir(uploaded, baked) == uploaded


def test_an_image_without_model_files_says_how_to_give_them(tmp_path: Path) -> None:
    """In the image /opt/ml/model exists; mounted nothing there and baked nothing in."""
    with pytest.raises(ModelFileError, match="holds no model files, and none are baked into"):
        default_model_dir(tmp_path, tmp_path / "absent")


def test_missing_file_names_path_and_source(tmp_path: Path) -> None:
    with pytest.raises(ModelFileError) as error:
        ModelFiles(tmp_path).path(VIT_CT)
    assert str(error.value) == (
        f"{tmp_path}/vitl_16_ct.pth: is missing; expected iBOT ViT-L/16 fine-tuned on lung CT, "
        "a plain state dict (encoder 'full', 24 blocks), published at "
        "https://zenodo.org/record/6547999/files/vitl_16_ct.pth"
    )


def test_a_folder_in_place_of_a_file(tmp_path: Path) -> None:
    (tmp_path / "balaitous.npz").mkdir()
    with pytest.raises(ModelFileError, match="balaitous.npz: is missing"):
        ModelFiles(tmp_path).path(HEADS)


def test_unreadable_file(shared_tmp: Path) -> None:
    """As an unprivileged user (root reads anything): a file without read permission."""
    path = shared_tmp / "vitl_16_ct.pth"
    path.write_bytes(b"x")
    path.chmod(0)
    script = (
        "from stoic_ct.weights.model_files import VIT_CT, ModelFiles; "
        f"ModelFiles(Path({str(shared_tmp)!r})).path(VIT_CT)"
    )
    done = subprocess.run(
        unprivileged([sys.executable, "-c", "from pathlib import Path; " + script]),
        cwd=REPOSITORY,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 1
    assert f"ModelFileError: {path}: is not readable by this user" in done.stderr


def test_manifest_round_trip(tmp_path: Path) -> None:
    (tmp_path / "balaitous.npz").write_bytes(b"heads")
    digests = {"balaitous.npz": sha256_of(tmp_path / "balaitous.npz"), "vitl_16_ct.pth": "0" * 64}
    write_manifest(tmp_path, digests)
    text = (tmp_path / MANIFEST).read_text()
    # sha256sum's format, the published order: `sha256sum -c MANIFEST` can check it.
    assert text.splitlines() == [
        f"{'0' * 64}  vitl_16_ct.pth",
        f"{digests['balaitous.npz']}  balaitous.npz",
    ]
    assert read_manifest(tmp_path) == digests
    assert digests["balaitous.npz"] == hashlib.sha256(b"heads").hexdigest()


def test_malformed_manifest(tmp_path: Path) -> None:
    (tmp_path / MANIFEST).write_text("not a digest  vitl_16_ct.pth\n")
    with pytest.raises(ModelFileError, match="MANIFEST: line 1 is not"):
        read_manifest(tmp_path)


def test_each_encoder_choice_names_its_files_once() -> None:
    vit, convnext = encoder_kind("vit"), encoder_kind("convnext3d-frozen")
    assert [spec.name for spec in vit.files] == ["vitl_16_ct.pth", "vitl_16_pt22k.pth"]
    assert (vit.heads.name, vit.report) == ("balaitous.npz", "heads.json")
    assert [spec.name for spec in convnext.files] == ["convnext3d.pth"]
    assert (convnext.heads.name, convnext.report) == (
        "convnext3d_heads.npz",
        "convnext3d_heads.json",
    )
    assert encoder_kind("convnext3d") == convnext  # the old name, as stored in old tables
    with pytest.raises(ValueError, match="vit, convnext3d-frozen"):
        encoder_kind("resnet")
