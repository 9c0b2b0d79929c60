"""One writer per output directory.

``hold(directory, who)`` takes an exclusive lock (``flock``) on the file ``directory + ".lock"``,
next to the directory, so that nothing is created inside a directory before it has been checked.
The lock is held for the whole run of a writer (`dsv32 convert`, `dsv32 train`, the synthetic
checkpoint writer); a second writer of the same directory gets ``Busy``: "DIR is being written by
pid N (WHO)", and touches nothing.

The file holds "PID WHO". The kernel drops the lock when its process dies, so after kill -9 the
next writer simply takes the stale file over; a writer that ends removes it (while still holding
the lock; a writer that opened it just before checks after locking that the path is still its file).
An existing lock path that is not such a file (a directory, a symlink, other content) is refused
and left alone.
"""

from __future__ import annotations

import fcntl
import os
import re
import stat

_CONTENT = re.compile(rb"(\d+) ([^\n]*)\n")


class Busy(ValueError):
    """The directory is being written by another live process."""


def lock_path(directory: str | os.PathLike) -> str:
    """`directory`.lock, symlinks resolved: two spellings of one directory share one lock."""
    return os.path.realpath(os.fspath(directory)).rstrip(os.sep) + ".lock"


class DirLock:
    """A held lock; ``release()`` (or leaving the ``with`` block) removes the file and unlocks. A
    lock dropped without release is unlocked when it is garbage-collected (its file stays)."""

    def __init__(self, path: str, fd: int) -> None:
        self.path, self._file = path, os.fdopen(fd, "r+b")

    def release(self) -> None:
        if self._file.closed:
            return
        try:
            st = os.stat(self.path, follow_symlinks=False)
            if _identity(st) == _identity(os.fstat(self._file.fileno())):
                os.unlink(self.path)
        except FileNotFoundError:
            pass
        finally:
            self._file.close()

    def __enter__(self) -> DirLock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _identity(st: os.stat_result) -> tuple[int, int]:
    return st.st_dev, st.st_ino


def _holder(fd: int) -> str:
    m = _CONTENT.fullmatch(os.pread(fd, 4096, 0))
    return f"pid {int(m.group(1))} ({m.group(2).decode(errors='replace')})" if m else "another process"


def hold(directory: str | os.PathLike, who: str) -> DirLock:
    """Lock `directory` for writing by this process (`who` names the writer in a Busy message).
    Creates the parent directory if needed. Raises Busy if another live process holds it, ValueError
    if the lock path is not a lock file of ours, OSError if the filesystem cannot lock."""
    directory = os.fspath(directory)
    path = lock_path(directory)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        except OSError as e:
            if not os.path.lexists(path):
                raise OSError(e.errno, f"{path}: cannot create the lock file of {directory} "
                                       f"({e.strerror})") from e
            raise ValueError(f"{path}: exists and cannot be opened as the lock file of {directory} "
                             f"({e.strerror}); it was left as it is: move it away or choose another "
                             "directory") from e
        try:
            mine = _lock(fd, path, directory, who)
        except BaseException:
            os.close(fd)
            raise
        if mine:
            return DirLock(path, fd)
        os.close(fd)  # the previous holder removed the file between our open and lock: again


def _lock(fd: int, path: str, directory: str, who: str) -> bool:
    """Lock the open `path`; False if the path no longer names the locked file."""
    st = os.fstat(fd)
    content = os.pread(fd, 4096, 0)
    if not stat.S_ISREG(st.st_mode) or (content and not _CONTENT.fullmatch(content)):
        raise ValueError(f"{path}: exists and is not a lock file of dsv32 (\"PID NAME\"); it was left as it "
                         "is: move it away or choose another directory")
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise Busy(f"{directory} is being written by {_holder(fd)}; wait for it to finish, or stop it, "
                   "or choose another directory") from None
    except OSError as e:
        raise OSError(e.errno, f"{path}: cannot lock it ({e.strerror}); the filesystem of {directory} "
                               "does not support flock") from e
    try:
        now = os.stat(path, follow_symlinks=False)
    except FileNotFoundError:
        return False
    if _identity(now) != _identity(st):
        return False
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()} {who}\n".encode(), 0)
    return True
