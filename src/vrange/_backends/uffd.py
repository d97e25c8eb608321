"""The userfaultfd backend: Python side of the process-wide fault handler and of each region."""

from __future__ import annotations

import logging
import os
import signal
import threading
import weakref
from typing import Any

from .._native import ffi, lib
from .._regeneration import Target
from ..errors import check
from ._base import BackendRegion

logger = logging.getLogger("vrange")

# The real-time signal that carries Python-regenerator faults to the faulting thread.
FAULT_SIGNAL = signal.SIGRTMIN + 6


class _Handler:
    """The process's fault handler: one userfaultfd, one C thread, a pool of GIL-taking workers.
    It lives as long as the process (a forked child makes its own)."""

    def __init__(self) -> None:
        out = ffi.new("vr_handler **")
        check(lib.vr_handler_new(FAULT_SIGNAL, out), "open a userfaultfd for the fault handler")
        self.pointer = out[0]
        result = lib.vr_handler_start(self.pointer)
        if result < 0:
            lib.vr_handler_free(self.pointer)
            check(result, f"install the fault signal (SIGRTMIN+6) and start the handler thread "
                          f"(is signal {FAULT_SIGNAL} used by other code in this process?)")
        self.pid = os.getpid()

    def ensure_signal(self) -> None:
        """Take the fault signal back if other code replaced vrange's handler since."""
        if lib.vr_handler_signal_is_ours(self.pointer) == 1:
            return
        logger.warning("vrange: the handler of signal %d (SIGRTMIN+6) was replaced; "
                       "re-installing vrange's", FAULT_SIGNAL)
        check(lib.vr_fault_signal_install(FAULT_SIGNAL, 1), "re-install the fault signal handler")


_handler: _Handler | None = None
_handler_lock = threading.Lock()
_live_regions: weakref.WeakSet[UffdRegion] = weakref.WeakSet()
# Closed regions whose C struct may still be used by a job in flight (which calls back into Python
# through the handle); released once the C side says nobody else holds them.
_retired: list[UffdRegion] = []
# The sweep's cffi calls let the GIL go: without this, two threads creating regions at once could
# both release the same retired region (a double free).
_retired_lock = threading.Lock()


def _get_handler() -> _Handler:
    global _handler
    with _handler_lock:
        if _handler is None:
            _handler = _Handler()
        _handler.ensure_signal()
        return _handler


def _sweep_retired() -> None:
    with _retired_lock:
        keep = []
        for region in _retired:
            if lib.vr_region_references(region.pointer) == 1:
                lib.vr_region_release(region.pointer)
                region.pointer = ffi.NULL
            else:
                keep.append(region)
        _retired[:] = keep


def _after_fork_in_child() -> None:
    """A forked child has no handler thread and its mapping is not registered: give it its own
    handler and register every live region with it, so missing pages are regenerated, never read
    as zeros."""
    global _handler, _handler_lock, _retired_lock
    _handler_lock = threading.Lock()
    _retired_lock = threading.Lock()
    if _handler is None:
        return
    _handler = None
    _retired.clear()
    regions = [region for region in list(_live_regions) if region.pointer != ffi.NULL]
    if not regions:
        return
    try:
        handler = _get_handler()
    except OSError as error:
        for region in regions:
            region.fence_in_child(f"this forked child cannot open a userfaultfd of its own ({error})")
        return
    for region in regions:
        result = lib.vr_region_rebind_after_fork(region.pointer, handler.pointer)
        if result < 0:
            region.fence_in_child("this forked child could not register it with its userfaultfd "
                                  f"({os.strerror(-result)})")


os.register_at_fork(after_in_child=_after_fork_in_child)


class UffdRegion(BackendRegion):
    name = "uffd"

    def __init__(self, owner: Any, base: int, size: int, chunk_size: int, source_kind: int,
                 file_fd: int, file_offset: int, on_error: int, isolated: Any) -> None:
        super().__init__(size, chunk_size)
        handler = _get_handler()
        self.handle = ffi.new_handle(Target(owner))  # weak: no cycle through the handle
        self.pointer = self.new_native_region(handler.pointer, base, size, chunk_size, source_kind,
                                              file_fd, file_offset, self.handle, on_error,
                                              isolated)
        result = lib.vr_region_register(self.pointer)
        if result < 0:
            lib.vr_region_release(self.pointer)
            self.pointer = ffi.NULL
            check(result, "register the region with userfaultfd")
        _live_regions.add(self)
        _sweep_retired()

    def mark_volatile(self, first_chunk: int, end_chunk: int) -> None:
        check(lib.vr_region_mark_volatile(self.pointer, first_chunk, end_chunk),
              "mark the range volatile (MADV_FREE)")

    def discard(self, first_chunk: int, end_chunk: int, only_failed: bool) -> None:
        check(lib.vr_region_discard(self.pointer, first_chunk, end_chunk, int(only_failed)),
              "drop failed pages (MADV_DONTNEED)")

    def populate(self, first_chunk: int, end_chunk: int) -> int:
        return int(lib.vr_region_populate(self.pointer, first_chunk, end_chunk))

    def prefault(self, first_chunk: int, end_chunk: int) -> int:
        return int(lib.vr_region_prefault(self.pointer, first_chunk, end_chunk))

    def resume(self) -> None:
        lib.vr_region_resume(self.pointer)

    def close(self) -> None:
        if self.pointer == ffi.NULL:
            return
        if self.unusable:  # its handler is the parent's (whose lock a fork may have caught held)
            _live_regions.discard(self)
            self.pointer = ffi.NULL  # the native state stays allocated: it is this child's leak
            return
        lib.vr_region_close(self.pointer)
        _live_regions.discard(self)
        with _retired_lock:
            _retired.append(self)
        _sweep_retired()
