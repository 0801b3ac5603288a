"""The two kinds of failure a user can fix: a bad input and a bad model file.

Both carry one line for the user. The entry points print that line, prefixed with the
file it concerns, and exit non-zero; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

from pathlib import Path


class StoicError(Exception):
    """A failure with a message meant for the user, about one file or folder."""

    def __init__(self, message: str, path: Path | str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.path = None if path is None else Path(path)

    def with_path(self, path: Path | str) -> StoicError:
        """The same error, attributed to `path` unless it already names a file."""
        return self if self.path is not None else type(self)(self.message, path)

    def __str__(self) -> str:
        return self.message if self.path is None else f"{self.path}: {self.message}"

    def __reduce__(self) -> tuple[type[StoicError], tuple[str, Path | None]]:
        # Keeps the path when the error crosses a process boundary (a spawned rank).
        return type(self), (self.message, self.path)


class InputError(StoicError):
    """The scan, its metadata or a folder given to us cannot be used."""


class ModelFileError(StoicError):
    """A model file is missing or is not what its published source provides."""
