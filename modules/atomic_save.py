"""Write files so that a crash never leaves a half-written file under the final name.

A file is written to a hidden temporary name beside its final one (``.<stem>.k5tmp-XXXXXXXX<suffix>``;
folders ``.<name>.k5tmp-XXXXXXXX``), flushed to the disk, and renamed, and the folder's entry is
flushed too, so a power loss leaves the old file or the new one. What a killed write leaves behind
carries the ``k5tmp-`` mark; ``remove_leftovers`` deletes those at the start of the next run.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import save_file

TEMP_MARK = "k5tmp-"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` to write to; on success it replaces ``path`` (with the
    permissions a new file would get), on failure it is removed and ``path`` is untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.stem}.{TEMP_MARK}", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())
        _fsync(tmp)
        os.replace(tmp, path)
        _fsync(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


def temporary_folder(final: Path) -> Path:
    """A new hidden folder beside ``final`` to fill and then rename to it."""
    final.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{final.name}.{TEMP_MARK}", dir=final.parent))


def sync_tree(folder: Path) -> None:
    """Flush every file of ``folder`` and the folder itself to the disk (before it is renamed in)."""
    for file in folder.iterdir():
        if file.is_file():
            _fsync(file)
    _fsync(folder)


def remove_leftovers(folder: str | os.PathLike) -> int:
    """Delete what killed writes left in ``folder`` (files and folders with the temporary mark)."""
    folder, removed = Path(folder), 0
    if not folder.is_dir():
        return 0
    for leftover in folder.glob(f".*.{TEMP_MARK}*"):
        if leftover.is_dir():
            shutil.rmtree(leftover, ignore_errors=True)
        else:
            leftover.unlink(missing_ok=True)
        removed += 1
    return removed


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_safetensors_atomic(
    tensors: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict[str, str] | None = None
) -> None:
    """Save ``tensors`` to ``path`` through a temporary file in the same folder and a rename. A failed
    write (a full disk) is an OSError, as for any other file."""
    with atomic_path(path) as tmp:
        try:
            save_file({k: v.contiguous() for k, v in tensors.items()}, tmp, metadata=metadata)
        except SafetensorError as error:  # safetensors reports the system's I/O errors as its own
            found = re.search(r"os error (\d+)", str(error))
            code = int(found.group(1)) if found else errno.EIO
            raise OSError(code, os.strerror(code), str(path)) from None
