"""Region: page-aligned memory whose volatile pages the kernel may take back, refilled on access."""

from __future__ import annotations

import contextlib
import errno
import inspect
import logging
import mmap
import os
import threading
import warnings
from array import array
from collections.abc import Callable, Iterator
from typing import Literal, Union, cast, get_args, overload

from . import policy
from ._backends import (ERROR_POLICIES, KNOWN_SPECS, PURGE_REASONS, BackendRegion, Regeneration,
                        RegionStats, SourceSpec, buffer_address, features, find_live_region,
                        on_fork_in_child, resolve_backend)
from ._backends._registry import live_regions
from ._mappings import mapping_budget
from .errors import RegenerationError, VRangeError, errno_name, os_error
from .sources import Isolated, Source, is_async_callable, is_generator_callable

__all__ = ["Region", "RegionStats", "Regenerator", "DEFAULT_CHUNK_SIZE", "Pin", "BackendName",
           "ErrorPolicy"]

logger = logging.getLogger("vrange")

PAGE_SIZE = mmap.PAGESIZE
DEFAULT_CHUNK_SIZE = 64 * 1024
"""Bytes regenerated and resolved per fault: fewer, larger faults are much cheaper (see
docs/benchmarks.md)."""

MAX_CHUNK_SIZE = 1 << 30
"""A chunk is regenerated into one buffer at a time (per fault in flight): at most 1 GiB."""
CLOSE_TIMEOUT_MS = 5000


def _reset_locks_after_fork() -> None:
    """A lock held by another thread at fork() stays held for ever in the child: make new ones
    (the registry calls this once the backends work in the child)."""
    for core in live_regions():
        region = core.owner()
        if isinstance(region, Region):
            region._state_lock = threading.Lock()
            region._io_holds = 0
            region._drop_other_threads_pins()


on_fork_in_child(_reset_locks_after_fork)


def _lock_is_free(lock: threading.Lock) -> bool:
    """Whether ``lock`` could be taken right now (it is not left taken)."""
    if not lock.acquire(blocking=False):
        return False
    lock.release()
    return True


def _end_elsewhere(finish: Callable[..., None], *arguments: object) -> None:
    """Run ``finish(*arguments)`` on a new thread: the end of a block the garbage collector
    finalized while this thread may hold a lock the end needs. If no thread can start (interpreter
    shutdown), what the block held stays held: a leak, never a deadlock."""
    try:
        threading.Thread(target=finish, args=arguments, name="vrange-end-abandoned-block",
                         daemon=True).start()
    except RuntimeError:
        logger.warning("the pins of a block abandoned to the garbage collector could not "
                       "be released (no thread can start now)")


def find_region(address: int) -> Region | None:
    """The open region whose mapping contains ``address``, if any."""
    core = find_live_region(address)
    region = None if core is None else core.owner()
    return region if isinstance(region, Region) and not region.closed else None


Regenerator = Union[Callable[[int, memoryview], object], Source]
ErrorPolicy = Literal["poison", "zeros", "abort"]
"""What a fault does when the regenerator fails and no library call can raise (``on_error``)."""
BackendName = Literal["auto", "uffd", "sigbus", "sigbus:uffd", "sigbus:memfd"]
"""A backend spec ``Region(backend=...)`` and ``$VRANGE_BACKEND`` accept."""

assert set(get_args(ErrorPolicy)) == set(ERROR_POLICIES), "ErrorPolicy is out of date"
assert set(get_args(BackendName)) == set(KNOWN_SPECS), "BackendName is out of date"


def _check_regenerator(regenerate: object) -> None:
    """Refuse at construction what can never fill a chunk: a non-callable, a coroutine function or
    an async generator function (also behind ``functools.partial`` or as an object's
    ``__call__``), and a callable whose signature cannot take ``(offset, buf)``. A regenerator runs
    synchronously inside a page fault: an async one would never be awaited, and its chunk would
    hold zeros."""
    if isinstance(regenerate, Source):
        return
    if not callable(regenerate):
        raise TypeError("regenerate must be a callable fn(offset, buf) or a vrange.sources "
                        f"source, not {type(regenerate).__name__}")
    if is_async_callable(regenerate):
        raise TypeError(
            f"regenerate must fill buf synchronously: {regenerate!r} is an async function "
            "(a regenerator runs inside a page fault, where nothing could await it, and its "
            "chunk would hold zeros); make it a plain function")
    if is_generator_callable(regenerate):
        raise TypeError(
            f"regenerate must fill buf when called: {regenerate!r} is a generator function "
            "(calling it runs nothing of its body until the generator is iterated, which nothing "
            "does, and its chunk would hold zeros); make it a plain function")
    try:
        signature = inspect.signature(regenerate)  # type: ignore[arg-type]
    except (TypeError, ValueError):  # builtins and C callables may have none: accept them
        return
    try:
        signature.bind(0, memoryview(b""))
    except TypeError as error:
        raise TypeError(f"regenerate must accept two positional arguments (offset, buf); "
                        f"{regenerate!r} has the signature {signature}: {error}") from None


class Pin:
    """A range pinned by :meth:`Region.pinned` for the duration of a ``with`` block.

    - ``view``: a writable memoryview of exactly the range asked for, released when the block
      ends (also when it raises);
    - ``purged`` / ``purged_ranges``: whether any chunk the range touches had been purged since it
      was last marked volatile, and which (merged ``(offset, length)`` ranges of whole chunks);
    - ``populated``: whether the pin made every page present (``populate=True``) or left missing
      pages to be refilled on access.

    Made by :meth:`Region.pinned` only (see docs/pins.md).
    """

    __slots__ = ("offset", "length", "purged_ranges", "populated", "_view", "_first", "_end",
                 "_thread", "_active")

    def __init__(self, offset: int, length: int, purged_ranges: list[tuple[int, int]],
                 populated: bool, first: int, end: int) -> None:
        self.offset = offset
        self.length = length
        self.purged_ranges = purged_ranges
        self.populated = populated
        self._view: memoryview | None = None
        self._first = first
        self._end = end
        self._thread = threading.get_ident()
        self._active = True

    @property
    def view(self) -> memoryview:
        """The pinned bytes (a writable memoryview of ``length`` bytes at ``offset``)."""
        if self._view is None:
            raise ValueError("the pin has ended: its view was released")
        return self._view

    @property
    def purged(self) -> bool:
        """True if any chunk of the range had been purged since it was last marked volatile."""
        return bool(self.purged_ranges)

    @property
    def active(self) -> bool:
        """True while the ``with`` block runs."""
        return self._active

    def __repr__(self) -> str:
        state = "active" if self._active else "ended"
        return (f"<vrange.Pin [{self.offset}, {self.offset + self.length}) {state}, "
                f"purged={self.purged}>")


_MADV_HARMLESS = {
    0: "MADV_NORMAL", 1: "MADV_RANDOM", 2: "MADV_SEQUENTIAL", 3: "MADV_WILLNEED",
    11: "MADV_DOFORK", 13: "MADV_UNMERGEABLE", 15: "MADV_NOHUGEPAGE", 16: "MADV_DONTDUMP",
    17: "MADV_DODUMP", 19: "MADV_KEEPONFORK", 20: "MADV_COLD", 21: "MADV_PAGEOUT",
}
"""Advice ``Region.madvise`` passes on: hints that change no byte and no bookkeeping. COLD and
PAGEOUT only let reclaim take what it may take anyway (lazy-free volatile pages are then refilled
on access, as after any kernel purge; other pages are swapped or kept)."""

_MADV_REFUSED = {
    4: ("MADV_DONTNEED", "it drops pages behind vrange's bookkeeping (a pinned page would be "
        "regenerated, losing its writes, or read as zeros on the sigbus memfd trap)"),
    8: ("MADV_FREE", "it lets the kernel drop pages vrange counts as pinned"),
    9: ("MADV_REMOVE", "it drops pages behind vrange's bookkeeping"),
    10: ("MADV_DONTFORK", "a forked child would have no region mapped where vrange serves one"),
    12: ("MADV_MERGEABLE", "KSM-merged pages break the per-chunk fault accounting"),
    14: ("MADV_HUGEPAGE", "huge pages bypass the per-chunk accounting (vrange sets NOHUGEPAGE)"),
    18: ("MADV_WIPEONFORK", "a forked child would read zeros"),
    22: ("MADV_POPULATE_READ", "use region.prefault()"),
    23: ("MADV_POPULATE_WRITE", "it would pin volatile pages behind vrange's bookkeeping"),
    24: ("MADV_DONTNEED_LOCKED", "it drops pages behind vrange's bookkeeping"),
    25: ("MADV_COLLAPSE", "huge pages bypass the per-chunk accounting"),
    100: ("MADV_HWPOISON", "it poisons pages"),
    101: ("MADV_SOFT_OFFLINE", "it migrates pages behind vrange's bookkeeping"),
    102: ("MADV_GUARD_INSTALL", "guard pages would make the region's own accesses fail"),
    103: ("MADV_GUARD_REMOVE", "vrange installs no guard pages"),
}


class Region(mmap.mmap):
    """A span of anonymous memory with a regenerator that can rebuild any chunk of it.

    ``Region(nbytes, regenerate, backend="auto", chunk_size=None, on_error=None)``

    - ``nbytes`` is rounded up to whole pages (``len(region)`` is the usable size).
    - ``regenerate`` is a callable ``fn(offset, buf)`` that fills the writable memoryview ``buf``
      (one chunk, or the region's tail) with the region's bytes at ``offset``, or a native source
      from :mod:`vrange.sources`.
    - ``backend``: ``"auto"``, ``"uffd"`` or ``"sigbus"`` (``None``: ``$VRANGE_BACKEND`` or auto);
      ``"sigbus:uffd"`` or ``"sigbus:memfd"`` force one trap of the sigbus backend (``"sigbus"``
      uses the userfaultfd trap wherever a userfaultfd of any kind opens, else the memfd trap).
    - ``chunk_size``: a power-of-two multiple of the page size; the unit that is purged,
      regenerated and resolved per fault (default 64 KiB). The sigbus backend's memfd trap uses
      at most 8192 chunks per region and raises the chunk size for larger regions;
      ``region.chunk_size`` tells the size in use.
    - ``priority``, ``group``, ``managed``: vrange's own purge policy (:mod:`vrange.policy`).
      A managed region is purged by the pressure monitor before the OOM killer and by byte budgets,
      lowest ``priority`` first, then the chunks marked volatile longest ago. ``managed=None``
      manages the regions the kernel cannot reclaim (the memfd trap) and regions with a ``group``
      (named budgets: :func:`vrange.policy.set_budget`).
    - ``fill_ahead``: once a thread walks forward through missing chunks (four faults in a row,
      each on the next chunk), its faults also fill the missing chunks after it, up to 1 MiB
      ahead, so that a scan or a copy faults far less often. True by default; False: every chunk
      is filled by a fault of its own (docs/design.md, "Fill-ahead").
    - ``on_error``: what a fault does when the regenerator fails and there is no library call to
      raise from (a plain memory access): ``"poison"`` (default where the kernel has
      UFFDIO_POISON: the access raises SIGBUS, a syscall gets EFAULT, the next
      ``mark_nonvolatile`` retries), ``"abort"`` (print and abort the process) or ``"zeros"``
      (explicit opt-in: hand out zeros). Wrong bytes are never handed out silently and a fault never
      hangs.

    A new region is non-volatile and every page starts missing: the first access materializes it
    through the regenerator. Pins are counted per chunk: :meth:`mark_nonvolatile` adds one,
    :meth:`mark_volatile` releases one, a :meth:`pinned` block holds one while it runs; a chunk
    with no pin left that was released is volatile (docs/pins.md). The region is a writable
    buffer (``memoryview(region)``, ``numpy.frombuffer(region, ...)``, ``os.write(fd, region)``)
    and an ``mmap.mmap``.
    """

    _core: BackendRegion
    _closed: bool
    _backend_name: str
    _chunk_size: int
    _regenerate: Regenerator
    _on_error: ErrorPolicy
    _state_lock: threading.Lock
    _address: int
    _size: int
    _io_holds: int
    _regeneration: Regeneration
    _fill_ahead: bool
    _explicit_pins: array[int]
    _scoped_pins: array[int]
    _wants_volatile: bytearray
    _active_pins: dict[int, Pin]
    _warn_if_unclosed: bool

    def __new__(cls, nbytes: int, regenerate: Regenerator, backend: BackendName | None = None,
                chunk_size: int | None = None, on_error: ErrorPolicy | None = None, *,
                priority: int = 0, group: str | None = None,
                managed: bool | None = None, fill_ahead: bool = True) -> Region:
        if isinstance(nbytes, bool) or not isinstance(nbytes, int):
            raise TypeError(f"nbytes must be an int, not {type(nbytes).__name__}")
        if nbytes <= 0:
            raise ValueError(f"nbytes must be positive, not {nbytes}")
        _check_regenerator(regenerate)
        chunk = DEFAULT_CHUNK_SIZE if chunk_size is None else chunk_size
        if isinstance(chunk, int) and not isinstance(chunk, bool) and chunk > MAX_CHUNK_SIZE:
            raise ValueError(f"chunk_size must be at most {MAX_CHUNK_SIZE} bytes (1 GiB), "
                             f"not {chunk}")
        if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < PAGE_SIZE or \
                chunk & (chunk - 1) or chunk % PAGE_SIZE:
            raise ValueError(f"chunk_size must be a power-of-two multiple of the page size "
                             f"({PAGE_SIZE}), not {chunk_size!r}")
        if on_error is not None and on_error not in ERROR_POLICIES:
            raise ValueError(f"on_error must be one of {sorted(ERROR_POLICIES)}, not {on_error!r}")
        if isinstance(priority, bool) or not isinstance(priority, int) or \
                not -(1 << 31) <= priority < (1 << 31):
            raise TypeError(f"priority must be an int (32-bit), not {priority!r}")
        if group is not None and (not isinstance(group, str) or not group):
            raise TypeError(f"group must be a non-empty str or None, not {group!r}")
        if managed is not None and not isinstance(managed, bool):
            raise TypeError(f"managed must be True, False or None, not {managed!r}")
        if not isinstance(fill_ahead, bool):
            raise TypeError(f"fill_ahead must be True or False, not {fill_ahead!r}")
        choice = resolve_backend(backend)
        error_policy = cast(ErrorPolicy, choice.default_error_policy(features())
                            if on_error is None else on_error)
        problem = choice.error_policy_problem(error_policy, features())
        if problem is not None:
            raise ValueError(problem)
        size = -(-nbytes // PAGE_SIZE) * PAGE_SIZE
        plan = choice.backend.plan(size, chunk, choice.trap)  # may reserve mappings (VRangeError)
        try:
            self = super().__new__(cls, -1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS,
                                   prot=mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            plan.release()
            raise
        self._closed = False
        self._warn_if_unclosed = True
        self._size = size
        self._io_holds = 0
        self._backend_name = choice.name
        self._chunk_size = plan.chunk_size
        self._regenerate = regenerate
        self._on_error = error_policy
        self._state_lock = threading.Lock()
        chunk_count = -(-size // plan.chunk_size)
        # Pin counts per chunk (see docs/pins.md): pins by mark_nonvolatile (released by
        # mark_volatile), pins of active pinned() blocks, and whether the chunk is to be volatile
        # once no pin holds it. A new region is non-volatile and unpinned.
        self._explicit_pins = array("I", bytes(4 * chunk_count))
        self._scoped_pins = array("I", bytes(4 * chunk_count))
        self._wants_volatile = bytearray(chunk_count)
        self._active_pins = {}
        self._address = buffer_address(self)
        # What native code calls back on a fault: the regenerator, and where its failures go.
        self._regeneration = Regeneration(
            cast(Callable[[int, memoryview], object], regenerate), error_policy)
        try:
            # An Isolated source starts its helper process here.
            source = regenerate._spec(plan.chunk_size) if isinstance(regenerate, Source) \
                else SourceSpec("python")
            self._core = choice.backend(self, self._address, size, plan, source, error_policy,
                                        choice.trap, self._regeneration)
            core = self._core
            core.management, core.priority, core.group = managed, priority, group
            if not fill_ahead:
                core.turn_off_fill_ahead()  # before anything can touch the region
            self._fill_ahead = fill_ahead
            if policy.should_manage(core):
                policy.manage(core, priority, group)
            if core.needs_handler_watchdog():
                policy.start_watchdog()
        except BaseException:
            if hasattr(self, "_core"):
                policy.release(self._core)
                self._core.close()
            else:
                plan.release()
            mmap.mmap.close(self)
            self._closed = True
            raise
        return self

    def __init__(self, nbytes: int, regenerate: Regenerator,
                 backend: BackendName | None = None,
                 chunk_size: int | None = None, on_error: ErrorPolicy | None = None, *,
                 priority: int = 0, group: str | None = None,
                 managed: bool | None = None, fill_ahead: bool = True) -> None:
        pass  # everything happens in __new__ (mmap.mmap is built there)

    # --- properties -----------------------------------------------------------------------------

    @property
    def backend(self) -> str:
        """The backend serving this region (``"uffd"`` or ``"sigbus"``)."""
        return self._backend_name

    @property
    def fill_ahead(self) -> bool:
        """Whether a forward walk's faults also fill the missing chunks after them (docs/design.md,
        "Fill-ahead"): True unless ``Region(..., fill_ahead=False)`` turned it off (an
        ``Isolated`` source never fills ahead, and ``$VRANGE_FILL_AHEAD_KIB=0`` turns it off for
        every region)."""
        return self._fill_ahead

    @property
    def chunk_size(self) -> int:
        """Bytes purged, regenerated and resolved per fault (may exceed the size asked for on the
        sigbus backend's memfd trap, which uses at most 8192 chunks per region)."""
        return self._chunk_size

    @property
    def trap(self) -> str | None:
        """How the sigbus backend traps accesses to missing pages here: ``"uffd"`` (the kernel
        reclaims volatile pages by itself) or ``"memfd"`` (only vrange purges); None on the uffd
        backend."""
        return self._core.trap

    @property
    def managed(self) -> bool:
        """True when vrange's pressure monitor and budgets may purge this region."""
        return bool(getattr(self._core, "managed", False))

    @property
    def kernel_reclaims(self) -> bool:
        """True when the kernel itself takes this region's volatile pages back under memory
        pressure (the uffd backend and the sigbus uffd trap); False on the memfd trap, where only
        :meth:`purge` gives memory back."""
        return self._core.kernel_reclaims

    @property
    def address(self) -> int:
        """The start address of the mapping (for native code)."""
        self._check_open()
        return self._address

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"{mmap.mmap.__len__(self)} bytes"
        trap = f", trap={self._core.trap!r}" if getattr(self, "_core", None) and self._core.trap \
            else ""
        return (f"<vrange.Region {state}, backend={self._backend_name!r}{trap}, "
                f"chunk_size={self._chunk_size}>")

    # --- volatility -------------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise ValueError("operation on a closed vrange.Region")
        if self._core.unusable:
            raise VRangeError(self._core.unusable)

    @contextlib.contextmanager
    def _open_and_locked(self) -> Iterator[None]:
        """Serialize state changes, and check openness under the lock: another thread may have
        closed the region since the arguments were checked."""
        if self._core.regenerating_on_this_thread():
            raise VRangeError("a regenerator cannot change or inspect its own region (the call "
                              "that is regenerating it holds the region's lock)")
        with self._state_lock:
            self._check_open()
            yield

    def _range(self, offset: int, length: int | None) -> tuple[int, int]:
        self._check_open()
        size = len(self)
        if length is None:
            length = size - offset if isinstance(offset, int) else 0
        for name, value in (("offset", offset), ("length", length)):
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{name} must be an int, not {type(value).__name__}")
            if value < 0 or value % PAGE_SIZE:
                raise ValueError(f"{name} must be a non-negative multiple of the page size "
                                 f"({PAGE_SIZE}), not {value}")
        if offset + length > size:
            raise ValueError(f"range [{offset}, {offset + length}) is outside the region "
                             f"(size {size})")
        return offset, length

    def _chunks_touching(self, offset: int, length: int) -> tuple[int, int]:
        if length == 0:
            return 0, 0  # an empty range touches no chunk
        return offset // self._chunk_size, -(-(offset + length) // self._chunk_size)

    def mark_volatile(self, offset: int = 0, length: int | None = None) -> None:
        """Let the kernel (or :meth:`purge`) discard the pages of this range from now on: release
        one pin of each chunk.

        Only whole chunks are released: a chunk that the range covers only in part keeps its pin
        (volatility is a permission, so rounding inward never loses data). Pins are counted (see
        :meth:`mark_nonvolatile`): a chunk pinned twice stays pinned until it is released twice,
        and a chunk an active :meth:`pinned` block holds becomes volatile when the block ends. A
        chunk with no pin left becomes volatile; releasing an unpinned chunk is allowed (it stays
        or becomes volatile). The pages stay readable; a discarded page is regenerated on its next
        access.
        """
        offset, length = self._range(offset, length)
        first = -(-offset // self._chunk_size)
        end = (offset + length) // self._chunk_size
        if offset + length == len(self):
            end = self._core_chunk_count()  # the tail chunk may be shorter than chunk_size
        if first < end:
            with self._open_and_locked():
                self._release_explicit_pins(first, end)
                runs = self._unpinned_volatile_runs(first, end)
                for run_first, run_end in runs:
                    self._core.mark_volatile(run_first, run_end)
            if runs:
                policy.after_mark_volatile(self._core)

    def _core_chunk_count(self) -> int:
        return -(-len(self) // self._chunk_size)

    # Pin counting (under _state_lock). A chunk is volatile exactly when no pin of either kind holds
    # it and it was released by mark_volatile since its last mark_nonvolatile (_wants_volatile);
    # the native VOLATILE bit follows that.

    def _release_explicit_pins(self, first: int, end: int) -> None:
        count = end - first
        explicit = self._explicit_pins
        if explicit[first:end].count(0) != count:
            for chunk in range(first, end):
                if explicit[chunk]:
                    explicit[chunk] -= 1
        self._wants_volatile[first:end] = b"\x01" * count

    def _add_pins(self, pins: array[int], first: int, end: int) -> None:
        if pins[first:end].count(0) == end - first:
            pins[first:end] = array("I", [1]) * (end - first)
        else:
            for chunk in range(first, end):
                pins[chunk] += 1

    def _unpinned_volatile_runs(self, first: int, end: int) -> list[tuple[int, int]]:
        """The chunks of [first, end) that no pin holds and that are to be volatile, as runs."""
        count = end - first
        explicit, scoped, wanted = self._explicit_pins, self._scoped_pins, self._wants_volatile
        if explicit[first:end].count(0) == count and scoped[first:end].count(0) == count and \
                wanted.count(b"\x00", first, end) == 0:
            return [(first, end)]
        runs: list[tuple[int, int]] = []
        run_start = None
        for chunk in range(first, end + 1):
            free = chunk < end and not explicit[chunk] and not scoped[chunk] and wanted[chunk]
            if free and run_start is None:
                run_start = chunk
            elif not free and run_start is not None:
                runs.append((run_start, chunk))
                run_start = None
        return runs

    def pin_count(self, offset: int) -> int:
        """How many pins hold the chunk at byte ``offset`` now: those of :meth:`mark_nonvolatile`
        not yet released by :meth:`mark_volatile`, plus active :meth:`pinned` blocks. A chunk
        with no pin is volatile if :meth:`mark_volatile` released it, else non-volatile (a new
        region)."""
        if isinstance(offset, bool) or not isinstance(offset, int):
            raise TypeError(f"offset must be an int, not {type(offset).__name__}")
        if not 0 <= offset < len(self):
            raise ValueError(f"offset {offset} is outside the region (size {len(self)})")
        with self._open_and_locked():
            chunk = offset // self._chunk_size
            return int(self._explicit_pins[chunk] + self._scoped_pins[chunk])

    def _pin_chunks(self, first: int, end: int, populate: bool) -> list[bool]:
        """Make chunks [first, end) non-volatile (the caller holds _state_lock and counts the pin)
        and, with ``populate``, present; for each chunk, whether it had been purged since it was
        last marked volatile. On failure the chunks that were volatile are volatile again."""
        # Not volatile from here on (so no refill makes these chunks lazy-free again), then
        # populated or only kept; on failure the chunks that were volatile are volatile again.
        was_volatile = self._core.begin_pin(first, end)
        try:
            if populate:
                self._regenerate_missing(first, end, self._core.populate)
                return self._core.finish_nonvolatile(first, end)
            self._core.discard(first, end, only_failed=True)  # failed chunks: missing, retried
            purged = self._core.pin_without_fill(first, end)
            # A page the kernel took while the pin dirtied the chunk was refilled then; should that
            # refill have failed (poison markers, or the zeros policy's zeros), drop it again.
            self._core.discard(first, end, only_failed=True)
            return purged
        except BaseException:
            self._restore_volatile(first, was_volatile)
            raise

    def _purged_ranges(self, first: int, purged: list[bool]) -> list[tuple[int, int]]:
        ranges: list[tuple[int, int]] = []
        for index, was_purged in enumerate(purged):
            if not was_purged:
                continue
            start = (first + index) * self._chunk_size
            stop = min(start + self._chunk_size, len(self))
            if ranges and ranges[-1][0] + ranges[-1][1] == start:
                ranges[-1] = (ranges[-1][0], stop - ranges[-1][0])
            else:
                ranges.append((start, stop - start))
        return ranges

    @overload
    def mark_nonvolatile(self, offset: int = 0, length: int | None = None, *,
                         report: Literal[False] = False, populate: bool = True) -> bool: ...

    @overload
    def mark_nonvolatile(self, offset: int = 0, length: int | None = None, *,
                         report: Literal[True], populate: bool = True) -> list[tuple[int, int]]: ...

    def mark_nonvolatile(self, offset: int = 0, length: int | None = None, *,
                         report: bool = False,
                         populate: bool = True) -> bool | list[tuple[int, int]]:
        """Pin the range: add one pin to each chunk it touches (the range is widened to whole
        chunks). A pinned chunk is never purged, by :meth:`purge`, vrange's pressure policy or the
        kernel, until :meth:`mark_volatile` has released every pin of it (pins are counted: two
        pins and one release leave it pinned).

        Returns True if any chunk of the range had been purged since it was last marked volatile
        (False otherwise), or with ``report=True`` the list of purged ``(offset, length)`` ranges.

        ``populate=True`` (the default) makes every page of the range present now, regenerating
        purged and never-touched chunks (a system call on the sigbus backend then finds no missing
        page). ``populate=False`` is the cheap pin: nothing is regenerated, resident pages are only
        made non-discardable, and purged or never-touched pages are refilled on their first access;
        the report is the same. If a regenerator fails (``populate=True``), raises
        :class:`vrange.RegenerationError` (the regenerator's exception is the ``__cause__``), the
        chunks that failed are left missing, never half-filled, and no pin is added.
        """
        if not isinstance(populate, bool):
            raise TypeError(f"populate must be True or False, not {populate!r}")
        offset, length = self._range(offset, length)
        first, end = self._chunks_touching(offset, length)
        if first >= end:
            return [] if report else False
        with self._open_and_locked():
            purged = self._pin_chunks(first, end, populate)
            self._add_pins(self._explicit_pins, first, end)
            self._wants_volatile[first:end] = bytes(end - first)
        if not report:
            return any(purged)
        return self._purged_ranges(first, purged)

    @contextlib.contextmanager
    def pinned(self, offset: int = 0, length: int | None = None, *,
               populate: bool = True) -> Iterator[Pin]:
        """Pin the range for the duration of a ``with`` block::

            with region.pinned(offset, length) as pin:
                data = bytes(pin.view)      # pin.purged: was anything purged meanwhile?

        Entering adds one pin to each chunk the range touches (like :meth:`mark_nonvolatile`,
        with the same ``populate`` meaning and the same report, as ``pin.purged`` and
        ``pin.purged_ranges``); leaving takes it away again, even if the block raises. Pins are
        counted: nested and concurrent blocks over overlapping ranges keep a chunk pinned until the
        last one ends, and :meth:`mark_volatile` cannot release a block's pin. When the last pin
        of a chunk goes, the chunk gets back the volatility it had: a block over non-volatile
        chunks leaves them non-volatile; a block over volatile chunks (or chunks released by
        :meth:`mark_volatile` inside the block) leaves them volatile.

        ``pin.view`` is a memoryview of exactly ``[offset, offset + length)``, released when the
        block ends. A slice or export taken from it and kept past the block (a memoryview slice,
        ``numpy.frombuffer(pin.view)``) still reads correct bytes (the region's memory, refilled
        on access), but the chunks are no longer pinned, and it keeps the region exported:
        :meth:`close` raises BufferError while it lives.
        """
        if not isinstance(populate, bool):
            raise TypeError(f"populate must be True or False, not {populate!r}")
        offset, length = self._range(offset, length)
        first, end = self._chunks_touching(offset, length)
        with self._open_and_locked():
            purged = self._pin_chunks(first, end, populate) if first < end else []
            if first < end:
                self._add_pins(self._scoped_pins, first, end)
            pin = Pin(offset, length, self._purged_ranges(first, purged), populate, first, end)
            self._active_pins[id(pin)] = pin
        closed_by_gc = False
        try:
            whole = memoryview(self)
            try:
                pin._view = whole[offset:offset + length]
            finally:
                whole.release()
            try:
                yield pin
            except GeneratorExit:  # the block was abandoned: the GC (or close()) ends it
                closed_by_gc = True
                raise
        finally:
            self._end_pin(pin, closed_by_gc)

    def _end_pin(self, pin: Pin, closed_by_gc: bool = False) -> None:
        view, pin._view = pin._view, None
        if view is not None:
            try:
                view.release()
            except BufferError:  # the block kept an export of the view: it keeps the region's
                logger.debug("an export of a pin's view outlives its block")
        if closed_by_gc and not _lock_is_free(self._state_lock):
            # An abandoned block finalized by the garbage collector, which runs at any allocation:
            # also while this very thread holds the state lock (waiting for it would deadlock).
            # The pin ends on another thread, once the lock is free.
            _end_elsewhere(self._end_pin, pin)
            return
        runs: list[tuple[int, int]] = []
        with self._state_lock:
            if not pin._active:
                return
            pin._active = False
            self._active_pins.pop(id(pin), None)
            if self._closed or pin._first >= pin._end:
                return
            scoped = self._scoped_pins
            for chunk in range(pin._first, pin._end):
                if scoped[chunk]:
                    scoped[chunk] -= 1
            if self._core.unusable:
                return
            runs = self._unpinned_volatile_runs(pin._first, pin._end)
            for run_first, run_end in runs:
                self._core.mark_volatile(run_first, run_end)
        if runs:
            policy.after_mark_volatile(self._core)

    def _drop_other_threads_pins(self) -> None:
        """In a forked child: the pinned() blocks of other threads never end here (those threads
        do not exist); their pins go, and the chunks get back their volatility. Blocks of the
        forking thread go on and end normally. Pins of mark_nonvolatile are the process's state
        and stay."""
        me = threading.get_ident()
        for pin in list(self._active_pins.values()):
            if pin._thread == me:
                continue
            pin._active = False
            del self._active_pins[id(pin)]
            if self._closed or pin._first >= pin._end:
                continue
            for chunk in range(pin._first, pin._end):
                if self._scoped_pins[chunk]:
                    self._scoped_pins[chunk] -= 1
            if not self._core.unusable:
                for run_first, run_end in self._unpinned_volatile_runs(pin._first, pin._end):
                    self._core.mark_volatile(run_first, run_end)

    def _restore_volatile(self, first: int, was_volatile: list[bool]) -> None:
        run_start = None
        for index, volatile in enumerate([*was_volatile, False]):
            if volatile and run_start is None:
                run_start = index
            elif not volatile and run_start is not None:
                self._core.mark_volatile(first + run_start, first + index)
                run_start = None

    def prefault(self, offset: int = 0, length: int | None = None) -> None:
        """Make every page of the range present now, regenerating purged chunks, without changing
        whether they are volatile. Raises :class:`vrange.RegenerationError` like
        :meth:`mark_nonvolatile`. ``vrange.io`` calls this before retrying a syscall that failed
        with EFAULT; call it yourself before handing region memory to code that cannot retry."""
        offset, length = self._range(offset, length)
        first, end = self._chunks_touching(offset, length)
        if first >= end:
            return
        with self._open_and_locked():
            self._regenerate_missing(first, end, self._core.prefault)

    def _regenerate_missing(self, first: int, end: int, populate: Callable[[int, int], int]) -> None:
        """Run ``populate`` over chunks [first, end); on failure leave the failed chunks missing
        (never half-filled, never poisoned) and raise RegenerationError."""
        count_before = self._regeneration.failure_count
        if isinstance(self._regenerate, Isolated):
            self._regenerate.ensure_running()  # a helper that died or hung is replaced here
        self._core.discard(first, end, only_failed=True)
        self._core.clear_errors()
        self._core.limit_fill_ahead(end)  # regenerate what was asked for, nothing after it
        try:
            result = populate(first, end)
        finally:
            self._core.limit_fill_ahead(self._core_chunk_count())
        new_failures = [(offset, error)
                        for offset, error in self._regeneration.failures_since(count_before)
                        if first * self._chunk_size <= offset < end * self._chunk_size]
        # A failure the policy answered with zeros (on_error="zeros") still fails this call.
        zero_filled = self._core.count_failed(first, end)
        if result >= 0 and not new_failures and not zero_filled:
            return
        for chunk in {offset // self._chunk_size for offset, _ in new_failures}:
            # A chunk another pin holds (or a non-volatile one) may have present pages the program
            # wrote (a cheap pin leaves the pages the kernel took missing): keep those, drop only
            # the failed pages (below). Only a volatile chunk may lose its bytes.
            if self._explicit_pins[chunk] or self._scoped_pins[chunk] or \
                    not self._wants_volatile[chunk]:
                continue
            self._core.discard(chunk, chunk + 1, only_failed=False)
        self._core.discard(first, end, only_failed=True)
        if new_failures:
            failed_offset, cause = new_failures[0]
            raise RegenerationError(
                f"the regenerator failed for the chunk at offset {failed_offset} "
                f"({len(new_failures)} failure(s) in this call); it raised:\n"
                + getattr(cause, "vrange_traceback", repr(cause))) from cause
        map_code = self._core.map_error()
        if map_code:
            hint = (f"the process may be at vm.max_map_count ({mapping_budget.max_map_count} "
                    "mappings), or out of memory" if map_code == errno.ENOMEM else "")
            raise RegenerationError(
                f"could not make the range present: the kernel refused to map a refilled chunk: "
                f"{os.strerror(map_code)} ({errno_name(map_code)})" + (f"; {hint}" if hint else ""))\
                from os_error(map_code, "map a refilled chunk")
        code = self._core.native_error() or -result or errno.EIO
        if isinstance(self._regenerate, Isolated):
            raise RegenerationError(
                f"the isolated regenerator failed ({os.strerror(code)}, {errno_name(code)}): "
                + ("it raised:\n" + self._regenerate.last_error() if code == errno.EIO else
                   "its helper process died or did not answer in time; a new one starts at the "
                   "next call")) from os_error(code, "regenerate in the helper process")
        raise RegenerationError(
            f"could not make the range present: {os.strerror(code)} ({errno_name(code)}); "
            "a native source failed to read") from os_error(code, "read the native source")

    def purge(self, offset: int = 0, length: int | None = None) -> int:
        """Discard the volatile pages of the range now; returns the number of bytes discarded.

        Non-volatile (pinned) chunks in the range are skipped, never discarded: purge cannot lose
        data the program still relies on. A chunk the range touches is purged whole.
        """
        offset, length = self._range(offset, length)
        first, end = self._chunks_touching(offset, length)
        with self._open_and_locked():
            return self._core.purge(first, end)

    @contextlib.contextmanager
    def held_for_io(self, offset: int, length: int) -> Iterator[None]:
        """Keep vrange's purges (:meth:`purge`, the pressure monitor, budgets) away from these
        chunks while a system call uses them (``vrange.io`` holds the window it just made present).
        The kernel may still reclaim them where it reclaims (a syscall then waits for the refill on
        the uffd backend, or fails with EFAULT and is retried)."""
        offset, length = self._range(offset, length)
        first, end = self._chunks_touching(offset, length)
        with self._state_lock:  # close() refuses while anything is held (BufferError)
            self._check_open()
            self._io_holds += 1
        try:
            self._core.hold(first, end, +1)
            try:
                yield
            finally:
                self._core.hold(first, end, -1)
        finally:
            with self._state_lock:
                self._io_holds -= 1

    # --- introspection ----------------------------------------------------------------------------

    def stats(self) -> RegionStats:
        """Counters of this region, and how many of its bytes are volatile, resident, purged."""
        with self._open_and_locked():
            counters = self._core.counters()
            sizes = self._core.byte_states()
        return RegionStats(
            faults_served=counters["faults_on_handler_thread"]
            + counters["faults_on_faulting_thread"] + counters["faults_on_worker_thread"],
            faults_on_handler_thread=counters["faults_on_handler_thread"],
            faults_on_faulting_thread=counters["faults_on_faulting_thread"],
            faults_on_worker_thread=counters["faults_on_worker_thread"],
            bytes_regenerated=counters["bytes_regenerated"],
            regeneration_errors=counters["regeneration_errors"],
            purges=counters["purges"],
            purges_by_reason={reason: counters[f"purges_{reason}"] for reason in PURGE_REASONS},
            bytes_purged_by_reason={reason: counters[f"bytes_purged_{reason}"]
                                    for reason in PURGE_REASONS},
            volatile_refills=counters["volatile_refills"],
            chunks_filled_ahead=counters["chunks_filled_ahead"],
            trap=self._core.trap,
            kernel_reclaims=self._core.kernel_reclaims,
            mappings_reserved=self._core.mappings_reserved,
            volatile_bytes=sizes["volatile"],
            nonvolatile_bytes=sizes["nonvolatile"],
            resident_bytes=sizes["resident"],
            purged_bytes=sizes["purged"],
        )

    @property
    def regeneration_failures(self) -> list[tuple[int, BaseException]]:
        """The most recent regenerator failures (up to 64) as ``(offset, exception)``, oldest
        first."""
        return self._regeneration.recent_failures()

    # --- lifetime ---------------------------------------------------------------------------------

    def close(self) -> None:
        """Unmap the region. Raises BufferError while a buffer (memoryview, numpy array) exports
        it, like ``mmap.close``, or while :meth:`held_for_io` holds part of it. Closing twice is allowed; any other call afterwards raises
        ValueError."""
        if self._closed:
            return
        if self._core.regenerating_on_this_thread():
            # close() would wait for this very regenerator to return (and give up after seconds).
            raise VRangeError("close() cannot be called from the region's own regenerator; the "
                              "region stays open (close it once the regenerator has returned)")
        with self._state_lock:
            if self._closed:
                return
            if self._io_holds:
                raise BufferError("cannot close a vrange.Region while a system call holds part of "
                                  "it (held_for_io, vrange.io)")
            # Wait for regenerations in flight first: once unmapped, the address may belong to
            # another mapping, and a late regeneration must not write there.
            timeout_ms = CLOSE_TIMEOUT_MS
            if isinstance(self._regenerate, Isolated):  # a fault may wait that long for its helper
                timeout_ms = max(timeout_ms, self._regenerate.timeout_ms + 2000)
            if not self._core.unusable:  # a fenced region in a forked child: nothing runs on it
                self._core.quiesce(timeout_ms)
                # A thread that held the GIL while close() waited above may have started a refill
                # (it is served, not parked: close() could not unmap under its statement while it
                # holds the GIL), or let the GIL go to wait for another thread's refill. Now this
                # thread holds the GIL, so no such refill or wait can start: wait for the ones
                # running, and unmap only when none is.
                while self._core.any_in_flight():
                    self._core.quiesce(timeout_ms)
            try:
                mmap.mmap.close(self)
            except BufferError:  # exported (a memoryview, a numpy array): the region stays open
                self._core.resume()
                raise
            self._closed = True
            policy.release(self._core)
            self._core.close()

    def __enter__(self) -> Region:
        self._check_open()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __del__(self, _warn: Callable[..., None] = warnings.warn) -> None:
        # _warn is bound at definition: at interpreter shutdown the warnings module may be gone.
        if getattr(self, "_closed", True):
            return
        try:
            if getattr(self, "_warn_if_unclosed", True):  # a Cache's region: the Cache warns
                _warn(f"unclosed {self!r}", ResourceWarning, source=self)
        finally:  # closed even where the warning is an error (-W error::ResourceWarning)
            try:
                self.close()
            except Exception:  # noqa: BLE001 - an exporter outlived us, or interpreter shutdown
                pass

    # --- mmap.mmap methods that would bypass vrange's bookkeeping -------------------------------
    # Every other inherited method (read, read_byte, readline, write, write_byte, move, find,
    # rfind, seek, tell, flush, __getitem__, __setitem__, __len__) is a plain memory access of
    # the mapping, made by mmap's C code with the GIL held: a purged page faults and is refilled
    # like any access (tests/test_mmap_methods.py checks each on every backend).

    def resize(self, newsize: int) -> None:
        """Refused: ``mremap`` would move the registered range."""
        self._check_open()  # like every other call on a closed region: ValueError
        raise OSError("a vrange.Region cannot be resized")

    def size(self) -> int:
        """The size of the mapping in bytes, ``len(region)`` (``mmap.size()`` would ask the file
        of a file-backed mapping; a region has none)."""
        self._check_open()
        return len(self)

    def madvise(self, option: int, start: int = 0, length: int | None = None) -> None:
        """``mmap.madvise`` for advice that changes no byte and no bookkeeping: ``MADV_NORMAL``,
        ``RANDOM``, ``SEQUENTIAL``, ``WILLNEED``, ``DOFORK``, ``UNMERGEABLE``, ``NOHUGEPAGE``,
        ``DONTDUMP``, ``DODUMP``, ``KEEPONFORK``, ``COLD`` and ``PAGEOUT`` (reclaim may take only
        what it may take anyway: volatile pages are refilled on access like after any kernel
        purge). Any other advice raises :class:`vrange.VRangeError`: ``MADV_DONTNEED``,
        ``MADV_FREE``, ``MADV_REMOVE``, ``MADV_WIPEONFORK``, ``MADV_DONTFORK``, ``MADV_HUGEPAGE``,
        ``MADV_POPULATE_*`` and others would drop or change pages behind vrange's back (a pinned
        page could read as zeros). Use :meth:`purge`, :meth:`mark_volatile`, :meth:`prefault`
        instead."""
        self._check_open()
        if isinstance(option, bool) or not isinstance(option, int):
            raise TypeError(f"option must be an int (an mmap.MADV_* constant), not {option!r}")
        if option not in _MADV_HARMLESS:
            name, why = _MADV_REFUSED.get(option, (f"advice {option}", "vrange does not know "
                                                   "whether it keeps the region's bytes"))
            raise VRangeError(
                f"madvise({name}) is refused on a vrange.Region: {why}. Use region.purge() to "
                "give memory back now, region.mark_volatile() to let the kernel take it, "
                "region.prefault() or region.mark_nonvolatile() to make pages present")
        if length is None:
            mmap.mmap.madvise(self, option, start)
        else:
            mmap.mmap.madvise(self, option, start, length)
