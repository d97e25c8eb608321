"""Native regenerators: sources that rebuild a region's bytes in C, without the GIL.

A region whose regenerator is a native source never runs Python on a fault: the backend fills the
chunk straight from the source on its own thread (uffd) or in its signal handler (sigbus).
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
from typing import Union

from ._native import lib

__all__ = ["File", "Source", "Zeros"]

PathOrFd = Union[str, "os.PathLike[str]", int]


class Source:
    """Base class of native sources. Not meant to be subclassed outside vrange."""

    _kind: int
    _fd: int = -1
    _offset: int = 0

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class Zeros(Source):
    """Every byte of the region is zero: a purged page comes back as zeros."""

    _kind = lib.VR_SOURCE_ZEROS


class File(Source):
    """The region's bytes are a file's bytes from ``offset`` on (read with ``pread``).

    ``path_or_fd`` is a path (opened read-only) or an open descriptor (duplicated, so closing
    yours later does no harm). Bytes past the end of the file read as zeros. The file should not
    change while regions use it: a purged page is re-read from the file as it is then.
    """

    _kind = lib.VR_SOURCE_FILE

    def __init__(self, path_or_fd: PathOrFd, offset: int = 0) -> None:
        if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
            raise ValueError(f"offset must be a non-negative int, not {offset!r}")
        if isinstance(path_or_fd, bool):
            raise TypeError("path_or_fd must be a path or a file descriptor, not a bool")
        if isinstance(path_or_fd, int):
            self._fd = os.dup(path_or_fd)
            self._name = f"fd {path_or_fd}"
        elif isinstance(path_or_fd, (str, os.PathLike)):
            self._fd = os.open(path_or_fd, os.O_RDONLY | os.O_CLOEXEC)
            self._name = os.fspath(path_or_fd)
        else:
            raise TypeError(f"path_or_fd must be a path or a file descriptor, not {path_or_fd!r}")
        os.set_inheritable(self._fd, False)
        self._offset = offset
        try:
            self._check_readable()
        except BaseException:
            os.close(self._fd)
            self._fd = -1
            raise

    def _check_readable(self) -> None:
        """Refuse now what pread() would refuse at every fault (a fault has no caller to tell)."""
        info = os.fstat(self._fd)
        if stat.S_ISDIR(info.st_mode):
            raise IsADirectoryError(errno.EISDIR, f"{self._name} is a directory")
        if not (stat.S_ISREG(info.st_mode) or stat.S_ISBLK(info.st_mode)):
            raise OSError(errno.ESPIPE, f"{self._name} is not a regular file or block device: "
                                        "pread() cannot read it at an offset")
        if fcntl.fcntl(self._fd, fcntl.F_GETFL) & os.O_ACCMODE == os.O_WRONLY:
            raise PermissionError(errno.EBADF, f"{self._name} is open for writing only")

    def __repr__(self) -> str:
        return f"File({self._name!r}, offset={self._offset})"

    def __del__(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
