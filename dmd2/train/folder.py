"""A run folder belongs to one run: the lock that keeps a second process out (``run.lock``), the check that a new
run does not write over a finished one or one of the other stage, and the removal of what interrupted writes
left behind. Nothing here imports torch."""
from __future__ import annotations

import datetime
import errno
import fcntl
import glob
import json
import logging
import os
import re
import shutil
import socket
import time
from typing import Any

from dmd2.config.errors import ConfigError, FileError
from dmd2.io.checkpoint import FINAL, checkpoint_step

log = logging.getLogger(__name__)

LOCK_FILE = "run.lock"
TAKE_OVER_ENV = "DMD2_TAKE_OVER_LOCK"  # '<host>:<pid>' of a lock known to be stale, or 'any'
PREFIXES = {"teacher": "teacher", "distill": "dmd2"}  # stage -> checkpoint file prefix
RUN_OUTPUTS = ("config.yaml", "metrics.jsonl", "samples", "generator")  # besides the checkpoints
DEAD_HOLDER_WAIT_S = 30.0  # how long a killed run's surviving children may keep its flock
NO_FLOCK = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        return True
    return True


class RunLock:
    """``<folder>/run.lock`` while a run writes into ``folder``: its pid, host and start time. Where the file
    system supports it, the open file also holds an exclusive ``flock`` for the lifetime of the process (``fd``),
    which the system drops when the process dies, however it dies. Without flock, ``identity`` (device, inode)
    is the lock file this process made: only that file is ever removed."""

    def __init__(self, path: str, fd: int | None = None, identity: tuple[int, int] | None = None) -> None:
        self.path = path
        self.fd = fd
        self.identity = identity

    def ours(self) -> bool:
        """Whether ``path`` still names this lock's file."""
        if self.fd is not None:
            return same_file(self.fd, self.path)
        try:
            st = os.stat(self.path, follow_symlinks=False)
        except FileNotFoundError:
            return False
        return self.identity is None or (st.st_dev, st.st_ino) == self.identity

    def release(self) -> None:
        """Remove the lock file (only if it is still this lock's) and drop the flock. A folder that has become
        unwritable is reported, not raised: the next run takes the left lock over (its process is gone)."""
        try:
            if self.ours():
                os.remove(self.path)
        except FileNotFoundError:
            pass
        except OSError as err:
            log.warning(f"[run] could not remove {self.path} ({err}); the next run in this folder takes it over")
        finally:
            if self.fd is not None:
                os.close(self.fd)
                self.fd = None


def same_file(fd: int, path: str) -> bool:
    """Whether ``path`` still names the file open as ``fd`` (not removed, nor replaced by another)."""
    try:
        a, b = os.fstat(fd), os.stat(path)
    except FileNotFoundError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def read_holder(path: str) -> dict[str, Any]:
    try:
        with open(path) as f:
            holder = json.load(f)
    except (OSError, ValueError):
        return {}
    return holder if isinstance(holder, dict) else {}


def in_use(folder: str, path: str, holder: dict[str, Any]) -> ConfigError:
    return ConfigError(
        f"config key 'output_dir' = {folder!r} is in use by another run (pid {holder.get('pid')} on "
        f"{holder.get('host')}, started {holder.get('started')}): two runs in one folder would overwrite each "
        f"other's checkpoints. Use another output_dir, or delete {path} if that run is gone")


def may_take_over(folder: str, path: str, holder: dict[str, Any]) -> bool:
    """Whether a lock that no process holds (its flock is free, or flock is unsupported) may be taken: its
    process is gone on this host, or, for a lock of another host (e.g. a SLURM job requeued onto another node:
    this host cannot see that process), ``$DMD2_TAKE_OVER_LOCK`` names it. Refuses (ConfigError) otherwise."""
    pid, host = holder.get("pid"), holder.get("host")
    if host == socket.gethostname():
        if isinstance(pid, int) and not process_alive(pid):
            log.info(f"[run] {path}: its run (pid {pid}, started {holder.get('started')}) is gone; taking over")
            return True
        raise in_use(folder, path, holder)
    if os.environ.get(TAKE_OVER_ENV, "") in ("any", f"{host}:{pid}"):
        log.warning(f"[run] {path}: taking over the lock of pid {pid} on {host} (named by ${TAKE_OVER_ENV})")
        return True
    if host is not None:
        raise ConfigError(
            f"config key 'output_dir' = {folder!r}: {path} was left by pid {pid} on host {host} (started "
            f"{holder.get('started')}), which cannot be checked from here. If that run is gone (e.g. a job "
            f"requeued onto another node), set {TAKE_OVER_ENV}={host}:{pid} to take the folder over")
    raise in_use(folder, path, holder)


def try_flock(fd: int) -> bool | None:
    """An exclusive, non-blocking flock on ``fd``: True if taken, False if another process holds it, None if the
    file system does not support it."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    except OSError as err:
        if err.errno in (errno.EAGAIN, errno.EACCES):
            return False
        if err.errno in NO_FLOCK:
            return None
        raise
    return True


def write_holder(fd: int, me: dict[str, Any]) -> None:
    data = json.dumps(me).encode()
    os.ftruncate(fd, 0)
    if os.pwrite(fd, data, 0) != len(data):
        raise OSError(errno.ENOSPC, "short write")
    os.fsync(fd)


def unwritable(folder: str, path: str, err: OSError) -> FileError:
    return FileError(f"config key 'output_dir' = {folder!r}: could not write {path} ({err}); the run needs a "
                     "writable folder with free space for its checkpoints")


def acquire_lock(folder: str) -> RunLock:
    """Take ``folder`` for this process, or refuse (ConfigError naming the holder) if another live run has it.

    The lock is ``run.lock`` held with an exclusive flock: of several processes started together exactly one
    gets it, and a killed run's flock is gone with its process. The file names its holder (pid, host, start
    time); one whose process is gone is taken over with a message (``may_take_over``). A lock that cannot be
    written (a full disk) is removed again and refused with FileError."""
    path = os.path.join(folder, LOCK_FILE)
    me = {"pid": os.getpid(), "host": socket.gethostname(), "started": datetime.datetime.now().isoformat()}
    patience = time.monotonic() + DEAD_HOLDER_WAIT_S
    while True:
        created = False
        try:
            try:  # never through a symlink: a planted run.lock -> <file> would have its target overwritten
                fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW)
            except FileNotFoundError:
                fd, created = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o666), True
        except FileExistsError:
            continue
        except OSError as err:
            if os.path.islink(path):
                raise not_a_lock(folder, path) from None
            raise unwritable(folder, path, err) from err
        taken = try_flock(fd)
        if taken is None:
            os.close(fd)
            if created:
                os.remove(path)
            return acquire_without_flock(folder, path, me)
        if not taken or not same_file(fd, path):  # held, or removed by its holder between open and flock
            os.close(fd)
            if not taken and not (held_by_the_dead(read_holder(path)) and time.monotonic() < patience):
                raise in_use(folder, path, read_holder(path))
            time.sleep(0.0 if taken else 0.5)
            continue
        lock = RunLock(path, fd)
        try:
            holder = read_holder(path)
            ours = holder.get("pid") == os.getpid() and holder.get("host") == me["host"]  # a release that failed
            if holder and holder.get("pid") is not None and not ours:
                may_take_over(folder, path, holder)
            write_holder(fd, me)
        except OSError as err:
            lock.release()
            raise unwritable(folder, path, err) from err
        except BaseException:
            os.close(fd)  # the lock file stays, its holder's
            lock.fd = None
            raise
        return lock


def held_by_the_dead(holder: dict[str, Any]) -> bool:
    """Whether a lock whose flock is still held names a process of this host that is gone: its children (data
    loader workers forked with the lock open) keep the flock until they notice, within seconds."""
    pid = holder.get("pid")
    return holder.get("host") == socket.gethostname() and isinstance(pid, int) and not process_alive(pid)


def not_a_lock(folder: str, path: str) -> FileError:
    return FileError(f"config key 'output_dir' = {folder!r}: {path} is a symbolic link, not a run's lock; remove "
                     "it (the run writes its lock only as a file of its own)")


GUARD_SUFFIX = ".takeover"  # run.lock.takeover: held (O_EXCL) by the one process replacing a stale lock
GUARD_PATIENCE_S = 10.0  # a take-over lasts milliseconds; a guard older than this was left by a killed process


def take_guard(guard: str, folder: str) -> bool:
    """Create the take-over guard exclusively: True if made, False if another process holds it now (ConfigError
    for a guard left behind long ago: its process was killed mid take-over; the user removes it)."""
    try:
        os.close(os.open(guard, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
        return True
    except FileExistsError:
        try:
            age = time.time() - os.stat(guard, follow_symlinks=False).st_mtime
        except FileNotFoundError:
            return False
        if age > GUARD_PATIENCE_S:
            raise ConfigError(f"config key 'output_dir' = {folder!r}: {guard} was left {age:.0f} s ago by a run "
                              "killed while taking the folder over; delete it if no run is starting there") from None
        return False


def acquire_without_flock(folder: str, path: str, me: dict[str, Any]) -> RunLock:
    """The lock on a file system without flock: created exclusively (O_EXCL, which never follows a symlink). A
    stale lock is removed only by the process holding the take-over guard (``run.lock.takeover``, created
    exclusively too), and only if, read again under the guard, it still names the same stale holder: a lock
    another process has just made is never removed, so at most one process holds the folder."""
    guard = path + GUARD_SUFFIX
    deadline = time.monotonic() + GUARD_PATIENCE_S
    while time.monotonic() < deadline:
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
        except FileExistsError:
            if os.path.islink(path):
                raise not_a_lock(folder, path) from None
            holder = read_holder(path)
            if not holder or not may_take_over(folder, path, holder):  # empty: being written by its new holder
                raise in_use(folder, path, holder) from None
            if not take_guard(guard, folder):
                time.sleep(0.01)
                continue
            try:
                if read_holder(path) == holder:  # still the stale lock, and no one else may remove it now
                    os.remove(path)
            finally:
                os.remove(guard)
            continue
        except OSError as err:
            raise unwritable(folder, path, err) from err
        try:
            write_holder(fd, me)
            st = os.fstat(fd)
        except OSError as err:
            os.close(fd)
            os.remove(path)
            raise unwritable(folder, path, err) from err
        os.close(fd)
        return RunLock(path, identity=(st.st_dev, st.st_ino))
    raise ConfigError(f"config key 'output_dir' = {folder!r}: could not take {path}")


def remove_orphans(folder: str) -> None:
    """What writes that a killed run interrupted left behind: ``.tmp-*`` files and folders (see dmd2.io.files and
    the export's staging folder) in the run folder and its sub-folders (``samples/``)."""
    pattern = glob.escape(folder)
    for path in glob.glob(os.path.join(pattern, ".tmp-*")) + glob.glob(os.path.join(pattern, "*", ".tmp-*")):
        log.info(f"[run] removing {path}, left by an interrupted write")
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        else:
            os.remove(path)


def checkpoint_steps(folder: str, prefix: str) -> dict[str, int | None]:
    """The checkpoints ``<prefix>_NNNNNN.pt`` (their step) and ``<prefix>_final.pt`` (None) in ``folder``."""
    found: dict[str, int | None] = {}
    for name in os.listdir(folder) if os.path.isdir(folder) else []:
        step = checkpoint_step(name, prefix)
        if step is not None:
            found[name] = None if step == FINAL else int(step)
    return found


def recorded_stage(folder: str) -> str | None:
    """The ``stage`` of the run whose config.yaml is in ``folder`` (a top-level ``stage: ...`` line)."""
    try:
        with open(os.path.join(folder, "config.yaml")) as f:
            match = re.search(r"^stage: *(\w+) *$", f.read(), re.MULTILINE)
    except OSError:
        return None
    return match.group(1) if match else None


def check_folder_owner(folder: str, stage: str, resume: str | None) -> None:
    """Refuse to write into a folder of another run: one of the other stage (whatever ``resume`` says), or, for a
    run started without ``resume``, any folder that already holds a run's outputs. ``resume=auto`` in an empty
    or new folder starts fresh."""
    other = next(s for s in PREFIXES if s != stage)
    theirs = sorted(checkpoint_steps(folder, PREFIXES[other]))
    if theirs or recorded_stage(folder) == other:
        what = ", ".join(theirs[:3]) or "config.yaml"
        raise ConfigError(f"config key 'output_dir' = {folder!r} holds a stage={other} run ({what}): a stage={stage} "
                          "run there would replace its config.yaml and mix its metrics. Use another output_dir")
    if resume is not None:
        return
    outputs = sorted(checkpoint_steps(folder, PREFIXES[stage])) + [
        name for name in RUN_OUTPUTS if os.path.exists(os.path.join(folder, name))]
    if outputs:
        raise ConfigError(
            f"config key 'output_dir' = {folder!r} holds an earlier run ({', '.join(outputs[:4])}"
            f"{', ...' if len(outputs) > 4 else ''}): a new run there would overwrite its checkpoints and mix its "
            f"metrics. Continue it with resume=auto output_dir={folder}, or start elsewhere with another output_dir")


def check_branch(folder: str, prefix: str, resumed: str, step: int) -> None:
    """Refuse to continue ``resumed`` (step ``step``) in a folder that holds checkpoints of a later step: the run
    would branch its timeline there (and ``keep_last`` would prune one branch for the other)."""
    later = [name for name, s in checkpoint_steps(folder, prefix).items()
             if (s is None or s > step) and not same_path(os.path.join(folder, name), resumed)]
    if later:
        raise ConfigError(
            f"config key 'resume' = {resumed!r}: output_dir {folder!r} holds checkpoints past its step {step} "
            f"({', '.join(sorted(later)[:3])}); continuing from step {step} there would branch the run. Resume into "
            "another output_dir, or move those checkpoints away")


def same_path(a: str, b: str) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False
