"""The sigbus backend: purged chunks are empty-memfd traps; a SIGBUS handler refills them."""

from __future__ import annotations

import atexit
import logging
import os
import threading
import weakref
from typing import Any

from .._native import ffi, lib
from ..errors import check
from ._base import BackendRegion

logger = logging.getLogger("vrange")

_install_lock = threading.Lock()
_live_regions: weakref.WeakSet[SigbusRegion] = weakref.WeakSet()
# Closed regions a SIGBUS handler might still have been using past the grace period: never freed.
_leaked: list[SigbusRegion] = []


def ensure_handler() -> None:
    """Install the SIGBUS handler, or put it back in front if other code replaced it since.

    Replacing vrange's SIGBUS handler (``signal.signal``, ``faulthandler.enable()`` after vrange)
    would make the next access to a purged chunk kill the process; vrange checks at every region
    creation, ``purge`` and ``mark_nonvolatile``, re-installs itself and chains to the replacement.
    """
    with _install_lock:
        state = lib.vr_sigbus_handler_is_ours()
        if state == 1:
            return
        if _live_regions:
            logger.warning("vrange: another SIGBUS handler replaced vrange's; re-installing vrange's "
                           "in front of it (SIGBUS that are not vrange's still reach it)")
        check(lib.vr_sigbus_install(), "install the SIGBUS handler")


def _after_fork_in_child() -> None:
    global _install_lock
    _install_lock = threading.Lock()
    for region in list(_live_regions):
        if region.pointer != ffi.NULL:
            lib.vr_sigbus_after_fork(region.pointer)


os.register_at_fork(after_in_child=_after_fork_in_child)
atexit.register(lib.vr_sigbus_python_finalized)


class SigbusRegion(BackendRegion):
    name = "sigbus"

    def __init__(self, owner: Any, base: int, size: int, chunk_size: int, source_kind: int,
                 file_fd: int, file_offset: int, on_error: int) -> None:
        super().__init__(size, chunk_size)
        ensure_handler()
        self.handle = ffi.new_handle(owner)
        self.pointer = self.new_native_region(ffi.NULL, base, size, chunk_size, source_kind,
                                              file_fd, file_offset, self.handle, on_error)
        result = lib.vr_sigbus_attach(self.pointer)
        if result < 0:
            lib.vr_sigbus_detach(self.pointer)
            lib.vr_region_release(self.pointer)
            self.pointer = ffi.NULL
            check(result, "map the region's trap (memfd_create, mmap)"
                  + (" — too many sigbus regions are open" if result == -24 else ""))
        _live_regions.add(self)

    def mark_volatile(self, first_chunk: int, end_chunk: int) -> None:
        # The kernel cannot discard these pages by itself: purging is vrange's decision.
        lib.vr_region_set_volatile(self.pointer, first_chunk, end_chunk)

    def discard(self, first_chunk: int, end_chunk: int, only_failed: bool) -> None:
        check(lib.vr_sigbus_discard(self.pointer, first_chunk, end_chunk, int(only_failed)),
              "map the trap over failed chunks")

    def populate(self, first_chunk: int, end_chunk: int) -> int:
        ensure_handler()
        return int(lib.vr_sigbus_populate(self.pointer, first_chunk, end_chunk))

    def prefault(self, first_chunk: int, end_chunk: int) -> int:
        return self.populate(first_chunk, end_chunk)  # volatility is only vrange's bookkeeping

    def purge(self, first_chunk: int, end_chunk: int) -> int:
        ensure_handler()
        return check(int(lib.vr_sigbus_purge(self.pointer, first_chunk, end_chunk)),
                     "purge the range (map the trap over it)")

    def resume(self) -> None:
        lib.vr_sigbus_resume(self.pointer)

    def close(self) -> None:
        if self.pointer == ffi.NULL:
            return
        _live_regions.discard(self)
        if lib.vr_sigbus_detach(self.pointer) < 0:
            logger.warning("vrange: a SIGBUS handler was still running 5 s after the region closed; "
                           "its bookkeeping is kept for good")
            _leaked.append(self)
            return
        lib.vr_region_release(self.pointer)
        self.pointer = ffi.NULL
