"""Files and directories for their owner only: born with that mode, replaced atomically.

A mode given to ``open``/``mkdir`` is only ever narrowed by the umask, never widened, and
``fchmod`` on the still-empty file makes it exactly 0600 whatever the umask; so no secret is
readable by anyone else for even a moment, and a reader never sees half a file.
"""

from __future__ import annotations

import contextlib
import os
import stat
import uuid
from pathlib import Path
from typing import IO

FILE_MODE = 0o600
DIR_MODE = 0o700


def make_dir(path: Path) -> Path:
    """Create ``path`` as 0700 (parents as the system makes them), or tighten it if it exists."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileExistsError):
        os.mkdir(path, DIR_MODE)
    # Also a directory an older baton left 0755, and one made under a narrowing umask.
    if stat.S_IMODE(path.stat().st_mode) != DIR_MODE:
        path.chmod(DIR_MODE)
    return path


def write_file(path: Path, data: str | bytes, *, owner: tuple[int, int] | None = None) -> None:
    """Write ``path`` atomically, mode 0600 from its first byte: a temporary file, then rename.

    ``owner`` (uid, gid) hands the file to another user (as root, Postgres's) before any byte.
    """
    path = Path(path)
    tmp = _write_temporary(path, data, owner)
    try:
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _sync_dir(path.parent)


def create_once(path: Path, data: str | bytes) -> bool:
    """Create ``path`` (0600, complete or not at all) unless it exists; True if this call made it."""
    path = Path(path)
    tmp = _write_temporary(path, data, None)
    try:
        # link() fails if the name exists: two racing creators cannot overwrite each other.
        os.link(tmp, path)
    except FileExistsError:
        return False
    finally:
        tmp.unlink(missing_ok=True)
    _sync_dir(path.parent)
    return True


def _write_temporary(path: Path, data: str | bytes, owner: tuple[int, int] | None) -> Path:
    blob = data.encode() if isinstance(data, str) else data
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, FILE_MODE)
    try:
        os.fchmod(fd, FILE_MODE)
        if owner is not None:
            os.fchown(fd, *owner)
        with os.fdopen(fd, "wb") as fh:
            fd = -1
            fh.write(blob)
            fh.flush()
            os.fsync(fh.fileno())
    except BaseException:
        if fd >= 0:
            os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    return tmp


def _sync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        dir_fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dir_fd)  # the rename itself survives a crash
        finally:
            os.close(dir_fd)


def open_log(path: Path) -> IO[bytes]:
    """Open ``path`` for appending, 0600 (a log an older baton left wider is tightened)."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, FILE_MODE)
    try:
        os.fchmod(fd, FILE_MODE)
    except BaseException:
        os.close(fd)
        raise
    return os.fdopen(fd, "ab")
