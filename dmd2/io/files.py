"""Writing files so that a crash or a full disk never leaves a half-written one under the final name."""
from __future__ import annotations

import hashlib
import math
import os
import tempfile
from typing import IO, Any, Callable


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


# ------------------------------------------------------------------------------------------------ bounded reads

INFLATION_FLOOR = 256 << 20  # bytes any input may decode to, whatever its size on disk
MAX_INFLATION = 100  # beyond the floor: decoded bytes per stored byte (images and arrays compress far less)


def inflation_limit(stored_bytes: int) -> int:
    """The most bytes an input of ``stored_bytes`` on disk may decode to (a file of kilobytes never costs
    gigabytes; real images and arrays compress far less than MAX_INFLATION to 1)."""
    return max(INFLATION_FLOOR, MAX_INFLATION * stored_bytes)


def read_npz_arrays(path: str, names: tuple[str, ...] | None = None,
                    check: Callable[[str, tuple[int, ...], Any], str | None] | None = None) -> dict[str, Any]:
    """The arrays ``names`` (all when None) of an .npz, each read only after its header is checked: plain numbers
    (no object arrays: nothing is unpickled), a declared size equal to the member's and within
    ``inflation_limit`` of its compressed size, and ``check(name, shape, dtype)`` (a reason to refuse, or None).
    ValueError (with the reason) otherwise; OSError / zipfile.BadZipFile for a file that is not a zip."""
    import zipfile

    import numpy as np

    out = {}
    with zipfile.ZipFile(path) as zf:
        members = {i.filename[:-len(".npy")]: i for i in zf.infolist() if i.filename.endswith(".npy")}
        for name in (names if names is not None else tuple(members)):
            info = members.get(name)
            if info is None:
                continue
            with zf.open(info) as f:
                version = np.lib.format.read_magic(f)
                read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) \
                    else np.lib.format.read_array_header_2_0
                shape, _, dtype = read_header(f)
                header = f.tell()
                if dtype.hasobject:
                    raise ValueError(f"array {name!r} holds Python objects (never unpickled)")
                declared = math.prod(shape) * dtype.itemsize
                if header + declared != info.file_size:
                    raise ValueError(f"array {name!r} declares {declared} bytes of {dtype} {list(shape)}, but the "
                                     f"file holds {info.file_size - header}")
                if declared > inflation_limit(info.compress_size):
                    raise ValueError(f"array {name!r}: {declared} bytes compressed into {info.compress_size} (more "
                                     f"than {MAX_INFLATION} to 1; write it with np.savez, uncompressed)")
                reason = check(name, tuple(shape), dtype) if check else None
                if reason:
                    raise ValueError(f"array {name!r}: {reason}")
            with zf.open(info) as f:  # read from the start (read_array reads the header again)
                out[name] = np.lib.format.read_array(f, allow_pickle=False)
    return out
