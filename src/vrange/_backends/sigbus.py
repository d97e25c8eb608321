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

from .._feature_report import BackendSupport, TrapSupport, describe_errno
from .._mappings import mapping_budget
from .._native import ffi, lib
from ..errors import VRangeError, check
from . import _registry
from ._base import BackendRegion, Plan, ProbedFacts, SourceSpec
from ._regeneration import Regeneration

logger = logging.getLogger("vrange")

MAX_MEMFD_TRAP_CHUNKS = 8192
"""The memfd trap keeps each refilled chunk in a mapping of its own (mremap), so a region uses at
most this many chunks (a larger chunk_size for regions over 512 MiB at 64 KiB) to stay far below
vm.max_map_count (65530 by default). The uffd trap has no such limit."""

_install_lock = threading.Lock()
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
# In a forked child: its own trap descriptor, or why it has none.
_child_trap_fd: int | None = None
_child_trap_error = ""


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
        if _registry.live_regions(SigbusRegion):
            logger.warning("another SIGBUS handler replaced vrange's; re-installing vrange's "
                           "in front of it (SIGBUS that are not vrange's still reach it)")
        check(lib.vr_sigbus_install(), "install the SIGBUS handler")


atexit.register(lib.vr_sigbus_python_finalized)


def _probe_uffd_trap(facts: ProbedFacts) -> TrapSupport:
    """The userfaultfd trap is verified by doing: open a SIGBUS-mode userfaultfd the way a region
    does, register a scratch page and fill it with UFFDIO_COPY."""
    fd_out = ffi.new("int *", -1)
    result = lib.vr_sigbus_uffd_trap_open(fd_out)
    if result in (-errno.EINVAL, -errno.EOPNOTSUPP):
        # A descriptor opens (the open's refusals are EPERM, ENOSYS, ...): the handshake refused
        # the feature (a kernel that does not know it answers EINVAL) or did not grant it.
        return TrapSupport("uffd", False, False, "the UFFDIO_API handshake refuses or does not "
                           "grant UFFD_FEATURE_SIGBUS (Linux < 4.14): "
                           f"{describe_errno(-result)}")
    if result == 0:
        try:
            result = lib.vr_sigbus_uffd_trap_probe(fd_out[0])
        finally:
            lib.vr_close(fd_out[0])
    if result < 0:
        return TrapSupport("uffd", False, False, "no SIGBUS-mode userfaultfd can be used here: "
                           f"{describe_errno(-result)}")
    if "FREE" not in facts.madvise_accepted:
        return TrapSupport("uffd", False, False, "madvise rejects MADV_FREE")
    return TrapSupport(
        "uffd", True, True,
        "a SIGBUS-mode userfaultfd (UFFD_FEATURE_SIGBUS, user-mode-only where that is all this "
        "process may open) registers private anonymous memory: volatile pages are MADV_FREE'd "
        "and the kernel reclaims them by itself under pressure")


class SigbusRegion(BackendRegion):
    """A region whose missing pages raise SIGBUS on the faulting thread, where vrange's handler
    refills them; a system call that touches one fails with EFAULT (``vrange.io`` retries)."""

    name = "sigbus"
    variants = tuple(TRAP_KINDS)

    @classmethod
    def assess(cls, facts: ProbedFacts) -> tuple[BackendSupport, tuple[TrapSupport, ...]]:
        memfd = facts.memfd
        memfd_trap = TrapSupport(
            "memfd", memfd.ok, False,
            "an empty memfd is mapped over purged chunks: the kernel cannot reclaim these pages, "
            "only vrange's purges give memory back" if memfd.ok
            else f"memfd_create fails with {memfd.error}")
        traps = (_probe_uffd_trap(facts), memfd_trap)
        trap = next((support for support in traps if support.usable), None)
        if trap is None:
            return BackendSupport(cls.name, False, "; ".join(
                f"{support.name} trap: {support.reason}" for support in traps)), traps
        return BackendSupport(cls.name, True, f"{trap.name} trap: {trap.reason}", trap=trap.name,
                              kernel_reclaims=trap.kernel_reclaims), traps

    @classmethod
    def why_chosen(cls, support: BackendSupport) -> str:
        reclaim = ("the kernel reclaims volatile pages by itself (MADV_FREE) and a SIGBUS handler "
                   "refills them" if support.kernel_reclaims else
                   "the kernel cannot reclaim these pages: only purge() and vrange's own policy give "
                   "memory back")
        return (f"the {support.trap} trap is used: {reclaim}; syscalls on purged pages fail with "
                "EFAULT, use vrange.io")

    @classmethod
    def default_variant(cls, support: BackendSupport) -> str | None:
        return support.trap

    @classmethod
    def plan(cls, size: int, chunk_size: int, variant: str | None) -> Plan:
        if variant != "memfd":
            return Plan(chunk_size)
        if -(-size // chunk_size) > MAX_MEMFD_TRAP_CHUNKS:
            floor = 1 << (-(-size // MAX_MEMFD_TRAP_CHUNKS) - 1).bit_length()
            logger.debug("memfd-trap region of %d bytes uses %d-byte chunks (asked: %d)",
                         size, floor, chunk_size)
            chunk_size = floor
        # Worst case: every chunk refilled is a mapping of its own, plus the region's (_mappings).
        mappings = -(-size // chunk_size) + 1
        mapping_budget.reserve(mappings, f"a memfd-trap region of {size} bytes")
        return Plan(chunk_size, mappings)

    @classmethod
    def reset_after_fork(cls, regions: list[BackendRegion]) -> None:
        """Threads that were inside a handler in the parent do not exist here, and the inherited
        trap descriptor belongs to the parent's memory: the child opens its own."""
        global _install_lock, _detached_lock, _child_trap_fd, _child_trap_error
        _install_lock = threading.Lock()
        _detached_lock = threading.Lock()
        for region in regions:
            if region.pointer != ffi.NULL:
                lib.vr_sigbus_after_fork(region.pointer)
        _child_trap_error = ""
        try:
            _child_trap_fd = _trap_descriptor.reopen_in_child()
        except OSError as error:
            _child_trap_fd = None
            _child_trap_error = str(error)
            logger.error("the forked child cannot open its own userfaultfd: %s", error)

    def __init__(self, owner: object, base: int, size: int, plan: Plan, source: SourceSpec,
                 on_error: str, variant: str | None, regeneration: Regeneration) -> None:
        super().__init__(owner, base, size, plan, source, on_error, variant, regeneration)
        trap = variant or "uffd"
        self.trap = trap
        self.kernel_reclaims = trap == "uffd"
        ensure_handler()
        trap_fd = _trap_descriptor.get() if trap == "uffd" else -1
        self.new_native_region(ffi.NULL)
        result = lib.vr_sigbus_attach(self.pointer, TRAP_KINDS[trap], trap_fd)
        if result < 0:
            lib.vr_sigbus_detach(self.pointer)
            lib.vr_region_release(self.pointer)
            self.pointer = ffi.NULL
            action = ("register the region with the uffd trap (UFFDIO_REGISTER)" if trap == "uffd"
                      else "map the region's memfd trap (memfd_create, mmap)")
            check(result, action + (" — too many sigbus regions are open"
                                    if result == -errno.EMFILE else ""))
        self.opened()
        _release_detached()

    def needs_handler_watchdog(self) -> bool:
        # The kernel makes this trap's pages missing with no vrange call that could notice a
        # replaced SIGBUS handler: the monitor's thread watches for that.
        return self.trap == "uffd"

    def gone_in_child(self) -> None:
        """Out of the SIGBUS handler's table: an access to whatever is mapped at its address now
        is not vrange's."""
        super().gone_in_child()
        if self.pointer != ffi.NULL:
            lib.vr_sigbus_after_fork(self.pointer)
            lib.vr_sigbus_detach(self.pointer)  # close() releases it (detaching again is a no-op)

    def after_fork_in_child(self) -> None:
        """The child's copy of a uffd-trap region is not registered (a missing page would read as
        zeros): register it again with the child's own descriptor, or hand it over to the memfd
        trap, or fence it."""
        super().after_fork_in_child()
        if self.pointer == ffi.NULL or self.trap != "uffd":
            return
        result = -errno.EBADF if _child_trap_fd is None else \
            lib.vr_sigbus_uffd_rebind(self.pointer, _child_trap_fd)
        if result >= 0:
            return
        # Unregistered, a page the kernel discards would read as zeros: hand the region over to
        # the memfd trap (only vrange purges it from now on, under its pressure policy, which takes
        # it on after the fork: `management`). On the memfd trap each refilled chunk is a mapping
        # of its own: reserve the worst case from the process-wide budget first, or the child could
        # die at vm.max_map_count.
        mappings = self.chunk_count + 1
        try:
            mapping_budget.reserve(mappings, "a sigbus region moved to the memfd trap in a forked "
                                             "child")
        except VRangeError as error:
            why = _child_trap_error or f"cannot register it: {os.strerror(-result)}"
            self.fence_in_child(f"no userfaultfd in this forked child ({why}), and the memfd "
                                f"trap cannot take it over: {error}")
            return
        taken_over = lib.vr_sigbus_memfd_take_over(self.pointer)
        if taken_over < 0:
            mapping_budget.release(mappings)
            self.unusable = (f"this sigbus region cannot be used in this forked child (no "
                             f"userfaultfd: {os.strerror(-result)}; no memfd trap: "
                             f"{os.strerror(-taken_over)}); its memory is made inaccessible")
            logger.error("%s", self.unusable)
            return
        self.mappings_reserved += mappings
        logger.warning("the forked child cannot register its userfaultfd-trap region (%s); "
                       "it uses the memfd trap now (the kernel cannot reclaim it)",
                       os.strerror(-result))
        self.trap, self.kernel_reclaims = "memfd", False

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

    def page_out(self, first_byte: int, length: int) -> None:
        ensure_handler()  # a handler replaced since would make the refill fatal
        super().page_out(first_byte, length)

    def resume(self) -> None:
        lib.vr_sigbus_resume(self.pointer)

    def close_native(self) -> None:
        result = lib.vr_sigbus_detach(self.pointer)
        if result == -errno.EBUSY:  # closed from a regenerator, inside a SIGBUS handler
            with _detached_lock:
                _detached.append(self)
            return
        if result < 0:
            logger.warning("a SIGBUS handler was still running 5 s after the region closed; "
                           "its bookkeeping is kept for good")
            _leaked.append(self)
            return
        lib.vr_region_release(self.pointer)
        self.pointer = ffi.NULL
        _release_detached()
