"""The interface every backend implements for one region (chunk indices, already validated)."""

from __future__ import annotations

import abc
import logging
import mmap
import os
from dataclasses import dataclass, field
from typing import Any

from .._native import ffi, lib
from ..errors import VRangeError, check

logger = logging.getLogger("vrange")


_IN_FLIGHT_BITS = bytes(value & lib.VR_CHUNK_IN_FLIGHT for value in range(256))

PURGE_REASONS = {
    "explicit": lib.VR_PURGE_EXPLICIT,
    "pressure": lib.VR_PURGE_PRESSURE,
    "budget": lib.VR_PURGE_BUDGET,
    "kernel": lib.VR_PURGE_KERNEL,
}


@dataclass(frozen=True)
class RegionStats:
    """Counters and current sizes of one region (``Region.stats()``)."""

    faults_served: int
    """Faults resolved by regenerating a chunk (first touches and refills after purges)."""
    faults_on_handler_thread: int
    """Served by the backend's own thread (native sources)."""
    faults_on_faulting_thread: int
    """Served on the thread that faulted (a Python regenerator run while it held the GIL)."""
    faults_on_worker_thread: int
    """Served by a worker that took the GIL (faults inside syscalls, threads without the GIL)."""
    bytes_regenerated: int
    regeneration_errors: int
    purges: int
    """Chunk discards of every reason: by ``purge()``, by vrange's pressure monitor or budget, or
    found discarded by the kernel (a chunk discarded three times counts three times)."""
    volatile_bytes: int
    nonvolatile_bytes: int
    resident_bytes: int
    """Pages present in memory now (lazy-free pages count until the kernel takes them)."""
    purged_bytes: int
    """Bytes that were filled once and are missing now (purged and not yet refilled)."""
    volatile_refills: int = 0
    """Chunks refilled while volatile and made lazy-free again, so the kernel may take them back
    again (uffd backend and the sigbus uffd trap)."""
    trap: str | None = None
    """The sigbus backend's trap (``"uffd"`` or ``"memfd"``); None on the uffd backend."""
    kernel_reclaims: bool = True
    """True when the kernel itself takes this region's volatile pages back under pressure."""
    mappings_reserved: int = 0
    """Memory mappings this region reserves from the process-wide budget: its worst case (one per
    chunk, plus one) on the sigbus backend's memfd trap, 0 where a region stays one mapping
    (``vrange.features().mappings()`` has the process's totals)."""
    purges_by_reason: dict[str, int] = field(default_factory=dict)
    """Chunk discards by reason: ``explicit`` (``purge()``), ``pressure`` (the pressure monitor),
    ``budget`` (over a byte budget), ``kernel`` (found discarded by the kernel)."""
    bytes_purged_by_reason: dict[str, int] = field(default_factory=dict)
    """Bytes vrange itself gave back, by reason (the kernel's discards are not measured)."""


class BackendRegion(abc.ABC):
    """One region's native state in one backend. The bookkeeping every backend shares (chunk
    states, counters, residency) is implemented here on the native region struct."""

    name: str
    pointer: Any
    trap: str | None = None
    """The sigbus backend's trap (``"uffd"`` or ``"memfd"``); None on the uffd backend."""
    kernel_reclaims: bool = True
    """True when the kernel itself discards volatile pages under pressure."""
    managed: bool = False
    """vrange's pressure monitor and budgets may purge it (vrange.policy)."""
    priority: int = 0
    group: str | None = None
    unusable: str | None = None
    """Why the region cannot be used in this process (a forked child that cannot serve it)."""
    mappings_taken: int = 0
    """Mappings reserved after creation (a forked child moved the region to the memfd trap)."""

    def __init__(self, size: int, chunk_size: int) -> None:
        self.chunk_count = -(-size // chunk_size)
        self.page_count = size // mmap.PAGESIZE

    @staticmethod
    def new_native_region(handler: Any, base: int, size: int, chunk_size: int, source_kind: int,
                          file_fd: int, file_offset: int, handle: Any, on_error: int,
                          isolated: Any) -> Any:
        out = ffi.new("vr_region **")
        check(lib.vr_region_new(handler, base, size, chunk_size, source_kind, file_fd, file_offset,
                                handle, on_error, out), "set up the region")
        lib.vr_region_set_isolated(out[0], isolated)  # before any fault can reach the region
        return out[0]

    def fence_in_child(self, reason: str) -> None:
        """Unserved in a forked child: a missing or discarded page would read as zeros. Make the
        region inaccessible (SIGSEGV on access) and every call on it raise, saying why."""
        result = lib.vr_region_fence(self.pointer)
        self.unusable = (f"this {self.name}-backend region cannot be used here: {reason}; its "
                         "memory is made inaccessible rather than handing out zeros for purged "
                         "pages")
        logger.error("vrange: %s%s", self.unusable,
                     "" if result >= 0 else f" (and mprotect failed: {os.strerror(-result)})")

    def set_file_size(self, size: int) -> None:
        lib.vr_region_set_file_size(self.pointer, size)

    @abc.abstractmethod
    def mark_volatile(self, first_chunk: int, end_chunk: int) -> None: ...

    @abc.abstractmethod
    def discard(self, first_chunk: int, end_chunk: int, only_failed: bool) -> None:
        """Make the chunks missing again (all, or only those whose regeneration failed)."""

    @abc.abstractmethod
    def populate(self, first_chunk: int, end_chunk: int) -> int:
        """Make every page present; 0 or -errno (a regeneration may have failed)."""

    @abc.abstractmethod
    def prefault(self, first_chunk: int, end_chunk: int) -> int:
        """Make every page present without changing volatility; 0 or -errno."""

    def purge(self, first_chunk: int, end_chunk: int) -> int:
        """Discard the volatile, unheld chunks of the range now; the bytes given back."""
        return check(int(lib.vr_region_purge_range(self.pointer, first_chunk, end_chunk,
                                                   lib.VR_PURGE_EXPLICIT)),
                     "purge the range")

    def hold(self, first_chunk: int, end_chunk: int, delta: int) -> None:
        """Keep vrange's purges away from the chunks while a system call uses them (+1 / -1)."""
        lib.vr_region_hold(self.pointer, first_chunk, end_chunk, delta)

    @abc.abstractmethod
    def close(self) -> None:
        """Called after the mapping is gone."""

    @abc.abstractmethod
    def resume(self) -> None:
        """close() could not unmap (the region is exported): open the region again."""

    def any_in_flight(self) -> bool:
        """Whether a chunk is being refilled or purged, or a thread that faulted while holding the
        GIL let it go to wait for one (it is in the middle of a statement that uses the region),
        read without letting the GIL go: such a thread cannot start a refill while this runs."""
        if lib.vr_region_gil_waiters_counter(self.pointer)[0]:  # returns a pointer: no wait
            return True
        states = ffi.buffer(lib.vr_region_chunk_state_array(self.pointer), self.chunk_count)
        return bool(bytes(states).translate(_IN_FLIGHT_BITS).strip(b"\0"))

    def quiesce(self, timeout_ms: int) -> None:
        """Before unmapping: start no new regeneration and wait for the running ones, so nothing
        is written at this address once another mapping may take it."""
        if lib.vr_region_quiesce(self.pointer, timeout_ms) < 0:
            self.resume()
            raise VRangeError(
                f"close() waited {timeout_ms / 1000:.0f} s for a regenerator of this region to "
                "finish (is close() called from inside it?); the region stays open")

    def after_fork_in_child(self) -> None:
        """Make the region work in a forked child (called for every live region)."""

    def native_error(self) -> int:
        """The errno of the last failure of a native source on this region (0 if none)."""
        return int(lib.vr_region_last_native_error(self.pointer))

    def map_error(self) -> int:
        """The errno of the last failure to map a refilled chunk (memfd trap; 0 if none)."""
        return int(lib.vr_region_last_map_error(self.pointer))

    def clear_errors(self) -> None:
        lib.vr_region_clear_last_errors(self.pointer)

    def begin_pin(self, first_chunk: int, end_chunk: int) -> list[bool]:
        """Make the chunks non-volatile before populating them, once refills in flight on them are
        done; for each, whether it was volatile (to restore should populating fail)."""
        was_volatile = ffi.new("uint8_t[]", max(end_chunk - first_chunk, 1))
        check(lib.vr_region_begin_pin(self.pointer, first_chunk, end_chunk, was_volatile),
              "pin the range")
        return [bool(was_volatile[i]) for i in range(end_chunk - first_chunk)]

    def finish_nonvolatile(self, first_chunk: int, end_chunk: int) -> list[bool]:
        """Pin the chunks; for each, whether it was purged since marked volatile."""
        purged = ffi.new("uint8_t[]", max(end_chunk - first_chunk, 1))
        check(lib.vr_region_finish_nonvolatile(self.pointer, first_chunk, end_chunk, purged),
              "pin the range")
        return [bool(purged[i]) for i in range(end_chunk - first_chunk)]

    def chunk_states(self) -> bytes:
        states = ffi.new("uint8_t[]", self.chunk_count)
        check(lib.vr_region_chunk_states(self.pointer, states), "read the chunk states")
        return bytes(ffi.buffer(states))

    def residency(self) -> bytes:
        pages = ffi.new("uint8_t[]", self.page_count)
        check(lib.vr_region_residency(self.pointer, pages), "read page residency (mincore)")
        return bytes(ffi.buffer(pages))

    def counters(self) -> dict[str, int]:
        stats = ffi.new("struct vr_stats *")
        lib.vr_region_stats(self.pointer, stats)
        counters = {name: int(getattr(stats, name)) for name in (
            "faults_on_handler_thread", "faults_on_faulting_thread", "faults_on_worker_thread",
            "bytes_regenerated", "regeneration_errors", "purges", "volatile_refills")}
        for reason, index in PURGE_REASONS.items():
            counters[f"purges_{reason}"] = int(stats.purges_by_reason[index])
            counters[f"bytes_purged_{reason}"] = int(stats.bytes_purged_by_reason[index])
        return counters
