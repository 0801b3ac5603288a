"""Writing a file so that readers see the old one or the new one, never half of one.

Standard library only: the scripts that check model files run without numpy or torch.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

READABLE = 0o644  # mkstemp makes files private; ours are read by other users and the platform


def atomic_write(path: Path, write: Callable[[BinaryIO], object], mode: int = READABLE) -> Path:
    """Call `write` on a temporary file beside `path`, then rename it to `path`.

    On any failure the temporary file is removed and `path` is left as it was.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, staging = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(handle, mode)
        with os.fdopen(handle, "wb") as f:
            write(f)
        Path(staging).replace(path)
    except BaseException:
        Path(staging).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: Path, text: str) -> Path:
    """`atomic_write` of UTF-8 text."""
    data = text.encode("utf-8")
    return atomic_write(path, lambda f: f.write(data))
