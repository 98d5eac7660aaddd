"""Output locations, checked before any model loads: the right kind of thing, writable, and names
that stay inside the folder the user gave."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


class OutputPathError(ValueError):
    pass


def _nearest_existing(path: Path) -> Path:
    path = path.absolute()
    while not path.exists():
        path = path.parent
    return path


def check_writable_folder(folder: str | Path, option: str) -> Path:
    """``folder`` is (or can be created as) a folder this process may write in."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise OutputPathError(f"{option} {folder} is a file, not a folder")
    existing = _nearest_existing(folder)
    if not existing.is_dir():
        raise OutputPathError(f"{option} {folder}: {existing} is a file, so the folder cannot be created")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise OutputPathError(f"{option} {folder}: {existing} is not writable")
    if existing == folder.absolute():  # a folder that holds no files (/proc, say) passes the access check
        try:
            with tempfile.TemporaryFile(dir=existing):  # unnamed, gone when closed
                pass
        except OSError as error:
            raise OutputPathError(f"{option} {folder}: files cannot be made there ({error.strerror})") from None
    return folder


def check_output_file(path: str | Path, option: str) -> Path:
    """``path`` can be written as a file: not an existing folder, in a folder that can be written."""
    path = Path(path)
    if path.is_dir():
        raise OutputPathError(f"{option} {path} is a folder; give a file name")
    check_writable_folder(path.parent, f"{option} {path}: its folder")
    return path


def plain_name(name: str, option: str) -> str:
    """A file name without any folder part, so what is written stays in the output folder."""
    if not name or name in (".", "..") or "/" in name or "\\" in name or name != name.strip():
        raise OutputPathError(f"{option} {name!r} must be a plain file name (no folder, no '/' or '..')")
    return name
