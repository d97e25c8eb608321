"""EFAULT-safe I/O on buffers that may hold vrange memory.

A system call that touches a purged chunk behaves differently per backend:

- ``uffd``: the call blocks while the chunk is regenerated, then succeeds (a chunk whose regenerator
  failed under the ``poison`` policy makes it fail with EFAULT);
- ``sigbus``: the call fails with EFAULT (or returns a short count): the kernel does not raise
  SIGBUS for its own copies, so the trap cannot be served.

The helpers here work on either backend and on any buffer: they call the system call directly, and
when it fails with EFAULT they make the remaining part of the buffer present
(:meth:`vrange.Region.prefault`) and retry from where the kernel stopped, so bytes are never lost
or sent twice. A regenerator that fails raises :class:`vrange.RegenerationError`; an EFAULT on
memory that is not vrange's is re-raised as the OSError it is.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
from typing import Any

from ._backends import buffer_address
from .region import Region, find_region

__all__ = ["write", "send", "readinto"]

# How much of the remaining buffer to make present before a retry: enough to amortize the retry,
# small enough not to regenerate a huge buffer that may be purged again before the call reaches it.
PREFAULT_WINDOW = 16 << 20
# A retry that makes no progress means something purges the buffer faster than we can use it.
MAX_RETRIES_WITHOUT_PROGRESS = 8


def _byte_view(buffer: Any, writable: bool) -> memoryview:
    view = memoryview(buffer)
    if writable and view.readonly:
        raise TypeError("the buffer must be writable")
    if not view.c_contiguous:
        raise ValueError("the buffer must be C-contiguous")
    return view.cast("B") if view.format != "B" or view.ndim != 1 else view


def _vrange_parts(view: memoryview) -> list[tuple[Region, int, int]]:
    """The (region, page-aligned offset, length) pieces of vrange memory that ``view`` covers;
    EFAULT if some of it is not vrange memory."""
    if len(view) == 0:
        return []
    start = buffer_address(view)
    end = start + len(view)
    parts = []
    address = start
    page = os.sysconf("SC_PAGE_SIZE")
    while address < end:
        region = find_region(address)
        if region is None:
            raise OSError(errno.EFAULT, "Bad address (the buffer is not vrange memory)")
        offset = (address - region.address) // page * page
        stop = min(end, region.address + len(region))
        parts.append((region, offset, -(-(stop - region.address) // page) * page - offset))
        address = stop
    return parts


def _prefault(view: memoryview) -> None:
    """Make the vrange memory in ``view`` present; raise EFAULT if some of it is not vrange's."""
    for region, offset, length in _vrange_parts(view):
        region.prefault(offset, length)


def _retrying(view: memoryview, attempt: Any, done: int) -> int:
    """Call ``attempt(done)``; on EFAULT make the next window of the view present and try again,
    with that window held against ``purge()`` until the call returns (a purger running meanwhile
    would otherwise take the pages back before the kernel reaches them)."""
    failures = 0
    while True:
        try:
            return int(attempt(done))
        except OSError as error:
            if error.errno != errno.EFAULT:
                raise
            failures += 1
            if failures > MAX_RETRIES_WITHOUT_PROGRESS:
                raise
        # Outside the except block: a RegenerationError should not carry the EFAULT as context.
        with contextlib.ExitStack() as held:
            for region, offset, length in _vrange_parts(view[done:done + PREFAULT_WINDOW]):
                held.enter_context(region.held_for_io(offset, length))
                region.prefault(offset, length)
            try:
                return int(attempt(done))
            except OSError as error:
                if error.errno != errno.EFAULT:
                    raise
                failures += 1  # the window is held: only pages past it can be missing


def write(fd: int, data: Any) -> int:
    """Write all of ``data`` to the file descriptor ``fd``; returns the number of bytes written.

    Retries short writes and EFAULT (after making the buffer present). On a non-blocking descriptor
    a ``BlockingIOError`` carries ``characters_written``: nothing is written twice.
    """
    view = _byte_view(data, writable=False)
    written = 0
    try:
        while written < len(view):
            written += _retrying(view, lambda done: os.write(fd, view[done:]), written)
    except BlockingIOError as error:
        error.characters_written = written
        raise
    return written


def send(sock: socket.socket, data: Any, flags: int = 0) -> int:
    """Send all of ``data`` on ``sock`` (like ``socket.sendall``); returns the number of bytes sent.

    Retries partial sends and EFAULT (after making the buffer present).
    """
    view = _byte_view(data, writable=False)
    sent = 0
    while sent < len(view):
        sent += _retrying(view, lambda done: sock.send(view[done:], flags), sent)
    return sent


def readinto(fd: int, buffer: Any) -> int:
    """Read from ``fd`` into ``buffer`` once (like ``os.readv``); returns the number of bytes read.

    The vrange memory of the destination is made present *before* the read: a datagram socket
    drops a datagram whose copy failed with EFAULT, so retrying afterwards would lose it. Should
    the destination be purged again in between, the read is retried (byte streams keep unread
    input on EFAULT).
    """
    view = _byte_view(buffer, writable=True)
    if len(view) == 0:
        return 0
    try:
        _prefault(view)
    except OSError as error:
        if error.errno != errno.EFAULT:
            raise
        # Part of the buffer is not vrange memory: nothing to make present there.
    return _retrying(view, lambda done: os.readv(fd, [view[done:]]), 0)
