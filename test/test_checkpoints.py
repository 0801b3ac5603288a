"""Loading checkpoints: memory-mapped, legacy formats, and what is refused."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from stoic_ct.checkpoints import load_state_dict
from stoic_ct.errors import ModelFileError
from stoic_ct.model_files import VIT_CT


def test_legacy_checkpoint_format_loads(tmp_path: Path) -> None:
    """Checkpoints from before PyTorch 1.6 cannot be memory-mapped; they still load."""
    path = tmp_path / "old.pth"
    torch.save({"w": torch.arange(4.0)}, path, _use_new_zipfile_serialization=False)
    state = load_state_dict(path, VIT_CT)
    torch.testing.assert_close(state["w"], torch.arange(4.0))


def test_pickled_objects_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "vitl_16_ct.pth"
    torch.save({"model": torch.nn.Linear(2, 2)}, path)
    with pytest.raises(ModelFileError, match="cannot be loaded"):
        load_state_dict(path, VIT_CT)


def test_a_list_is_not_a_state_dict(tmp_path: Path) -> None:
    path = tmp_path / "vitl_16_ct.pth"
    torch.save([torch.zeros(2)], path)
    with pytest.raises(ModelFileError, match="does not hold a state dict of tensors"):
        load_state_dict(path, VIT_CT)
