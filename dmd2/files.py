"""Writing files so that a crash or a full disk never leaves a half-written one under the final name."""
from __future__ import annotations

import hashlib
import os
import tempfile
from typing import IO, Callable


def atomic_write(path: str, write: Callable[[IO[bytes]], None], suffix: str = "") -> None:
    """Call ``write`` on a temporary file in ``path``'s folder (``.tmp-*<suffix>``), fsync it, then rename it to
    ``path``. On any failure the temporary file is removed and ``path`` is left as it was."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=suffix, dir=folder)
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
