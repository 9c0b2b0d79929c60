"""Opening input files safely: only regular files are opened (a FIFO blocks open() until a writer
comes, a device never ends), and JSON input refuses the NaN/Infinity literals Python accepts."""

from __future__ import annotations

import os
import stat

_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
          (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
          (stat.S_ISSOCK, "a socket"))


class NotRegularFileError(OSError):
    """A path that should be a file is a FIFO, device, directory or socket."""


def open_regular(path: str | os.PathLike) -> int:
    """A read-only descriptor of `path` (symlinks followed) if it is a regular file, else
    NotRegularFileError saying what it is. The open itself cannot block (O_NONBLOCK, which is then
    cleared), and the check is made on the opened descriptor, so a swap after it changes nothing."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            kind = next((k for test, k in _KINDS if test(mode)), "not a regular file")
            raise NotRegularFileError(f"is {kind}, not a regular file")
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_regular(path: str | os.PathLike) -> bytes:
    """The bytes of the regular file `path` (see `open_regular`)."""
    with os.fdopen(open_regular(path), "rb") as f:
        return f.read()


def no_constants(name: str):
    """json `parse_constant`: NaN, Infinity and -Infinity are not JSON numbers."""
    raise ValueError(f"{name} is not a JSON number")
