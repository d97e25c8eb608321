"""Native regenerators: sources that rebuild a region's bytes in C, without the GIL.

A region whose regenerator is a native source never runs Python on a fault: the backend fills the
chunk straight from the source on its own thread (uffd) or in its signal handler (sigbus).
"""

from __future__ import annotations

import base64
import errno
import fcntl
import functools
import inspect
import json
import logging
import os
import pickle
import socket
import stat
import subprocess
import sys
import threading
import weakref
from collections.abc import Callable
from typing import Union

from ._backends import SourceSpec, on_fork_in_child
from ._backends._isolated import SLOTS, IsolatedChannel

logger = logging.getLogger("vrange")

__all__ = ["File", "Isolated", "Source", "Zeros"]

PathOrFd = Union[str, "os.PathLike[str]", int]


_LRU_CACHE_WRAPPER = type(functools.lru_cache(maxsize=None)(lambda: None))
"""The type of what ``functools.lru_cache``/``functools.cache`` make: calling one calls the function
it wraps (``__wrapped__``) and returns what that returns."""


def _call_targets(candidate: object) -> list[object]:
    """What calling ``candidate`` really calls: the callable itself, behind ``functools.partial``,
    a ``staticmethod`` object or ``functools.lru_cache``, and the object's ``__call__`` for an
    instance."""
    target = candidate
    while True:
        if isinstance(target, functools.partial):
            target = target.func
        elif isinstance(target, staticmethod):  # callable since 3.10: calls its function
            target = target.__func__
        elif isinstance(target, _LRU_CACHE_WRAPPER):  # functools.lru_cache / functools.cache
            target = target.__wrapped__  # type: ignore[attr-defined]
        else:
            break
    candidates = [target]
    if not inspect.isfunction(target) and not inspect.ismethod(target) and \
            not inspect.isclass(target):
        call = getattr(type(target), "__call__", None)
        if call is not None:
            candidates.append(call)
    return candidates


def is_async_callable(candidate: object) -> bool:
    """Whether calling ``candidate`` makes a coroutine or an async generator instead of doing the
    work: an ``async def`` function or method, an async generator function, either behind
    ``functools.partial``, or an object whose ``__call__`` is one. A regenerator runs synchronously
    inside a page fault (or a helper's request), where nothing could await it."""
    return any(inspect.iscoroutinefunction(each) or inspect.isasyncgenfunction(each)
               for each in _call_targets(candidate))


def is_generator_callable(candidate: object) -> bool:
    """Whether calling ``candidate`` makes a generator instead of doing the work (a ``def`` with a
    ``yield``: its body runs only when the generator is iterated, which nothing does), also behind
    ``functools.partial`` or as an object's ``__call__``."""
    return any(inspect.isgeneratorfunction(each) for each in _call_targets(candidate))


class Source:
    """Base class of native sources. Not meant to be subclassed outside vrange."""

    _kind: str
    _fd: int = -1
    _offset: int = 0
    _size: int = -1

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"

    def _spec(self, chunk_size: int) -> SourceSpec:
        """What a new region of ``chunk_size`` chunks needs of this source."""
        return SourceSpec(self._kind, self._fd, self._offset, self._size)


class Zeros(Source):
    """Every byte of the region is zero: a purged page comes back as zeros."""

    _kind = "zeros"


class File(Source):
    """The region's bytes are a file's bytes from ``offset`` on (read with ``pread``).

    ``path_or_fd`` is a path (opened read-only) or an open descriptor (duplicated, so closing
    yours later does no harm); a regular file or a block device. Bytes past the end of the file
    (its size when the source is made) read as zeros. The file should not change while regions use
    it: a purged page is re-read from the file as it is then, and if the file has become shorter
    than it was, that regeneration fails (by the region's ``on_error`` policy, or
    :class:`vrange.RegenerationError` from a library call) instead of handing out zeros.
    """

    _kind = "file"

    def __init__(self, path_or_fd: PathOrFd, offset: int = 0) -> None:
        if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
            raise ValueError(f"offset must be a non-negative int, not {offset!r}")
        if isinstance(path_or_fd, bool):
            raise TypeError("path_or_fd must be a path or a file descriptor, not a bool")
        if isinstance(path_or_fd, int):
            self._fd = os.dup(path_or_fd)
            self._name = f"fd {path_or_fd}"
        elif isinstance(path_or_fd, (str, os.PathLike)):
            # O_NONBLOCK: opening a FIFO for reading would otherwise wait for a writer (refused
            # below); it does not change reads of regular files or block devices.
            self._fd = os.open(path_or_fd, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
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
        flags = fcntl.fcntl(self._fd, fcntl.F_GETFL)
        if flags & getattr(os, "O_PATH", 0):
            raise PermissionError(errno.EBADF, f"{self._name} is an O_PATH descriptor: it cannot "
                                               "be read")
        if flags & os.O_ACCMODE == os.O_WRONLY:
            raise PermissionError(errno.EBADF, f"{self._name} is open for writing only")
        # The size now: bytes past it read as zeros, but a file that shrinks later makes the
        # regeneration of the missing part fail (never zeros in place of data that was there).
        self._size = info.st_size if stat.S_ISREG(info.st_mode) else \
            os.lseek(self._fd, 0, os.SEEK_END)

    def __repr__(self) -> str:
        return f"File({self._name!r}, offset={self._offset})"

    def __del__(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


_live_isolated: weakref.WeakSet[Isolated] = weakref.WeakSet()


class Isolated(Source):
    """A Python regenerator run in a helper process, outside this process's GIL.

    ``Isolated("package.module:function", *args, timeout=10.0)`` (or the function itself, if it is
    importable by that name): on a fault the helper calls ``function(offset, buf, *args)``, where
    ``buf`` is a writable memoryview of one chunk, exactly like an in-process regenerator. The thread
    that faulted waits (in the kernel on the uffd backend, in its SIGBUS handler on the sigbus
    backend) without running Python and without letting its GIL go: no other Python thread can run
    in the middle of the operation that faulted, whatever the regenerator does (I/O, ``time.sleep``,
    Pillow or zlib decoding that release their own process's GIL). Use it for every regenerator
    that may release the GIL (see docs/design.md, "Which regenerators are sound where").

    ``args`` must be picklable (they are sent to the helper once); the helper imports with this
    process's ``sys.path``. A helper that raises fails the
    fault by the region's ``on_error`` policy (``mark_nonvolatile``/``prefault`` raise
    :class:`vrange.RegenerationError` with its traceback); one that dies or does not answer within
    ``timeout`` seconds is killed, the fault fails the same way, and a new helper is started at the
    next library call (``mark_nonvolatile``, ``prefault``, ``vrange.io``): a fault never hangs. A
    source serves regions of one chunk size (the first region's).
    """

    _kind = "isolated"

    def __init__(self, target: str | Callable[..., object], *args: object,
                 timeout: float = 10.0) -> None:
        from ._isolated_helper import resolve

        if callable(target) and not isinstance(target, str):
            module, name = getattr(target, "__module__", None), getattr(target, "__qualname__", "")
            if not module or module == "__main__" or "<locals>" in name or "<lambda>" in name:
                raise ValueError(f"{target!r} cannot be imported by a helper process: pass a "
                                 "module-level function of an importable module, or its "
                                 "'package.module:function' name")
            target = f"{module}:{name}"
        if not isinstance(target, str) or ":" not in target:
            raise TypeError(f"target must be 'package.module:function' or such a function, "
                            f"not {target!r}")
        try:
            function = resolve(target)
        except Exception as error:  # noqa: BLE001 - reported with the target's name
            raise ValueError(f"cannot import the regenerator {target!r}: {error}") from error
        if is_async_callable(function):
            raise TypeError(f"the regenerator {target!r} is an async function: the helper process "
                            "calls it synchronously and would never await it; make it a plain "
                            "function")
        if is_generator_callable(function):
            raise TypeError(f"the regenerator {target!r} is a generator function: calling it runs "
                            "nothing of its body (it fills nothing); make it a plain function")
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0:
            raise ValueError(f"timeout must be a positive number of seconds, not {timeout!r}")
        try:
            self._arguments = base64.b64encode(pickle.dumps(args)).decode()
        except Exception as error:  # noqa: BLE001 - reported as a bad argument
            raise TypeError(f"the arguments of an Isolated regenerator must be picklable: "
                            f"{error}") from error
        self._target = target
        self._timeout_ms = int(timeout * 1000)
        self._lock = threading.Lock()
        self._channel: IsolatedChannel | None = None
        self._slot_size = 0
        self._memfd = -1
        self._process: subprocess.Popen[bytes] | None = None
        self.restarts = 0
        """Helpers started after the first (one died or hung)."""
        _live_isolated.add(self)

    def __repr__(self) -> str:
        return f"Isolated({self._target!r}, timeout={self._timeout_ms / 1000})"

    def _spec(self, chunk_size: int) -> SourceSpec:
        """The native helper channel for a region of ``chunk_size`` chunks (the helper starts
        now)."""
        with self._lock:
            if self._channel is None:
                memfd = os.memfd_create("vrange-isolated", os.MFD_CLOEXEC)
                try:
                    os.ftruncate(memfd, chunk_size * SLOTS)
                    channel = IsolatedChannel(memfd, chunk_size, self._timeout_ms)
                except BaseException:
                    os.close(memfd)
                    raise
                self._channel, self._memfd, self._slot_size = channel, memfd, chunk_size
                self._start_locked()
            elif chunk_size > self._slot_size:
                raise ValueError(f"this Isolated source serves chunks of at most "
                                 f"{self._slot_size} bytes; make another one for this region")
            return SourceSpec(self._kind, isolated=self._channel.pointer)

    @property
    def timeout_ms(self) -> int:
        """How long a fault waits for the helper before it fails (milliseconds)."""
        return self._timeout_ms

    def _helper_gone(self) -> bool:
        assert self._channel is not None
        return self._channel.helper_dead() or (
            self._process is not None and self._process.poll() is not None)

    def ensure_running(self) -> None:
        """Start a new helper if the last one died (even while idle) or hung."""
        if self._channel is not None and self._helper_gone():
            with self._lock:
                if self._helper_gone():
                    self.restarts += 1
                    logger.warning("restarting the helper of %r (it died or hung)", self)
                    self._start_locked()

    def last_error(self) -> str:
        """The traceback of the helper's last failed regeneration."""
        if self._channel is None:
            return ""
        return self._channel.last_error()

    def _start_locked(self) -> None:
        assert self._channel is not None
        self._channel.claim_all(self._timeout_ms + 1000)
        try:
            self._stop_process()
            ours, theirs = zip(*(socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
                                 for _ in range(SLOTS)))
            try:
                config = json.dumps({"target": self._target, "arguments": self._arguments,
                                     "slot_size": self._slot_size, "memfd": self._memfd,
                                     "fds": [end.fileno() for end in theirs],
                                     "path": [entry for entry in sys.path if entry]})
                self._process = subprocess.Popen(
                    [sys.executable, "-m", "vrange._isolated_helper", config],
                    pass_fds=[self._memfd, *(end.fileno() for end in theirs)],
                    stdin=subprocess.DEVNULL)
            finally:
                for end in theirs:
                    end.close()
            self._channel.set_helper(self._process.pid, [end.detach() for end in ours])
        finally:
            self._channel.release_all()

    def _stop_process(self) -> None:
        if self._process is not None:
            if self._process.poll() is None:
                self._process.kill()
            self._process.wait()
            self._process = None

    def _after_fork_in_child(self) -> None:
        if self._channel is None:
            return
        self._lock = threading.Lock()
        self._channel.forget_helper()
        # The shared memfd is the parent's too (its helper writes there): a memfd of our own.
        try:
            memfd = os.memfd_create("vrange-isolated", os.MFD_CLOEXEC)
            os.ftruncate(memfd, self._slot_size * SLOTS)
            self._channel.remap(memfd)
        except OSError as error:
            logger.error("the forked child cannot map its own buffer for %r: %s",
                         self, error)
            return
        os.close(self._memfd)
        self._memfd = memfd
        if self._process is not None:
            self._process.returncode = 0  # the parent's helper: not ours to wait for or warn about
            self._process = None
        try:
            self._start_locked()
        except OSError as error:
            logger.error("the forked child cannot start its own helper for %r: %s",
                         self, error)

    def __del__(self) -> None:
        # No region uses this source any more (regions keep their source alive).
        channel = getattr(self, "_channel", None)
        if channel is not None:
            channel.free()  # closes the sockets: EOF, the helper exits
            self._channel = None
            try:
                self._stop_process()
                os.close(self._memfd)
            except Exception:  # noqa: BLE001 - interpreter shutdown
                pass


def _after_fork_in_child() -> None:
    for source in list(_live_isolated):
        source._after_fork_in_child()


on_fork_in_child(_after_fork_in_child)
