"""Loading checkpoints: memory-mapped, legacy formats, and what is refused."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from stoic_ct.errors import ModelFileError
from stoic_ct.weights.checkpoints import load_state_dict, release_file_pages
from stoic_ct.weights.model_files import VIT_CT


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


def _resident_kb() -> int:
    status = Path("/proc/self/status").read_text()
    return int(next(line for line in status.splitlines() if line.startswith("VmRSS")).split()[1])


def test_released_pages_leave_memory_and_come_back_intact(tmp_path: Path) -> None:
    path = tmp_path / "big.pth"
    torch.save({"w": torch.arange(25_000_000, dtype=torch.float32)}, path)  # 100 MB
    tensor = load_state_dict(path, VIT_CT)["w"]
    total = float(tensor.sum())
    touched = _resident_kb()
    released = release_file_pages([tensor], path)
    assert released > 90 * 2**20
    assert _resident_kb() < touched - 80 * 1024
    assert float(tensor.sum()) == total


def test_anonymous_memory_is_never_released(tmp_path: Path) -> None:
    path = tmp_path / "small.pth"
    torch.save({"w": torch.zeros(10)}, path)
    load_state_dict(path, VIT_CT)
    anonymous = torch.arange(2_000_000, dtype=torch.float32)
    assert release_file_pages([anonymous], path) == 0
    assert float(anonymous[-1]) == 1_999_999.0
