"""The sigbus backend: a SIGBUS handler on the faulting thread refills missing chunks.

Two traps make an access to a missing page raise SIGBUS (see docs/backends.md):

- ``uffd``: the region is registered with the process's SIGBUS-mode userfaultfd; volatile pages are
  MADV_FREE'd and the kernel reclaims them by itself under pressure;
- ``memfd``: an empty memfd is mapped over purged chunks; only vrange purges.
"""

from __future__ import annotations

import atexit
import errno
import logging
import os
import threading
import weakref
from typing import Any

from .. import policy
from .._native import ffi, lib
from .._regeneration import Target
from .._mappings import mapping_budget
from ..errors import VRangeError, check
from ._base import BackendRegion

logger = logging.getLogger("vrange")

_install_lock = threading.Lock()
_live_regions: weakref.WeakSet[SigbusRegion] = weakref.WeakSet()
# Closed regions a SIGBUS handler might still have been using past the grace period: never freed.
_leaked: list[SigbusRegion] = []
# Closed from inside a SIGBUS handler (another region's regenerator): freed by a later close() or
# region creation, once no handler can be using them.
_detached: list[SigbusRegion] = []
_detached_lock = threading.Lock()  # the cffi calls below let the GIL go: never release one twice


def _release_detached() -> None:
    with _detached_lock:
        for region in list(_detached):
            if lib.vr_sigbus_idle(region.pointer) == 1:
                _detached.remove(region)
                lib.vr_region_release(region.pointer)
                region.pointer = ffi.NULL

TRAP_KINDS = {"uffd": lib.VR_TRAP_UFFD, "memfd": lib.VR_TRAP_MEMFD}


class _TrapDescriptor:
    """The process's SIGBUS-mode userfaultfd, shared by every region on the uffd trap. Opened on
    first use; a forked child opens its own (the inherited one belongs to the parent's memory)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.fd: int | None = None

    def get(self) -> int:
        with self.lock:
            if self.fd is None:
                fd_out = ffi.new("int *", -1)
                check(lib.vr_sigbus_uffd_trap_open(fd_out),
                      "open a SIGBUS-mode userfaultfd for the sigbus backend's uffd trap")
                self.fd = int(fd_out[0])
            return self.fd

    def reopen_in_child(self) -> int | None:
        """After fork: close the parent's descriptor and open this process's own."""
        self.lock = threading.Lock()
        if self.fd is None:
            return None
        lib.vr_close(self.fd)
        self.fd = None
        return self.get()


_trap_descriptor = _TrapDescriptor()


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
    """Threads that were inside a handler in the parent do not exist here; the child's copy of a
    uffd-trap region is not registered (a missing page would read as zeros): register it again with
    the child's own descriptor."""
    global _install_lock, _detached_lock
    _install_lock = threading.Lock()
    _detached_lock = threading.Lock()
    regions = [region for region in list(_live_regions) if region.pointer != ffi.NULL]
    for region in regions:
        lib.vr_sigbus_after_fork(region.pointer)
    open_error = ""
    try:
        trap_fd = _trap_descriptor.reopen_in_child()
    except OSError as error:
        trap_fd = None
        open_error = str(error)
        logger.error("vrange: the forked child cannot open its own userfaultfd: %s", error)
    for region in regions:
        if region.trap != "uffd":
            continue
        result = -errno.EBADF if trap_fd is None else lib.vr_sigbus_uffd_rebind(region.pointer,
                                                                                trap_fd)
        if result >= 0:
            continue
        # Unregistered, a page the kernel discards would read as zeros: hand the region over to
        # the memfd trap (only vrange purges it from now on, under its pressure policy).
        # On the memfd trap each refilled chunk is a mapping of its own: reserve the worst case
        # from the process-wide budget first, or the child could die at vm.max_map_count.
        mappings = region.chunk_count + 1
        try:
            mapping_budget.reserve(mappings, "a sigbus region moved to the memfd trap in a forked "
                                             "child")
        except VRangeError as error:
            why = open_error or f"cannot register it: {os.strerror(-result)}"
            region.fence_in_child(f"no userfaultfd in this forked child ({why}), and the memfd "
                                  f"trap cannot take it over: {error}")
            continue
        taken_over = lib.vr_sigbus_memfd_take_over(region.pointer)
        if taken_over < 0:
            mapping_budget.release(mappings)
            region.unusable = (f"this sigbus region cannot be used in this forked child (no "
                               f"userfaultfd: {os.strerror(-result)}; no memfd trap: "
                               f"{os.strerror(-taken_over)}); its memory is made inaccessible")
            logger.error("vrange: %s", region.unusable)
            continue
        region.mappings_taken = mappings
        logger.warning("vrange: the forked child cannot register its userfaultfd-trap region (%s); "
                       "it uses the memfd trap now (the kernel cannot reclaim it)",
                       os.strerror(-result))
        region.trap, region.kernel_reclaims = "memfd", False
        try:
            policy.manage(region, region.priority, region.group)
        except OSError as error:
            logger.error("vrange: the region taken over in the forked child has no pressure "
                         "policy: %s", error)


os.register_at_fork(after_in_child=_after_fork_in_child)
atexit.register(lib.vr_sigbus_python_finalized)


class SigbusRegion(BackendRegion):
    name = "sigbus"

    def __init__(self, owner: Any, base: int, size: int, chunk_size: int, source_kind: int,
                 file_fd: int, file_offset: int, on_error: int, trap: str, isolated: Any) -> None:
        super().__init__(size, chunk_size)
        self.trap = trap
        self.kernel_reclaims = trap == "uffd"
        ensure_handler()
        trap_fd = _trap_descriptor.get() if trap == "uffd" else -1
        self.handle = ffi.new_handle(Target(owner))  # weak: no cycle through the handle
        self.pointer = self.new_native_region(ffi.NULL, base, size, chunk_size, source_kind,
                                              file_fd, file_offset, self.handle, on_error,
                                              isolated)
        result = lib.vr_sigbus_attach(self.pointer, TRAP_KINDS[trap], trap_fd)
        if result < 0:
            lib.vr_sigbus_detach(self.pointer)
            lib.vr_region_release(self.pointer)
            self.pointer = ffi.NULL
            action = ("register the region with the uffd trap (UFFDIO_REGISTER)" if trap == "uffd"
                      else "map the region's memfd trap (memfd_create, mmap)")
            check(result, action + (" — too many sigbus regions are open"
                                    if result == -errno.EMFILE else ""))
        _live_regions.add(self)
        _release_detached()
        if trap == "uffd":
            # The kernel makes this trap's pages missing with no vrange call that could notice a
            # replaced SIGBUS handler: the monitor's thread watches for that.
            policy.start_watchdog()

    def mark_volatile(self, first_chunk: int, end_chunk: int) -> None:
        ensure_handler()
        if self.trap == "uffd":
            check(lib.vr_region_mark_volatile(self.pointer, first_chunk, end_chunk),
                  "mark the range volatile (MADV_FREE)")
        else:  # the kernel cannot discard memfd-trap pages by itself: purging is vrange's decision
            lib.vr_region_set_volatile(self.pointer, first_chunk, end_chunk)

    def discard(self, first_chunk: int, end_chunk: int, only_failed: bool) -> None:
        if self.trap == "uffd":
            check(lib.vr_region_discard(self.pointer, first_chunk, end_chunk, int(only_failed)),
                  "drop failed pages (MADV_DONTNEED)")
        else:
            check(lib.vr_sigbus_memfd_discard(self.pointer, first_chunk, end_chunk,
                                              int(only_failed)),
                  "map the trap over failed chunks")

    def populate(self, first_chunk: int, end_chunk: int) -> int:
        ensure_handler()
        if self.trap == "uffd":
            return int(lib.vr_sigbus_uffd_populate(self.pointer, first_chunk, end_chunk, 1))
        return int(lib.vr_sigbus_memfd_populate(self.pointer, first_chunk, end_chunk))

    def prefault(self, first_chunk: int, end_chunk: int) -> int:
        ensure_handler()
        if self.trap == "uffd":
            return int(lib.vr_sigbus_uffd_populate(self.pointer, first_chunk, end_chunk, 0))
        return int(lib.vr_sigbus_memfd_populate(self.pointer, first_chunk, end_chunk))

    def hold(self, first_chunk: int, end_chunk: int, delta: int) -> None:
        super().hold(first_chunk, end_chunk, delta)
        if delta > 0 and self.trap == "uffd":
            # Present and dirty for the system call: the kernel cannot take the window back before
            # the call reaches it (the hold's release makes it lazy-free again). A regeneration
            # failure here is reported by the prefault that follows.
            lib.vr_sigbus_uffd_populate(self.pointer, first_chunk, end_chunk, 1)

    def purge(self, first_chunk: int, end_chunk: int) -> int:
        ensure_handler()  # a replaced handler would make the next access to a purged chunk fatal
        return super().purge(first_chunk, end_chunk)

    def resume(self) -> None:
        lib.vr_sigbus_resume(self.pointer)

    def close(self) -> None:
        if self.pointer == ffi.NULL:
            return
        _live_regions.discard(self)
        result = lib.vr_sigbus_detach(self.pointer)
        if result == -errno.EBUSY:  # closed from a regenerator, inside a SIGBUS handler
            with _detached_lock:
                _detached.append(self)
            return
        if result < 0:
            logger.warning("vrange: a SIGBUS handler was still running 5 s after the region closed; "
                           "its bookkeeping is kept for good")
            _leaked.append(self)
            return
        lib.vr_region_release(self.pointer)
        self.pointer = ffi.NULL
        _release_detached()
