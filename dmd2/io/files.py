"""Writing files so that a crash or a full disk never leaves a half-written one under the final name."""
from __future__ import annotations

import hashlib
import os
import tempfile
from typing import IO, Callable


def current_umask() -> int:
    """The process's file-mode creation mask (read by setting it and putting it back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def follow_umask(path: str) -> None:
    """Give ``path`` the mode of an ordinary new file (0666 less the umask) when a library created it with a
    narrower one."""
    os.chmod(path, 0o666 & ~current_umask())


def make_temp_file(folder: str, prefix: str = ".tmp-", suffix: str = "") -> tuple[int, str]:
    """``tempfile.mkstemp`` in ``folder``, but with the mode an ordinary new file gets (0666 less the umask, e.g.
    0644) instead of mkstemp's 0600: the file it becomes must be readable like any other the run writes."""
    fd, path = tempfile.mkstemp(prefix=prefix, suffix=suffix, dir=folder)
    try:
        os.fchmod(fd, 0o666 & ~current_umask())
    except BaseException:
        os.close(fd)
        os.remove(path)
        raise
    return fd, path


def atomic_write(path: str, write: Callable[[IO[bytes]], None], suffix: str = "") -> None:
    """Call ``write`` on a temporary file in ``path``'s folder (``.tmp-*<suffix>``), fsync it, then rename it to
    ``path``. On any failure the temporary file is removed and ``path`` is left as it was. The file gets the
    mode of an ordinary new file (it follows the umask)."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = make_temp_file(folder, suffix=suffix)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def file_sha256(path: str) -> str:
    """SHA-256 of a file's bytes (hex), read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
