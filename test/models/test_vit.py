"""Our ViT against the published iBOT ViT, and the checkpoint loader."""

from __future__ import annotations

import copy
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from bench.published import install_compose_for_balaitous
from helpers import TINY_VIT, mapped_ranges, resident_bytes
from stoic_ct.errors import ModelFileError
from stoic_ct.inference.precision import int8_linear
from stoic_ct.models.vit import VisionTransformer, ViTConfig
from stoic_ct.weights.model_files import VIT_CT, VIT_IMAGENET
from stoic_ct.weights.network_files import load_vit
from stoic_ct.weights.random_weights import random_vit_state_dict


@pytest.fixture(scope="module")
def published_vit() -> types.ModuleType:
    install_compose_for_balaitous()
    import balaitous.vit

    return balaitous.vit


def test_forward_matches_the_published_vit(published_vit: types.ModuleType, tmp_path: Path) -> None:
    config = ViTConfig(embed_dim=128, depth=3, num_heads=2, mlp_hidden=256)
    state = random_vit_state_dict(config, seed=1)
    theirs = published_vit.VisionTransformer(
        embed_dim=128, depth=3, num_heads=2, mlp_ratio=2, qkv_bias=True
    )
    theirs.load_state_dict(state)
    theirs.eval()
    torch.save(state, tmp_path / "vit.pth")
    ours = load_vit(tmp_path / "vit.pth", VIT_CT, depth=3)
    x = torch.randn(3, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        tokens = theirs.prepare_tokens(x)
        for block in theirs.blocks:
            tokens = block(tokens)
        expected = tokens[:, 0]
        got = ours(x)
    assert got.shape == (3, 128)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    # Different images differ by far more than the tolerance: the comparison is not vacuous.
    assert (expected[0] - expected[1]).abs().max() > 1e-3


def test_loads_the_first_blocks_of_a_wrapped_checkpoint(tmp_path: Path) -> None:
    state = random_vit_state_dict(TINY_VIT, seed=2, masked_embed=True)
    torch.save({"state_dict": state}, tmp_path / "vit.pth")
    model = load_vit(tmp_path / "vit.pth", VIT_IMAGENET, depth=16)
    assert len(model.blocks) == 16
    loaded = model.state_dict()
    assert set(loaded) == {
        k
        for k in state
        if not k.startswith(("norm.", "masked_embed"))
        and not (k.startswith("blocks.") and int(k.split(".")[1]) >= 16)
    }
    for key, value in loaded.items():
        torch.testing.assert_close(value, state[key], rtol=0, atol=0)


def test_unused_blocks_are_never_read(tmp_path: Path) -> None:
    """Weights stay memory-mapped (no copy), and a forward pass reads only the blocks used."""
    config = ViTConfig(embed_dim=256, depth=24, num_heads=4, mlp_hidden=1024)
    path = tmp_path / "vit.pth"
    torch.save(random_vit_state_dict(config, seed=4), path)
    size = path.stat().st_size
    model = load_vit(path, VIT_CT, depth=8)
    ranges = mapped_ranges(path)
    assert ranges, "the checkpoint is not memory-mapped"
    for name, parameter in model.state_dict().items():
        address = parameter.data_ptr()
        assert any(start <= address < end for start, end in ranges), f"{name} was copied"
    with torch.inference_mode():
        model(torch.zeros(1, 3, 224, 224))
    resident = resident_bytes(path)
    # 8 of 24 blocks were used: about a third of the file, with margin for read-ahead.
    assert resident < 0.45 * size, f"{resident / size:.0%} of the checkpoint was read"


def test_too_few_blocks_is_an_error_naming_the_file(tmp_path: Path) -> None:
    config = ViTConfig(embed_dim=64, depth=12, num_heads=1, mlp_hidden=128)
    torch.save(random_vit_state_dict(config), tmp_path / "vitl_16_ct.pth")
    with pytest.raises(ModelFileError, match="has 12 transformer blocks, 24 are needed") as error:
        load_vit(tmp_path / "vitl_16_ct.pth", VIT_CT, depth=24)
    assert "vitl_16_ct.pth" in str(error.value)
    assert "zenodo.org/record/6547999" in str(error.value)


def test_wrong_shapes_are_listed(tmp_path: Path) -> None:
    state = random_vit_state_dict(TINY_VIT)
    state["blocks.3.mlp.fc1.weight"] = torch.zeros(7, 64)
    torch.save(state, tmp_path / "vit.pth")
    with pytest.raises(ModelFileError, match=r"blocks\.3\.mlp\.fc1\.weight \(7, 64\) instead of"):
        load_vit(tmp_path / "vit.pth", VIT_CT, depth=24)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"not a checkpoint at all", "cannot be loaded"),
        (None, "is not a ViT checkpoint"),
    ],
)
def test_malformed_checkpoints(tmp_path: Path, content: bytes | None, message: str) -> None:
    path = tmp_path / "vitl_16_pt22k.pth"
    if content is None:
        torch.save({"state_dict": {"something": torch.zeros(3)}}, path)
    else:
        path.write_bytes(content)
    with pytest.raises(ModelFileError, match=message):
        load_vit(path, VIT_IMAGENET, depth=16)


def test_truncated_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "vitl_16_ct.pth"
    torch.save(random_vit_state_dict(TINY_VIT), path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelFileError, match="vitl_16_ct.pth: cannot be loaded"):
        load_vit(path, VIT_CT, depth=24)


def test_batch_independence() -> None:
    model = VisionTransformer(ViTConfig(embed_dim=64, depth=2, num_heads=1, mlp_hidden=128)).eval()
    x = torch.randn(4, 3, 224, 224)
    with torch.no_grad():
        whole = model(x).numpy()
        single = np.concatenate([model(x[i : i + 1]).numpy() for i in range(4)])
    np.testing.assert_allclose(whole, single, rtol=1e-5, atol=1e-6)


def test_the_cls_only_last_block_gives_the_full_blocks_cls_token() -> None:
    torch.manual_seed(0)
    model = VisionTransformer(ViTConfig(embed_dim=64, depth=2, num_heads=2, mlp_hidden=128))
    x = torch.randn(3, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        full = model.eval().forward_features(x)
        cls = model(x)
        # The fast mode's int8 Linear layers quantise activations per call, so the CLS-only
        # path rounds differently; it must stay as close to float32 as the full path.
        int8 = copy.deepcopy(model)
        int8_linear(int8)  # in place
        cls_int8, full_int8 = int8(x), int8.forward_features(x)[:, 0]
    torch.testing.assert_close(cls, full[:, 0], rtol=1e-5, atol=1e-6)
    assert (full[:, 1] - full[:, 0]).abs().max() > 1e-3  # another token would not pass
    error = (cls_int8 - cls).norm() / cls.norm()
    assert 0 < error <= 1.1 * (full_int8 - cls).norm() / cls.norm()
