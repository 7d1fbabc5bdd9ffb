"""Atomic file writes: a reader sees the old file or the complete new one, never a partial write.

The bytes go to a temporary file in the destination's folder, are flushed and fsynced, then
`os.replace` puts them in place and the folder is fsynced; on any failure the temporary file is
removed and the destination is untouched. (A process killed outright, SIGKILL or power loss, cannot
remove it: a stray `.NAME.*.tmp` may stay beside the destination, which itself is intact.)

`zip_damage` checks the CRC-32 of every member of a zip container (a torch.save file), which
torch.load does not: a flipped bit in a tensor's bytes would otherwise load as other numbers."""
from __future__ import annotations

import contextlib
import os
import tempfile
import zipfile
from pathlib import Path
from typing import BinaryIO, Callable


def atomic_write(path, write: Callable[[BinaryIO], None]) -> Path:
    """Call write(file) on a temporary file next to `path`, then move it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_folder(path.parent)
    return path


def atomic_write_bytes(path, data: bytes) -> Path:
    return atomic_write(path, lambda f: f.write(data))


def atomic_write_text(path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def _fsync_folder(folder: Path) -> None:
    """Make the rename itself durable (not every file system allows opening a folder)."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def zip_damage(file) -> str | None:
    """The name of the first member of the zip container `file` (a path or a binary file object)
    whose bytes fail their CRC-32 check, else None. A container too damaged to read raises
    (zipfile.BadZipFile and others); the caller turns that into its own error."""
    with zipfile.ZipFile(file) as archive:
        return archive.testzip()
