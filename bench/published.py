"""Running the published balaitous 1.2 package here: without torchvision, offline, timed.

Shared by the differential tests and the benchmark.
"""

from __future__ import annotations

import os
import sys
import time
import types
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

HUB_FILES = ("vitl_16_ct.pth", "vitl_16_pt22k.pth", "unet_r231-d5d2fc3d.pth")


class TimedCompose:
    """torchvision's Compose (apply each transform in turn), timing each transform.

    balaitous imports only `torchvision.transforms.Compose` from torchvision, whose PyPI
    wheels link CUDA libraries and cannot import beside a CPU-only torch; this class takes
    its place. `seconds` holds, after each call, the wall time of every transform, keyed by
    class name (and `key`, for the two encoders).
    """

    def __init__(self, transforms: list[Callable[[Any], Any]]) -> None:
        self.transforms = transforms
        self.seconds: dict[str, float] = {}

    def __call__(self, sample: Any) -> Any:
        self.seconds = {}
        for transform in self.transforms:
            name = type(transform).__name__
            if hasattr(transform, "key"):
                name = f"{name}:{transform.key}"
            started = time.perf_counter()
            sample = transform(sample)
            self.seconds[name] = time.perf_counter() - started
        return sample


def install_compose_for_balaitous() -> None:
    """Make `import balaitous` work: a `torchvision.transforms` module holding TimedCompose."""
    if "torchvision.transforms" in sys.modules:
        return
    torchvision = types.ModuleType("torchvision")
    transforms = types.ModuleType("torchvision.transforms")
    transforms.Compose = TimedCompose  # type: ignore[attr-defined]
    torchvision.transforms = transforms  # type: ignore[attr-defined]
    sys.modules["torchvision"] = torchvision
    sys.modules["torchvision.transforms"] = transforms


def published_heads_path() -> Path:
    """balaitous.npz as installed by the balaitous 1.2 wheel (site-packages/assets/)."""
    import importlib.util

    spec = importlib.util.find_spec("balaitous")
    if spec is None or spec.origin is None:
        raise RuntimeError("balaitous==1.2 is not installed (pip install --no-deps balaitous==1.2)")
    path = Path(spec.origin).resolve().parents[1] / "assets" / "balaitous.npz"
    if not path.is_file():
        raise RuntimeError(f"{path} is missing from the balaitous wheel")
    return path


@contextmanager
def published_environment(
    model_dir: Path,
    torch_home: Path,
    lung_apply: Callable[..., np.ndarray] | None = None,
) -> Iterator[None]:
    """balaitous reads our model files through its own torch.hub cache; lungmask is patched.

    Args:
        model_dir: where the weight files are; they are linked into `torch_home`'s cache,
            where torch.hub.load_state_dict_from_url finds them instead of downloading.
        lung_apply: replaces `lungmask.mask.apply` (the function balaitous calls) while
            the block runs; None keeps lungmask's own.
    """
    install_compose_for_balaitous()
    import lungmask.mask

    checkpoints = torch_home / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True, exist_ok=True)
    for name in HUB_FILES:
        link = checkpoints / name
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to((model_dir / name).resolve())
    previous_home = os.environ.get("TORCH_HOME")
    previous_apply = lungmask.mask.apply
    os.environ["TORCH_HOME"] = str(torch_home)
    if lung_apply is not None:
        lungmask.mask.apply = lung_apply
    try:
        yield
    finally:
        lungmask.mask.apply = previous_apply
        if previous_home is None:
            os.environ.pop("TORCH_HOME", None)
        else:
            os.environ["TORCH_HOME"] = previous_home
