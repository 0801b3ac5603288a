"""fetch-weights against a local HTTP server serving synthetic files in the published layouts."""

from __future__ import annotations

import hashlib
import io
import json
import socket
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path
from urllib.error import URLError
from urllib.request import urlopen

import numpy as np
import pytest
import torch
from fileserver import FileServer, Route, serving

from bench.published import published_heads_path
from helpers import TINY_VIT
from stoic_ct.cli import main
from stoic_ct.inference.pipeline import Balaitous, check_model_file
from stoic_ct.preprocessing.lung_segmentation import threshold_lungs
from stoic_ct.weights.fetch import (
    WHEEL_NAME,
    FetchError,
    Sources,
    configured_index,
    fetch_weights,
    wheel_location,
)
from stoic_ct.weights.model_files import MANIFEST, read_manifest, sha256_of
from stoic_ct.weights.random_weights import (
    random_heads,
    random_r231_state_dict,
    random_vit_state_dict,
)

CPU = torch.device("cpu")
NAMES = ["vitl_16_ct.pth", "vitl_16_pt22k.pth", "unet_r231-d5d2fc3d.pth", "balaitous.npz"]


def _saved(obj: object) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def published_bytes() -> dict[str, bytes]:
    """Synthetic files in the published layouts, tiny encoders with heads that fit them."""
    heads = io.BytesIO()
    np.savez(heads, allow_pickle=False, **random_heads(TINY_VIT.embed_dim))
    wheel = io.BytesIO()
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr("assets/balaitous.npz", heads.getvalue())
        archive.writestr("balaitous/__init__.py", "")
    return {
        "vitl_16_ct.pth": _saved(random_vit_state_dict(TINY_VIT, seed=1)),
        "vitl_16_pt22k.pth": _saved(
            {"state_dict": random_vit_state_dict(TINY_VIT, seed=2, masked_embed=True)}
        ),
        "unet_r231-d5d2fc3d.pth": _saved(random_r231_state_dict(seed=3)),
        "balaitous.npz": heads.getvalue(),
        WHEEL_NAME: wheel.getvalue(),
    }


@pytest.fixture
def server(published_bytes: dict[str, bytes]) -> Iterator[FileServer]:
    with serving() as server:
        for name in ("vitl_16_ct.pth", "vitl_16_pt22k.pth"):
            server.routes[f"/zenodo/{name}"] = Route(published_bytes[name])
        r231 = published_bytes["unet_r231-d5d2fc3d.pth"]
        server.routes[f"/lungmask/unet_r231-{_sha(r231)[:8]}.pth"] = Route(r231)
        wheel = published_bytes[WHEEL_NAME]
        server.routes[f"/files/{WHEEL_NAME}"] = Route(wheel)
        index = {
            "meta": {"api-version": "1.0"},
            "name": "balaitous",
            "files": [
                {
                    "filename": WHEEL_NAME,
                    "url": f"/files/{WHEEL_NAME}",
                    "hashes": {"sha256": _sha(wheel)},
                },
            ],
        }
        server.routes["/simple/balaitous/"] = Route(
            json.dumps(index).encode(), content_type="application/vnd.pypi.simple.v1+json"
        )
        yield server


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sources(server: FileServer, published_bytes: dict[str, bytes]) -> Sources:
    prefix = _sha(published_bytes["unet_r231-d5d2fc3d.pth"])[:8]
    return Sources(
        zenodo=server.url("/zenodo"),
        lungmask=server.url(f"/lungmask/unet_r231-{prefix}.pth"),
        index=server.url("/simple"),
    )


def test_full_download(
    server: FileServer, published_bytes: dict[str, bytes], tmp_path: Path
) -> None:
    digests = fetch_weights(tmp_path, sources(server, published_bytes), check_model_file)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*NAMES, MANIFEST])
    for name in NAMES:
        assert (tmp_path / name).read_bytes() == published_bytes[name]
        assert digests[name] == _sha(published_bytes[name])
    assert read_manifest(tmp_path) == digests
    assert oct((tmp_path / MANIFEST).stat().st_mode & 0o777) == "0o644"
    assert all(rng is None for _, rng in server.requests)
    # What was fetched is a working model directory.
    Balaitous.from_model_dir(tmp_path, lung_masks=threshold_lungs)


def test_present_files_are_not_fetched_again(
    server: FileServer, published_bytes: dict[str, bytes], tmp_path: Path
) -> None:
    fetch_weights(tmp_path, sources(server, published_bytes), check_model_file)
    server.requests.clear()
    fetch_weights(tmp_path, sources(server, published_bytes), check_model_file)
    assert server.requests == []


def test_a_changed_file_is_fetched_again(
    server: FileServer, published_bytes: dict[str, bytes], tmp_path: Path
) -> None:
    fetch_weights(tmp_path, sources(server, published_bytes), check_model_file)
    path = tmp_path / "vitl_16_ct.pth"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    server.requests.clear()
    fetch_weights(tmp_path, sources(server, published_bytes), check_model_file)
    assert [p for p, _ in server.requests] == ["/zenodo/vitl_16_ct.pth"]
    assert path.read_bytes() == published_bytes["vitl_16_ct.pth"]


def test_the_manifest_keeps_the_lines_of_other_files_that_are_there(
    server: FileServer, published_bytes: dict[str, bytes], tmp_path: Path
) -> None:
    """export.sh packs what the MANIFEST lists: a trained model folder's other files
    (ensemble.json, the fold ensembles) stay listed; a line whose file is gone goes."""
    fetch_weights(tmp_path, sources(server, published_bytes), check_model_file)
    (tmp_path / "ensemble.json").write_text("{}")
    with (tmp_path / "MANIFEST").open("a") as manifest:
        manifest.write(f"{_sha(b'{}')}  ensemble.json\n{_sha(b'gone')}  convnext3d_covid.pth\n")
    fetch_weights(tmp_path, sources(server, published_bytes), check_model_file)
    listed = read_manifest(tmp_path)
    assert listed["ensemble.json"] == _sha(b"{}")
    assert "convnext3d_covid.pth" not in listed
    assert set(listed) == {*NAMES, "ensemble.json"}


def test_files_put_by_hand_are_checked_and_kept(
    server: FileServer, published_bytes: dict[str, bytes], tmp_path: Path
) -> None:
    for name in NAMES:
        (tmp_path / name).write_bytes(published_bytes[name])
    fetch_weights(tmp_path, sources(server, published_bytes), check_model_file)
    assert server.requests == []
    assert set(read_manifest(tmp_path)) == set(NAMES)


def test_resumed_download(
    server: FileServer, published_bytes: dict[str, bytes], tmp_path: Path
) -> None:
    body = published_bytes["vitl_16_ct.pth"]
    server.routes["/zenodo/vitl_16_ct.pth"].cut_after = len(body) // 2
    with pytest.raises(FetchError, match="broke off") as error:
        fetch_weights(tmp_path, sources(server, published_bytes), check_model_file)
    assert "1 model file(s) could not be fetched" in str(error.value)
    part = tmp_path / ".vitl_16_ct.pth.part"
    assert part.stat().st_size == len(body) // 2
    assert not (tmp_path / "vitl_16_ct.pth").exists()
    assert (tmp_path / "vitl_16_pt22k.pth").exists()  # the others were fetched meanwhile

    server.requests.clear()
    fetch_weights(tmp_path, sources(server, published_bytes), check_model_file)
    assert server.requests == [("/zenodo/vitl_16_ct.pth", f"bytes={len(body) // 2}-")]
    assert (tmp_path / "vitl_16_ct.pth").read_bytes() == body
    assert not part.exists()


def test_server_without_ranges_restarts(
    server: FileServer, published_bytes: dict[str, bytes], tmp_path: Path
) -> None:
    route = server.routes["/zenodo/vitl_16_pt22k.pth"]
    route.honour_ranges = False
    (tmp_path / ".vitl_16_pt22k.pth.part").write_bytes(b"stale bytes of an earlier attempt")
    fetch_weights(tmp_path, sources(server, published_bytes), check_model_file)
    assert (tmp_path / "vitl_16_pt22k.pth").read_bytes() == published_bytes["vitl_16_pt22k.pth"]


def test_corrupted_r231_is_rejected(
    server: FileServer, published_bytes: dict[str, bytes], tmp_path: Path
) -> None:
    good = sources(server, published_bytes)
    route = server.routes[good.lungmask.removeprefix(server.url(""))]
    route.body = route.body[:1000] + bytes([route.body[1000] ^ 0xFF]) + route.body[1001:]
    with pytest.raises(FetchError, match="does not start with") as error:
        fetch_weights(tmp_path, good, check_model_file)
    assert "rejected" in str(error.value)
    assert not any(p.name.startswith((".unet", "unet")) for p in tmp_path.iterdir())


def test_corrupted_checkpoint_is_rejected(
    server: FileServer, published_bytes: dict[str, bytes], tmp_path: Path
) -> None:
    server.routes["/zenodo/vitl_16_pt22k.pth"].body = b"<html>Zenodo is down</html>"
    with pytest.raises(FetchError, match="vitl_16_pt22k.pth was rejected: .*cannot be loaded"):
        fetch_weights(tmp_path, sources(server, published_bytes), check_model_file)
    assert not any("pt22k" in p.name for p in tmp_path.iterdir())


def test_wheel_with_another_digest_is_rejected(
    server: FileServer, published_bytes: dict[str, bytes], tmp_path: Path
) -> None:
    server.routes[f"/files/{WHEEL_NAME}"].body += b"tampered"
    with pytest.raises(FetchError, match="differs from the index's"):
        fetch_weights(tmp_path, sources(server, published_bytes), check_model_file)
    assert not any("balaitous" in p.name for p in tmp_path.iterdir())


def test_html_index(server: FileServer, published_bytes: dict[str, bytes]) -> None:
    digest = _sha(published_bytes[WHEEL_NAME])
    server.routes["/html/balaitous/"] = Route(
        f'<a href="../../files/{WHEEL_NAME}#sha256={digest}">{WHEEL_NAME}</a>'.encode(),
        content_type="text/html",
    )
    assert wheel_location(server.url("/html")) == (server.url(f"/files/{WHEEL_NAME}"), digest)


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_unreachable_server_fails_fast_with_instructions(tmp_path: Path) -> None:
    port = _closed_port()
    dead = Sources(
        zenodo=f"http://127.0.0.1:{port}/zenodo",
        lungmask=f"http://127.0.0.1:{port}/lungmask/unet_r231-d5d2fc3d.pth",
        index=f"http://127.0.0.1:{port}/simple",
    )
    started = time.perf_counter()
    with pytest.raises(FetchError) as error:
        fetch_weights(tmp_path, dead, check_model_file)
    assert time.perf_counter() - started < 5
    message = str(error.value)
    assert "4 model file(s) could not be fetched" in message
    assert "Connection refused" in message
    # One cause per file: the first refused, the others on that server not tried.
    causes = message.split("Fetch them by hand")[0].splitlines()[1:]
    assert len(causes) == 4, causes
    assert sum(f"not tried, 127.0.0.1:{port} did not answer" in c for c in causes) == 3
    for name in NAMES:
        assert f"-> {tmp_path / name}" in message
    assert f"http://127.0.0.1:{port}/zenodo/vitl_16_ct.pth" in message
    assert "assets/balaitous.npz inside balaitous-1.2-py3-none-any.whl" in message
    assert list(tmp_path.iterdir()) == []


def test_random_weights_are_not_overwritten(tmp_path: Path) -> None:
    (tmp_path / "RANDOM_WEIGHTS").write_text("random")
    with pytest.raises(FetchError, match="holds randomly initialised weights"):
        fetch_weights(tmp_path, Sources(), check_model_file)


def test_command(server: FileServer, published_bytes: dict[str, bytes], tmp_path: Path) -> None:
    s = sources(server, published_bytes)
    assert (
        main(
            [
                "fetch-weights",
                "--dest",
                str(tmp_path),
                "--zenodo-url",
                s.zenodo,
                "--lungmask-url",
                s.lungmask,
                "--index-url",
                s.index,
            ]
        )
        == 0
    )
    assert set(read_manifest(tmp_path)) == set(NAMES)


def _registry_reachable() -> bool:
    try:
        with urlopen(f"{configured_index().rstrip('/')}/balaitous/", timeout=10):
            return True
    except (URLError, OSError):
        return False


def test_heads_from_the_real_registry(tmp_path: Path) -> None:
    """balaitous.npz from the balaitous 1.2 wheel on the package index pip uses equals the
    installed one."""
    if not _registry_reachable():
        pytest.skip(f"the package index {configured_index()} is not reachable from here")
    port = _closed_port()
    real_index_only = Sources(
        zenodo=f"http://127.0.0.1:{port}/zenodo",
        lungmask=f"http://127.0.0.1:{port}/unet_r231-d5d2fc3d.pth",
    )
    with pytest.raises(FetchError, match="3 model file"):
        fetch_weights(tmp_path, real_index_only, check_model_file)
    fetched = tmp_path / "balaitous.npz"
    assert sha256_of(fetched) == sha256_of(published_heads_path())
    assert read_manifest(tmp_path) == {"balaitous.npz": sha256_of(fetched)}


def test_the_index_is_the_one_pip_uses(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """$PIP_INDEX_URL, else pip's configuration files, as pip itself reads them."""
    config = tmp_path / "pip.conf"
    config.write_text("[global]\nindex-url = http://127.0.0.1:9/simple\n")
    monkeypatch.delenv("PIP_INDEX_URL", raising=False)
    monkeypatch.setenv("PIP_CONFIG_FILE", str(config))
    assert configured_index() == "http://127.0.0.1:9/simple"
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:8/simple")
    assert configured_index() == "http://127.0.0.1:8/simple"
