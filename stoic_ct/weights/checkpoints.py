"""Loading PyTorch checkpoints of the model files, with errors that say what is wrong."""

from __future__ import annotations

import ctypes
import os
import pickle
import zipfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from stoic_ct.errors import ModelFileError
from stoic_ct.models.r231 import r231_network
from stoic_ct.weights.model_files import R231, ModelFileSpec, problem


def load_checkpoint(path: Path, spec: ModelFileSpec | None = None) -> Any:
    """What a PyTorch checkpoint holds (tensors memory-mapped where its format allows).

    Raises:
        ModelFileError: naming the file when it is missing or cannot be loaded; with `spec`,
            the message also says what the file should be and where it is published.
    """

    def failure(what: str) -> ModelFileError:
        return ModelFileError(problem(spec, what) if spec is not None else what, path)

    try:
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as error:
            if "mmap" not in str(error):
                raise
            # A checkpoint in PyTorch's legacy (pre-1.6) format cannot be memory-mapped.
            return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise failure("is missing") from None
    except (
        OSError,
        RuntimeError,
        pickle.UnpicklingError,
        zipfile.BadZipFile,
        EOFError,
        ValueError,
    ) as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise failure(f"cannot be loaded ({reason[:200]})") from None


def load_state_dict(
    path: Path, spec: ModelFileSpec, *, key: str | None = None
) -> dict[str, torch.Tensor]:
    """A checkpoint's tensors, memory-mapped (read from disk only when used).

    Args:
        key: the entry holding the state dict when the file wraps it, e.g. "state_dict";
            a file without that entry is taken as the state dict itself.

    Raises:
        ModelFileError: when the file is not a PyTorch checkpoint of tensors.
    """
    loaded = load_checkpoint(path, spec)
    if key is not None and isinstance(loaded, Mapping) and key in loaded:
        loaded = loaded[key]
    if not isinstance(loaded, Mapping) or not all(
        isinstance(v, torch.Tensor) for v in loaded.values()
    ):
        raise ModelFileError(problem(spec, "does not hold a state dict of tensors"), path)
    return dict(loaded)


def check_shapes(
    state_dict: Mapping[str, torch.Tensor],
    expected: Mapping[str, tuple[int, ...]],
    path: Path,
    spec: ModelFileSpec,
    *,
    allow_unexpected: bool = True,
) -> None:
    """Raise ModelFileError listing missing, wrongly shaped and (optionally) unexpected tensors."""
    details = []
    missing = [k for k in expected if k not in state_dict]
    if missing:
        details.append(f"{len(missing)} missing tensors ({_some(missing)})")
    wrong = [
        f"{k} {tuple(state_dict[k].shape)} instead of {shape}"
        for k, shape in expected.items()
        if k in state_dict and tuple(state_dict[k].shape) != shape
    ]
    if wrong:
        details.append(f"wrong shapes ({_some(wrong)})")
    unexpected = [k for k in state_dict if k not in expected]
    if unexpected and not allow_unexpected:
        details.append(f"{len(unexpected)} unexpected tensors ({_some(unexpected)})")
    if details:
        message = "does not match the architecture: " + ", ".join(details)
        raise ModelFileError(problem(spec, message), path)


def _some(items: list[str], shown: int = 4) -> str:
    return ", ".join(items[:shown]) + (", ..." if len(items) > shown else "")


def check_r231_weights(path: Path) -> None:
    """Check that `path` holds lungmask's R231 U-Net weights (keys and shapes).

    lungmask loads the file strictly, so unexpected tensors are an error too; batch-norm
    counters, which old checkpoints lack and PyTorch fills in, are not required.
    """
    with torch.device("meta"):
        reference = r231_network()
    expected = {
        k: tuple(v.shape)
        for k, v in reference.state_dict().items()
        if not k.endswith("num_batches_tracked")
    }
    state_dict = {
        k: v
        for k, v in load_state_dict(path, R231).items()
        if not k.endswith("num_batches_tracked")
    }
    check_shapes(state_dict, expected, path, R231, allow_unexpected=False)


def release_file_pages(tensors: Iterable[torch.Tensor], path: Path) -> int:
    """Drop the resident pages of tensors memory-mapped from `path`; returns the bytes released.

    The pages stay in the page cache and come back on the next use, at the cost of page
    faults; meanwhile they no longer count in the process's memory. Only ranges inside a
    mapping of `path` are touched (on anonymous memory this would zero the tensors), so
    tensors loaded without mmap, or elsewhere than on Linux, are left alone.
    """
    mapped = _mappings_of(path)
    if not mapped:
        return 0
    libc = ctypes.CDLL(None, use_errno=True)
    page = os.sysconf("SC_PAGE_SIZE")
    released = 0
    for tensor in tensors:
        start = tensor.untyped_storage().data_ptr()
        end = start + tensor.untyped_storage().nbytes()
        first, last = -(-start // page) * page, end // page * page  # whole pages inside
        if last <= first or not any(low <= first and last <= high for low, high in mapped):
            continue
        if libc.madvise(ctypes.c_void_p(first), ctypes.c_size_t(last - first), _MADV_DONTNEED) == 0:
            released += last - first
    return released


_MADV_DONTNEED = 4


def _mappings_of(path: Path) -> list[tuple[int, int]]:
    """Address ranges of this process's mappings of `path` (empty where /proc is missing)."""
    try:
        lines = Path("/proc/self/maps").read_text().splitlines()
    except OSError:
        return []
    target = str(path.resolve())
    ranges = []
    for line in lines:
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[5] == target:
            low, high = (int(a, 16) for a in fields[0].split("-"))
            ranges.append((low, high))
    return ranges
