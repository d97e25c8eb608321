"""The interface every backend implements for one region (chunk indices, already validated), and
what a backend states about itself: its requirements (``assess``), why ``auto`` picks it
(``why_chosen``), its geometry (``plan``) and its default error policy."""

from __future__ import annotations

import abc
import logging
import mmap
import os
import re
import time
import weakref
from dataclasses import dataclass, field
from typing import Any, ClassVar

from .._feature_report import BackendSupport, Features, ProbeOutcome, TrapSupport, UserfaultfdReport
from .._mappings import mapping_budget
from .._native import ffi, lib
from ..errors import VRangeError, check
from . import _registry
from ._regeneration import Regeneration, is_regenerating

logger = logging.getLogger("vrange")


_registry.on_fork_reset_lock(mapping_budget.new_lock_after_fork)

_IN_FLIGHT_BITS = bytes(value & lib.VR_CHUNK_IN_FLIGHT for value in range(256))
_VOLATILE_BITS = bytes(1 if value & lib.VR_CHUNK_VOLATILE else 0 for value in range(256))
_VOLATILE_RUN = re.compile(b"\x01+")

ERROR_POLICIES = {
    "poison": lib.VR_ON_ERROR_POISON,
    "zeros": lib.VR_ON_ERROR_ZEROS,
    "abort": lib.VR_ON_ERROR_ABORT,
}
"""``on_error`` names and their native values."""

SOURCE_KINDS = {
    "python": lib.VR_SOURCE_PYTHON,
    "zeros": lib.VR_SOURCE_ZEROS,
    "file": lib.VR_SOURCE_FILE,
    "isolated": lib.VR_SOURCE_ISOLATED,
}


@dataclass(frozen=True)
class SourceSpec:
    """Where a region's bytes come from, as its native state needs it."""

    kind: str
    """``python`` (a callable, through the regeneration callback), ``zeros``, ``file`` or
    ``isolated`` (a helper process)."""
    fd: int = -1
    offset: int = 0
    file_size: int = -1
    """``file``: the file's size when the source was made (-1: any)."""
    isolated: Any = None
    """``isolated``: the native state of the helper (``_isolated.IsolatedChannel.pointer``)."""


@dataclass(frozen=True)
class ProbedFacts:
    """The probed facts a backend's requirements are evaluated on (``BackendRegion.assess``)."""

    userfaultfd: UserfaultfdReport
    madvise_accepted: frozenset[str]
    memfd: ProbeOutcome


@dataclass
class Plan:
    """A new region's geometry on one backend, and the mappings it reserved for its worst case
    from the process-wide budget (``vrange._mappings``); released if the region is never made."""

    chunk_size: int
    mappings: int = 0

    def release(self) -> None:
        mapping_budget.release(self.mappings)
        self.mappings = 0

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
    """Chunks regenerated for accesses (first touches and refills after purges): one per fault,
    plus the chunks a forward walk had filled ahead (``chunks_filled_ahead``)."""
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
    chunks_filled_ahead: int = 0
    """Missing chunks filled right after a fault of a thread walking forward through the region,
    before it touched them (docs/design.md#fill-ahead). They are served chunks too: counted in
    ``faults_served`` and its split by thread, as the fault that filled them."""
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


PAGE_OUT_ATTEMPTS = 2  # repeats of MADV_PAGEOUT beyond one per CPU (see page_out)
PAGE_OUT_REFILL_WAIT_MS = 200  # the most page_out waits for a refill in flight (see page_out)


class BackendRegion(abc.ABC):
    """One region's native state in one backend. The bookkeeping every backend shares (chunk
    states, counters, residency) is implemented here on the native region struct.

    A subclass is one backend: it states its name, its variants (the sigbus backend's traps), its
    requirements and its geometry as class methods, and registers itself with the registry of live
    regions (``_registry``) once its native state serves faults."""

    name: ClassVar[str]
    variants: ClassVar[tuple[str, ...]] = ()
    """Forms of the backend a spec ``name:variant`` selects (the sigbus backend's traps)."""
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

    management: bool | None = None
    """What the region was created with (``Region(managed=...)``): True or False decide, None lets
    the policy manage it when the kernel cannot reclaim it (also after a forked child moved it)."""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if not getattr(cls, "__abstractmethods__", None):
            _registry.add_backend_class(cls)

    def __init__(self, owner: object, base: int, size: int, plan: Plan, source: SourceSpec,
                 on_error: str, variant: str | None, regeneration: Regeneration) -> None:
        """Set up the region's native state for the mapping at ``base`` (made by ``owner``, the
        public region, held weakly) and register it as live; ``variant`` as ``plan`` took it."""
        self.owner = weakref.ref(owner)
        self.base = base
        self.size = size
        self.chunk_size = plan.chunk_size
        self.chunk_count = -(-size // plan.chunk_size)
        self.page_count = size // mmap.PAGESIZE
        self.mappings_reserved = plan.mappings
        self.source = source
        self.on_error = on_error
        self.regeneration = regeneration
        self.pointer = ffi.NULL
        # What native code holds (through a cffi handle) to call the regenerator.
        self.handle = ffi.new_handle(regeneration)

    # --- what a backend states about itself (class methods) ---------------------------------------

    @classmethod
    @abc.abstractmethod
    def assess(cls, facts: ProbedFacts) -> tuple[BackendSupport, tuple[TrapSupport, ...]]:
        """Whether this backend (and each of its variants) can run here, and why or why not."""

    @classmethod
    @abc.abstractmethod
    def why_chosen(cls, support: BackendSupport) -> str:
        """Why ``auto`` picks this backend (it is the first usable one of the table's order)."""

    @classmethod
    def default_variant(cls, support: BackendSupport) -> str | None:
        """The variant a spec without one uses here (the sigbus backend's preferred trap)."""
        return None

    @classmethod
    def default_error_policy(cls, report: Features) -> str:
        """The ``on_error`` policy of a region that names none."""
        return "poison"

    @classmethod
    def error_policy_problem(cls, policy: str, report: Features) -> str | None:
        """Why this backend cannot honour the ``on_error`` policy ``policy`` here (None: it can)."""
        return None

    @classmethod
    def plan(cls, size: int, chunk_size: int, variant: str | None) -> Plan:
        """The geometry of a new region (may enlarge ``chunk_size``), with its mapping reservation
        taken (VRangeError when the process-wide budget cannot hold it)."""
        return Plan(chunk_size)

    @classmethod
    def reset_after_fork(cls, regions: list[BackendRegion]) -> None:
        """In a forked child, before any region's ``after_fork_in_child``: make this backend's
        process-wide state (locks, threads, descriptors) the child's own. ``regions``: this
        backend's live regions."""

    # --- one region -------------------------------------------------------------------------------

    def new_native_region(self, handler: Any) -> None:
        """Make the shared native state of the region (``self.pointer``)."""
        out = ffi.new("vr_region **")
        source = self.source
        check(lib.vr_region_new(handler, self.base, self.size, self.chunk_size,
                                SOURCE_KINDS[source.kind], source.fd, source.offset, self.handle,
                                ERROR_POLICIES[self.on_error], out), "set up the region")
        lib.vr_region_set_isolated(out[0], ffi.NULL if source.isolated is None
                                   else source.isolated)  # before any fault can reach the region
        if source.file_size >= 0:
            lib.vr_region_set_file_size(out[0], source.file_size)  # nothing can touch it yet
        self.pointer = out[0]

    def limit_fill_ahead(self, end_chunk: int) -> None:
        """Faults fill ahead no further than ``end_chunk`` (the end of a library call's range);
        ``end_chunk`` at or past the last chunk lifts the limit."""
        lib.vr_region_limit_fill_ahead(self.pointer, end_chunk)

    def turn_off_fill_ahead(self) -> None:
        """Every chunk is filled by a fault of its own (``Region(fill_ahead=False)``)."""
        lib.vr_region_turn_off_fill_ahead(self.pointer)

    def opened(self) -> None:
        """The region serves faults from now on: it is a live region of the process."""
        _registry.register(self)

    def regenerating_on_this_thread(self) -> bool:
        """Whether this thread is inside this region's regenerator."""
        return is_regenerating(self.regeneration)

    def needs_handler_watchdog(self) -> bool:
        """Whether the kernel makes this region's pages missing with no vrange call that could
        notice a replaced signal handler (the pressure monitor's thread then watches for that)."""
        return False

    def set_policy(self, priority: int, group_id: int) -> None:
        lib.vr_region_set_policy(self.pointer, priority, group_id)

    def page_out(self, first_byte: int, length: int) -> None:
        """Make the kernel reclaim the byte range now (MADV_PAGEOUT), as memory pressure would.

        The kernel skips pages it cannot isolate at that moment: a page that ``MADV_FREE`` has just
        queued on another CPU's LRU batch is one (the call drains only its own CPU's batch). So
        while pages of volatile chunks stay resident the call is repeated from each CPU this thread
        may run on in turn (a lazy-free page written since stays for good: it is dirty again)."""
        cpus = sorted(os.sched_getaffinity(0))
        try:
            for attempt in range(len(cpus) + PAGE_OUT_ATTEMPTS):
                if attempt:
                    os.sched_setaffinity(0, {cpus[attempt % len(cpus)]})  # this thread only
                    time.sleep(0.001)
                # A refill of a volatile chunk in the range may still be making it lazy-free
                # again: paging out meanwhile would keep its pages for good (see the C side).
                lib.vr_region_wait_for_refills(
                    self.pointer, first_byte // self.chunk_size,
                    -(-(first_byte + length) // self.chunk_size), PAGE_OUT_REFILL_WAIT_MS)
                check(lib.vr_pageout(self.base + first_byte, length),
                      "page the range out (MADV_PAGEOUT)")
                if not self._volatile_pages_resident(first_byte, length):
                    return
        finally:
            os.sched_setaffinity(0, cpus)

    def _volatile_pages_resident(self, first_byte: int, length: int) -> bool:
        states = self.chunk_states()
        residency = self.residency()
        page = mmap.PAGESIZE
        for index in range(first_byte // page, (first_byte + length) // page):
            if residency[index] & 1 and states[index * page // self.chunk_size] & \
                    lib.VR_CHUNK_VOLATILE:
                return True
        return False

    def fence_in_child(self, reason: str) -> None:
        """Unserved in a forked child: a missing or discarded page would read as zeros. Make the
        region inaccessible (SIGSEGV on access) and every call on it raise, saying why."""
        result = lib.vr_region_fence(self.pointer)
        self.unusable = (f"this {self.name}-backend region cannot be used here: {reason}; its "
                         "memory is made inaccessible rather than handing out zeros for purged "
                         "pages")
        logger.error("%s%s", self.unusable,
                     "" if result >= 0 else f" (and mprotect failed: {os.strerror(-result)})")

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

    def close(self) -> None:
        """Called after the mapping is gone: the region is no longer live, its mappings go back to
        the budget, and a late regeneration callback fails instead of running."""
        _registry.unregister(self)
        self.regeneration.retire()
        mapping_budget.release(self.mappings_reserved)
        self.mappings_reserved = 0
        if self.pointer != ffi.NULL:
            self.close_native()

    @abc.abstractmethod
    def close_native(self) -> None:
        """Free or retire the native state (the mapping is gone)."""

    def count_failed(self, first_chunk: int, end_chunk: int) -> int:
        """Chunks of the range whose last regeneration failed (even where the policy filled them
        with zeros)."""
        return int(lib.vr_region_count_failed(self.pointer, first_chunk, end_chunk))

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

    def mapped(self) -> bool:
        """Whether the region's mapping is still there: another thread that closes the region
        unmaps it before the region leaves the registry (``owner`` is an ``mmap.mmap``, whose
        ``closed`` turns True at the unmapping itself)."""
        owner = self.owner()
        return owner is not None and not getattr(owner, "closed", False)

    def gone_in_child(self) -> None:
        """In a forked child, instead of ``after_fork_in_child``: another thread was closing the
        region when the process forked and had unmapped it already. Its address may be another
        mapping's now: never register, fence, trap or purge it again; its reservation goes back."""
        self.unusable = "it was closed by another thread when this process forked"
        self.regeneration.retire()
        mapping_budget.release(self.mappings_reserved)
        self.mappings_reserved = 0

    def after_fork_in_child(self) -> None:
        """Make the region work in a forked child (the registry calls it for every live region,
        after its backend's ``reset_after_fork``): threads that were inside it in the parent do not
        exist here."""
        if self.pointer != ffi.NULL:
            lib.vr_region_forget_threads(self.pointer)

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

    def pin_without_fill(self, first_chunk: int, end_chunk: int) -> list[bool]:
        """Pin the chunks (their VOLATILE bits are cleared already: ``begin_pin``) without
        regenerating anything: resident pages are made non-discardable where the kernel reclaims,
        missing ones are left to refill on access. For each chunk, whether it was purged since it
        was last marked volatile (or is purged now)."""
        purged = ffi.new("uint8_t[]", max(end_chunk - first_chunk, 1))
        check(lib.vr_region_pin_without_fill(self.pointer, first_chunk, end_chunk, purged),
              "pin the range without filling it")
        return [bool(purged[i]) for i in range(end_chunk - first_chunk)]

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

    def volatile_runs(self) -> list[tuple[int, int]]:
        """The volatile chunks now, as ``(first_chunk, end_chunk)`` runs (one native call)."""
        states = self.chunk_states().translate(_VOLATILE_BITS)
        return [match.span() for match in _VOLATILE_RUN.finditer(states)]

    def byte_states(self) -> dict[str, int]:
        """Bytes volatile, non-volatile, resident, and purged (filled once, missing now)."""
        states = self.chunk_states()
        residency = self.residency()
        page = mmap.PAGESIZE
        pages_per_chunk = self.chunk_size // page
        sizes = {"volatile": 0, "nonvolatile": 0, "resident": 0, "purged": 0}
        for chunk, state in enumerate(states):
            pages = residency[chunk * pages_per_chunk:(chunk + 1) * pages_per_chunk]
            length = len(pages) * page
            sizes["volatile" if state & lib.VR_CHUNK_VOLATILE else "nonvolatile"] += length
            if state & lib.VR_CHUNK_MATERIALIZED:
                sizes["purged"] += sum(1 for entry in pages if not entry & 1) * page
        sizes["resident"] = sum(entry & 1 for entry in residency) * page
        return sizes

    def residency(self) -> bytes:
        pages = ffi.new("uint8_t[]", self.page_count)
        check(lib.vr_region_residency(self.pointer, pages), "read page residency (mincore)")
        return bytes(ffi.buffer(pages))

    def counters(self) -> dict[str, int]:
        stats = ffi.new("struct vr_stats *")
        lib.vr_region_stats(self.pointer, stats)
        counters = {name: int(getattr(stats, name)) for name in (
            "faults_on_handler_thread", "faults_on_faulting_thread", "faults_on_worker_thread",
            "bytes_regenerated", "regeneration_errors", "purges", "volatile_refills",
            "chunks_filled_ahead")}
        for reason, index in PURGE_REASONS.items():
            counters[f"purges_{reason}"] = int(stats.purges_by_reason[index])
            counters[f"bytes_purged_{reason}"] = int(stats.bytes_purged_by_reason[index])
        return counters
