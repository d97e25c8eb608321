"""Cache: a mapping of byte values that lives in volatile memory and reloads what the kernel took.

One :class:`vrange.Region` backs the cache. Each value occupies a run of whole chunks of it; an item
is pinned (non-volatile) while a caller reads or borrows it and volatile otherwise, so the kernel
(or vrange's pressure policy) may take any item back at any time between uses. The region's
regenerator is the native ``Zeros`` source (no Python ever runs at a fault): what tells the cache
that an item was purged is the report of ``mark_nonvolatile`` when it pins the item before each
read, and a purged item is loaded again (``load(key)``) under that pin. See docs/cache.md.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import warnings
import weakref
from bisect import bisect_left
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterator
from dataclasses import dataclass
from typing import Generic, TypeVar, overload

from . import policy
from ._backends import on_fork_in_child
from .errors import VRangeError
from .region import DEFAULT_CHUNK_SIZE, BackendName, Region, _end_elsewhere, _lock_is_free
from .sources import Zeros

__all__ = ["Cache", "CacheFullError", "CacheStats"]

logger = logging.getLogger("vrange")

K = TypeVar("K", bound=Hashable)
D = TypeVar("D")

_MISSING = object()


class CacheFullError(VRangeError):
    """A value cannot be stored: the items in use (borrowed, or being read right now) leave no run
    of free chunks large enough for it, even after evicting every other item."""


@dataclass(frozen=True)
class CacheStats:
    """Counters of a :class:`Cache` and what it holds (``cache.stats()``).

    Every lookup (``cache[key]``, ``get``, ``borrow``) counts as exactly one of ``hits``, ``misses``
    and ``reloads``.
    """

    hits: int
    """Lookups served from the cache's memory without calling ``load``."""
    misses: int
    """Lookups of a key not stored: ``load`` was called (or another thread's load of the same key
    was waited for), or KeyError. A purged item of a cache without ``load`` is dropped by the
    lookup that finds it purged, which counts as a miss."""
    reloads: int
    """Lookups that found their item purged (by the kernel, the pressure policy or
    :meth:`Cache.purge`) and loaded it again."""
    evictions: int
    """Items dropped to make room for others (least recently used first); ``pop``, ``del`` and
    ``clear`` are not counted."""
    rejected: int
    """Loaded values handed to the caller without being stored, because items in use held the
    space (see :class:`CacheFullError`)."""
    items: int
    """Items stored (``len(cache)``), purged ones included."""
    bytes: int
    """The sum of the stored values' lengths."""
    pinned_items: int
    """Items pinned right now (borrowed, or being read or reloaded)."""
    resident_bytes: int
    """Bytes of the cache's memory resident right now (``mincore``: what the process really holds;
    whole chunks, so up to a chunk per item more than ``bytes``; purged items hold nothing)."""
    capacity: int
    """The most the values may occupy: ``max_bytes`` rounded up to whole chunks."""


class _Entry:
    """One stored item: a run of chunks of the region."""

    __slots__ = ("key", "first", "chunks", "length", "pins", "holders", "valid", "detached")

    def __init__(self, key: object, first: int, chunks: int, length: int) -> None:
        self.key = key
        self.first = first
        self.chunks = chunks
        self.length = length
        self.pins = 0
        self.holders: dict[int, int] = {}  # thread → pins it holds (a thread unpins its own)
        self.valid = True       # False once a pin reported a purge, until the value is rewritten
        self.detached = False   # no longer in the mapping; its chunks are freed at the last unpin


class _PendingLoad:
    """A load of one key in progress (by ``thread``); other threads wanting the key wait for it."""

    __slots__ = ("done", "thread", "superseded")

    def __init__(self) -> None:
        self.done = threading.Event()
        self.thread = threading.get_ident()
        self.superseded = False  # the key was set, deleted or cleared meanwhile: do not store


class _ChunkAllocator:
    """First fit over a sorted list of free runs ``[start, end)`` of chunks, merged on free."""

    def __init__(self, chunks: int) -> None:
        self.starts = [0]
        self.ends = [chunks]
        self.free_chunks = chunks

    def allocate(self, count: int) -> int | None:
        for index, (start, end) in enumerate(zip(self.starts, self.ends)):
            if end - start >= count:
                if end - start == count:
                    del self.starts[index], self.ends[index]
                else:
                    self.starts[index] = start + count
                self.free_chunks -= count
                return start
        return None

    def free(self, start: int, count: int) -> None:
        end = start + count
        index = bisect_left(self.starts, start)
        merge_before = index > 0 and self.ends[index - 1] == start
        merge_after = index < len(self.starts) and self.starts[index] == end
        if merge_before and merge_after:
            self.ends[index - 1] = self.ends[index]
            del self.starts[index], self.ends[index]
        elif merge_before:
            self.ends[index - 1] = end
        elif merge_after:
            self.starts[index] = start
        else:
            self.starts.insert(index, start)
            self.ends.insert(index, end)
        self.free_chunks += count


def _as_bytes_view(value: object, what: str) -> memoryview:
    """A flat, contiguous, byte-format view of a bytes-like ``value``; TypeError otherwise."""
    if isinstance(value, str):
        raise TypeError(f"{what} must be a bytes-like object, not str (encode it first)")
    try:
        view = memoryview(value)  # type: ignore[arg-type]
    except TypeError:
        raise TypeError(f"{what} must be a bytes-like object (bytes, bytearray, memoryview, "
                        f"array, ...), not {type(value).__name__}") from None
    if not view.c_contiguous:
        view = memoryview(view.tobytes())
    if view.format != "B" or view.ndim != 1:
        view = view.cast("B")
    return view


def _to_bytes(view: memoryview) -> bytes:
    """The bytes of a view made by :func:`_as_bytes_view` (the loaded object itself when it is
    ``bytes``), releasing the view."""
    try:
        if type(view.obj) is bytes and len(view.obj) == view.nbytes:
            return view.obj
        return view.tobytes()
    finally:
        view.release()


_live_caches: weakref.WeakSet[Cache[object]] = weakref.WeakSet()
_locked_for_fork: list[Cache[object]] = []
FORK_LOCK_TIMEOUT_S = 1.0


def _before_fork() -> None:
    """Take every cache's lock, so that the child gets each cache's bookkeeping whole (no user code
    runs under the lock, so the thread that forks never holds one; a lock that stays busy longer
    than the timeout is left, and only reset in the child)."""
    for cache in list(_live_caches):
        if cache._lock.acquire(timeout=FORK_LOCK_TIMEOUT_S):
            _locked_for_fork.append(cache)


def _after_fork_in_parent() -> None:
    for cache in _locked_for_fork:
        cache._lock.release()
    _locked_for_fork.clear()


def _reset_after_fork() -> None:
    """In the child only the thread that forked runs: the other threads' loads never finish and
    their pins and borrows never end. Start over with a new lock, and give their pins back."""
    _locked_for_fork.clear()
    me = threading.get_ident()
    for cache in list(_live_caches):
        cache._lock = threading.Lock()
        for pending in cache._loading.values():
            pending.done.set()
        cache._loading = {}
        cache._borrowers = {thread: count for thread, count in cache._borrowers.items()
                            if thread == me}
        for entry in list(cache._pinned):
            gone = sum(count for thread, count in entry.holders.items() if thread != me)
            if not gone:
                continue
            mine = entry.holders.get(me, 0)
            entry.holders = {me: mine + 1}  # this thread releases what the others held, at once
            entry.pins = mine + 1
            try:
                cache._unpin(entry)
            except Exception:  # noqa: BLE001 - a region this child cannot use: nothing to release
                logger.debug("a cache item pinned at fork stays pinned in the child",
                             exc_info=True)


os.register_at_fork(before=_before_fork, after_in_parent=_after_fork_in_parent)
on_fork_in_child(_reset_after_fork)


class Cache(Generic[K]):
    """A mapping-like cache of byte values in volatile memory, reloaded when the kernel purged them.

    ``Cache(max_bytes, load=None, *, backend=None, chunk_size=None, priority=0, group=None,
    managed=None)``

    - ``max_bytes``: the most the values may occupy, rounded up to whole chunks (``capacity``).
      Each value occupies whole chunks; a value larger than the capacity is refused (ValueError).
      Beyond the capacity the least recently used items are evicted.
    - ``load``: ``fn(key) -> bytes-like``, called on a miss (outside the cache's lock) and again
      when an item was purged. It should return the same bytes for a key every time. ``None``: a
      plain mapping filled with ``cache[key] = value``, where a purged item is simply gone.
    - ``backend``, ``chunk_size``, ``priority``, ``group``, ``managed``: the backing
      :class:`vrange.Region`'s (``chunk_size`` defaults to 64 KiB; the pressure policy's
      ``priority`` and ``group``, see :mod:`vrange.policy`).

    ``cache[key]`` returns ``bytes`` (a copy); ``with cache.borrow(key) as view:`` lends a read-only
    memoryview of the cache's own memory (zero-copy) and keeps the item pinned for the block. Every
    method may be called from any thread. See docs/cache.md.
    """

    def __init__(self, max_bytes: int, load: Callable[[K], object] | None = None, *,
                 backend: BackendName | None = None, chunk_size: int | None = None,
                 priority: int = 0,
                 group: str | None = None, managed: bool | None = None) -> None:
        if isinstance(max_bytes, bool) or not isinstance(max_bytes, int):
            raise TypeError(f"max_bytes must be an int, not {type(max_bytes).__name__}")
        if max_bytes <= 0:
            raise ValueError(f"max_bytes must be positive, not {max_bytes}")
        if load is not None and not callable(load):
            raise TypeError(f"load must be a callable fn(key) -> bytes-like or None, not "
                            f"{type(load).__name__}")
        self._closed = True  # until the region exists (__del__ of a half-made cache)
        self._load = load
        chunk = DEFAULT_CHUNK_SIZE if chunk_size is None else chunk_size
        size = max_bytes
        if isinstance(chunk, int) and chunk > 0:
            size = -(-max_bytes // chunk) * chunk
        region = Region(size, Zeros(), backend, chunk_size, priority=priority, group=group,
                        managed=managed)
        region._warn_if_unclosed = False  # the cache's own: an unclosed cache is what warns
        if len(region) % region.chunk_size:
            # The backend chose larger chunks (the memfd trap's 8192-chunk limit): a size in whole
            # chunks of that size, so that no chunk is short.
            chunk = region.chunk_size
            region.close()
            region = Region(-(-size // chunk) * chunk, Zeros(), backend, chunk, priority=priority,
                            group=group, managed=managed)
            region._warn_if_unclosed = False
        self._region = region
        self._chunk = region.chunk_size
        self._size = len(region)
        chunks = self._size // self._chunk  # every chunk whole (a short tail is never used)
        self._capacity = chunks * self._chunk
        # A new region is non-volatile: every chunk volatile from the start, so that each pin below
        # is balanced by exactly one unpin (whether the region counts pins or not).
        region.mark_volatile()
        # Where only vrange gives memory back (the memfd trap), the thread that is about to take
        # more memory for a value first runs the policy's check (see _make_room_in_memory).
        self._check_pressure = region.managed and not region.kernel_reclaims
        self._allocator = _ChunkAllocator(chunks)
        self._entries: OrderedDict[object, _Entry] = OrderedDict()  # least recently used first
        self._loading: dict[object, _PendingLoad] = {}
        self._lock = threading.Lock()
        self._stored_bytes = 0
        self._stored_chunks = 0  # chunks of the items in the mapping
        self._pinned: set[_Entry] = set()  # items with pins, removed ones included
        self._borrowers: dict[int, int] = {}  # thread → borrow blocks it has open
        self._hits = self._misses = self._reloads = self._evictions = self._rejected = 0
        self._closing = False
        self._closed = False
        _live_caches.add(self)  # type: ignore[arg-type]

    # --- properties ---------------------------------------------------------------------------

    @property
    def capacity(self) -> int:
        """The most the values may occupy in bytes: ``max_bytes`` rounded up to whole chunks."""
        return self._capacity

    @property
    def chunk_size(self) -> int:
        """The unit of allocation: every value occupies whole chunks (``region.chunk_size``)."""
        return self._chunk

    @property
    def region(self) -> Region:
        """The :class:`vrange.Region` that holds the values: for ``vrange.testing.page_out``, stats
        and the pressure policy. Do not mark its ranges volatile or non-volatile yourself."""
        return self._region

    @property
    def closed(self) -> bool:
        return self._closed or self._closing

    def __repr__(self) -> str:
        if self.closed:
            return "<vrange.Cache closed>"
        return (f"<vrange.Cache {len(self._entries)} items, {self._stored_bytes} of "
                f"{self._capacity} bytes, backend={self._region.backend!r}>")

    # --- lookups ------------------------------------------------------------------------------

    def __getitem__(self, key: K) -> bytes:
        """The value of ``key`` (a copy), loading it on a miss and reloading it if it was purged.
        KeyError on a miss without ``load`` (or if ``load`` raises it)."""
        entry, loaded = self._obtain(key)
        if entry is None:
            assert loaded is not None
            return _to_bytes(loaded)
        try:
            return self._copy_out(entry)
        finally:
            with self._lock:
                self._unpin(entry)

    @overload
    def get(self, key: K) -> bytes | None: ...

    @overload
    def get(self, key: K, default: D) -> bytes | D: ...

    def get(self, key: K, default: object = None) -> object:
        """``cache[key]``, or ``default`` where that raises KeyError (a miss without ``load``, a
        purged item without ``load``, or ``load`` raising KeyError). Loads like ``cache[key]``."""
        try:
            return self[key]
        except KeyError:
            return default

    @contextlib.contextmanager
    def borrow(self, key: K) -> Iterator[memoryview]:
        """``with cache.borrow(key) as view:`` a read-only memoryview of the value in the cache's
        own memory (no copy), pinned for the block: no purge and no eviction can touch it.

        Loads and reloads like ``cache[key]`` and counts as a use for the LRU order. Borrows of one
        key nest and may overlap across threads. ``pop``/``del``/``clear`` or a new value for the
        key during the block remove the key at once; the memory is freed when the last borrow ends.
        ``view`` is released when the block ends. Keep nothing made from it (a slice, a numpy
        array) past the block: the item is volatile again, so such an object may read zeros after a
        purge or another item's bytes after an eviction (never a crash: while it exists the cache's
        memory stays mapped, and :meth:`close` raises BufferError). When the value was loaded but
        could not be stored (see :class:`CacheFullError`), ``view`` is a view of the loaded object.
        """
        entry, loaded = self._obtain(key)
        if entry is None:
            view = memoryview(loaded).toreadonly()  # type: ignore[arg-type]
            try:
                yield view
            finally:
                view.release()
            return
        thread = threading.get_ident()
        closed_by_gc = False
        try:
            with self._lock:
                self._borrowers[thread] = self._borrowers.get(thread, 0) + 1
            if entry.length:
                base = memoryview(self._region)
                start = entry.first * self._chunk
                part = base[start:start + entry.length]
                view = part.toreadonly()
                part.release()
                base.release()
            else:
                view = memoryview(b"")
            try:
                yield view
            except GeneratorExit:  # the block was abandoned: the GC (or close()) ends it
                closed_by_gc = True
                raise
            finally:
                try:
                    view.release()
                except BufferError:  # the caller exports it (the region stays mapped meanwhile)
                    pass
                del view  # a traceback that keeps this frame must not keep the view
        finally:
            if closed_by_gc and not (_lock_is_free(self._lock) and
                                     _lock_is_free(self._region._state_lock)):
                # Finalized by the garbage collector, which runs at any allocation: also while
                # this thread holds the cache's lock or its region's (waiting would deadlock).
                _end_elsewhere(self._end_borrow, entry, thread)
            else:
                self._end_borrow(entry, thread)

    def _end_borrow(self, entry: _Entry, thread: int) -> None:
        with self._lock:
            if self._borrowers.get(thread, 0) > 1:
                self._borrowers[thread] -= 1
            else:
                self._borrowers.pop(thread, None)
            # The block may end on another thread than the one that entered it (a context manager
            # handed over, an abandoned block): the pin is the entering thread's.
            self._unpin(entry, thread)

    def __contains__(self, key: object) -> bool:
        """True when ``key`` is stored. With ``load``, a purged item still counts (it is reloaded
        when read); without ``load``, the item is pinned to check, and dropped if it was purged."""
        with self._lock:
            self._check_open()
            entry = self._entries.get(key)
            if entry is None:
                return False
            if self._load is not None or not entry.chunks:
                return True
            self._pin(entry)
            try:
                if not entry.valid:
                    self._detach(entry)
                    return False
                return True
            finally:
                self._unpin(entry)

    def __len__(self) -> int:
        """Items stored, purged ones included (without ``load``, a purged item is counted until a
        lookup or ``in`` finds it purged)."""
        with self._lock:
            return len(self._entries)

    def keys(self) -> list[K]:
        """The keys stored, least recently used first (a snapshot; purged items included)."""
        with self._lock:
            return list(self._entries)  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[K]:
        """Iterates over a snapshot of :meth:`keys`."""
        return iter(self.keys())

    # --- changes ------------------------------------------------------------------------------

    def __setitem__(self, key: K, value: object) -> None:
        """Store ``value`` (bytes-like, copied) under ``key``, evicting least recently used items
        to make room. ValueError if it is larger than the capacity; :class:`CacheFullError` if items
        in use leave no room (some other items may have been evicted by then)."""
        data = _as_bytes_view(value, "a cache value")
        try:
            self._check_size(data.nbytes)
            self._make_room_in_memory()
            with self._lock:
                self._check_open()
                pending = self._loading.get(key)
                if pending is not None:
                    pending.superseded = True
                entry = self._store(key, data)
                if entry is None:
                    raise CacheFullError(self._full_message(data.nbytes))
                self._unpin(entry)
        finally:
            data.release()

    def __delitem__(self, key: K) -> None:
        """Remove ``key`` (KeyError if absent); a borrowed item's memory is freed when its last
        borrow ends."""
        with self._lock:
            self._check_open()
            self._supersede(key)
            entry = self._entries.get(key)
            if entry is None:
                raise KeyError(key)
            self._detach(entry)

    @overload
    def pop(self, key: K) -> bytes: ...

    @overload
    def pop(self, key: K, default: D) -> bytes | D: ...

    def pop(self, key: K, default: object = _MISSING) -> object:
        """Remove ``key`` and return its value. A purged item is loaded once more to be returned
        (counted as a reload); without ``load`` it is gone. A missing key returns ``default`` or
        raises KeyError; ``pop`` never loads a key that is not stored."""
        with self._lock:
            self._check_open()
            self._supersede(key)
            entry = self._entries.get(key)
            if entry is None:
                if default is _MISSING:
                    raise KeyError(key)
                return default
            self._pin(entry)
            self._detach(entry)
            if not entry.valid and self._load is not None:
                self._reloads += 1
        try:
            if entry.valid:
                return self._copy_out(entry)
        finally:
            with self._lock:
                self._unpin(entry)
        if self._load is None:
            if default is _MISSING:
                raise KeyError(key)
            return default
        return _to_bytes(_as_bytes_view(self._load(key), f"load({key!r})"))

    def clear(self) -> None:
        """Remove every item (borrowed items' memory is freed when their last borrow ends)."""
        with self._lock:
            self._check_open()
            for pending in self._loading.values():
                pending.superseded = True
            for entry in list(self._entries.values()):
                self._detach(entry)

    def purge(self) -> int:
        """Discard the memory of every item not in use now, as memory pressure would; returns the
        bytes discarded. With ``load`` the items stay (they are reloaded when read); without it
        they are gone."""
        with self._lock:
            self._check_open()
            discarded = self._region.purge()
            if self._load is None:
                for entry in list(self._entries.values()):
                    if entry.chunks and not entry.pins:
                        self._detach(entry)
            return discarded

    # --- introspection and lifetime -----------------------------------------------------------

    def stats(self) -> CacheStats:
        """The counters, and what the cache holds now."""
        with self._lock:
            self._check_open()
            counts = (self._hits, self._misses, self._reloads, self._evictions, self._rejected,
                      len(self._entries), self._stored_bytes, len(self._pinned))
        resident = self._region.stats().resident_bytes
        return CacheStats(*counts, resident_bytes=resident, capacity=self._capacity)

    def close(self) -> None:
        """Free the cache's memory. BufferError while an item is borrowed. Lookups running in
        other threads finish first (the memory is freed when the last one ends); every call
        afterwards raises ValueError. Closing twice is allowed."""
        with self._lock:
            if self._closed or self._closing:
                return
            borrows = sum(self._borrowers.values())
            if borrows:
                raise BufferError(f"cannot close a vrange.Cache while {borrows} borrow(s) of its "
                                  "items are open")
            if not self._pinned:
                self._close_region()  # BufferError: the region is exported, the cache stays open
            self._closing = True
            for pending in self._loading.values():
                pending.superseded = True

    def _close_region(self) -> None:
        self._region.close()
        self._entries.clear()
        self._closed = True

    def __enter__(self) -> Cache[K]:
        self._check_open()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __del__(self, _warn: Callable[..., None] = warnings.warn) -> None:
        # _warn is bound at definition: at interpreter shutdown the warnings module may be gone.
        if getattr(self, "_closed", True) or getattr(self, "_closing", True):
            return
        try:
            _warn(f"unclosed {self!r}", ResourceWarning, source=self)
        finally:  # closed even where the warning is an error (-W error::ResourceWarning)
            try:
                self.close()
            except Exception:  # noqa: BLE001 - interpreter shutdown, an exported region
                pass

    # --- internals (the lock is held where a name says so) ------------------------------------

    def _check_open(self) -> None:
        if self._closed or self._closing:
            raise ValueError("operation on a closed vrange.Cache")

    def _check_size(self, nbytes: int) -> None:
        if nbytes > self._capacity:
            raise ValueError(f"a value of {nbytes} bytes cannot be stored in a vrange.Cache of "
                             f"{self._capacity} bytes (max_bytes rounded up to "
                             f"{self._chunk}-byte chunks)")

    def _full_message(self, nbytes: int) -> str:
        return (f"no room for a value of {nbytes} bytes: items in use (borrowed or being read) "
                f"hold {len(self._pinned)} item(s) and leave no run of "
                f"{-(-nbytes // self._chunk)} free chunk(s) in a cache of {self._capacity} bytes")

    def _copy_out(self, entry: _Entry) -> bytes:
        """The bytes of a pinned item (the caller holds its pin)."""
        if not entry.length:
            return b""
        view = memoryview(self._region)
        try:
            start = entry.first * self._chunk
            return bytes(view[start:start + entry.length])
        finally:
            view.release()

    def _span(self, entry: _Entry) -> tuple[int, int]:
        return entry.first * self._chunk, entry.chunks * self._chunk

    def _pin(self, entry: _Entry) -> None:
        """(lock held) One more holder; the first one pins the chunks and learns of a purge."""
        if entry.pins == 0:
            if entry.chunks:
                if self._region.mark_nonvolatile(*self._span(entry), report=True):
                    entry.valid = False
            self._pinned.add(entry)
        entry.pins += 1
        thread = threading.get_ident()
        entry.holders[thread] = entry.holders.get(thread, 0) + 1

    def _unpin(self, entry: _Entry, thread: int | None = None) -> None:
        """(lock held) One holder fewer (of ``thread``, the thread that pinned: by default this
        one); the last one makes the chunks volatile again, or frees them if the item was removed
        meanwhile."""
        if thread is None:
            thread = threading.get_ident()
        if entry.holders[thread] > 1:
            entry.holders[thread] -= 1
        else:
            del entry.holders[thread]
        entry.pins -= 1
        if entry.pins:
            return
        self._pinned.discard(entry)
        if self._closed:
            return
        if entry.chunks:
            self._region.mark_volatile(*self._span(entry))
            if entry.detached:
                self._free(entry)
        if self._closing and not self._pinned:
            try:
                self._close_region()
            except BufferError:  # someone exports the region itself: it stays mapped
                self._closed = True

    def _free(self, entry: _Entry) -> None:
        """(lock held) Give an unpinned, detached item's chunks back (purged: no memory held)."""
        self._region.purge(*self._span(entry))
        self._allocator.free(entry.first, entry.chunks)
        entry.chunks = 0

    def _detach(self, entry: _Entry) -> None:
        """(lock held) Remove the item from the mapping; free its chunks unless it is pinned."""
        del self._entries[entry.key]
        entry.detached = True
        self._stored_bytes -= entry.length
        self._stored_chunks -= entry.chunks
        if not entry.pins and entry.chunks:
            self._free(entry)

    def _make_room_in_memory(self) -> None:
        """(lock not held) Before a value takes memory: where the kernel cannot reclaim the cache's
        memory, run the pressure policy's check on this thread (a few microseconds when usage is
        under the high-water mark), so that a thread storing values faster than the monitor
        thread wakes up purges what its stores need instead of outrunning it into the OOM
        killer."""
        # configure(monitor=False) means "nothing purges under pressure": honoured here too.
        if self._check_pressure and policy._overrides["monitor"]:
            policy.enforce()

    def _supersede(self, key: object) -> None:
        pending = self._loading.get(key)
        if pending is not None:
            pending.superseded = True

    def _store(self, key: object, data: memoryview) -> _Entry | None:
        """(lock held) Store ``data`` under ``key`` (replacing its item), evicting least recently
        used items for room; the new item is returned pinned, or None when items in use leave no
        room."""
        old = self._entries.get(key)
        if old is not None:
            self._detach(old)
        nbytes = data.nbytes
        count = -(-nbytes // self._chunk)
        first = 0
        if count:
            evictable = self._stored_chunks - sum(entry.chunks for entry in self._pinned
                                                  if not entry.detached)
            if self._allocator.free_chunks + evictable < count:
                return None
            allocated = self._allocator.allocate(count)
            while allocated is None:
                victim = next((entry for entry in self._entries.values()
                               if entry.chunks and not entry.pins), None)
                if victim is None:
                    return None
                self._detach(victim)
                self._evictions += 1
                allocated = self._allocator.allocate(count)
            first = allocated
        entry = _Entry(key, first, count, nbytes)
        if count:
            try:
                self._region.mark_nonvolatile(*self._span(entry))  # a purge of free chunks: moot
            except BaseException:
                self._allocator.free(first, count)
                raise
        entry.pins = 1
        entry.holders[threading.get_ident()] = 1
        self._pinned.add(entry)
        if nbytes:
            view = memoryview(self._region)
            try:
                view[first * self._chunk:first * self._chunk + nbytes] = data
            finally:
                view.release()
        self._entries[key] = entry
        self._stored_bytes += nbytes
        self._stored_chunks += count
        return entry

    def _obtain(self, key: object) -> tuple[_Entry | None, memoryview | None]:
        """The item of ``key``, pinned and with its bytes right, loading or reloading it as needed;
        or ``(None, view)`` of a loaded value that was not stored (superseded, or no room)."""
        counted = False
        while True:
            reload_entry: _Entry | None = None
            with self._lock:
                self._check_open()
                entry = self._entries.get(key)
                pending = self._loading.get(key)
                if entry is not None:
                    self._pin(entry)
                    if entry.valid:
                        self._entries.move_to_end(key)
                        if not counted:
                            self._hits += 1
                        return entry, None
                    if self._load is None:  # purged, and nothing can bring it back
                        self._detach(entry)
                        self._unpin(entry)
                        self._misses += not counted
                        raise KeyError(key)
                    if not counted:
                        self._reloads += 1
                    if pending is None:
                        reload_entry = entry  # reload it under our pin
                    else:
                        self._unpin(entry)
                elif self._load is None:
                    self._misses += not counted
                    raise KeyError(key)
                elif not counted:
                    self._misses += 1
                counted = True
                if pending is not None:
                    if pending.thread == threading.get_ident():
                        raise RuntimeError(f"load({key!r}) looked up its own key in the cache")
                else:
                    pending = self._loading[key] = _PendingLoad()
                    break
            pending.done.wait()  # another thread loads this key: then look again
        return self._load_and_store(key, pending, reload_entry)

    def _load_and_store(self, key: object, pending: _PendingLoad,
                        entry: _Entry | None) -> tuple[_Entry | None, memoryview | None]:
        """Run ``load(key)`` outside the lock (``entry``: the purged item, pinned, to rewrite)."""
        assert self._load is not None
        try:
            data = _as_bytes_view(self._load(key), f"load({key!r})")  # type: ignore[arg-type]
            self._check_size(data.nbytes)
            self._make_room_in_memory()
        except BaseException:
            with self._lock:
                del self._loading[key]
                pending.done.set()
                if entry is not None:
                    self._unpin(entry)
            raise
        with self._lock:
            try:
                if pending.superseded or self._closing or self._closed:
                    if entry is not None:
                        self._unpin(entry)
                    return None, data
                if entry is not None and not entry.detached and \
                        data.nbytes <= entry.chunks * self._chunk and \
                        -(-data.nbytes // self._chunk) == entry.chunks:
                    if data.nbytes:
                        view = memoryview(self._region)
                        try:
                            start = entry.first * self._chunk
                            view[start:start + data.nbytes] = data
                        finally:
                            view.release()
                    self._stored_bytes += data.nbytes - entry.length
                    entry.length = data.nbytes
                    entry.valid = True
                    self._entries.move_to_end(key)
                    return entry, None
                if entry is not None:  # a different size: stored anew
                    self._unpin(entry)
                stored = self._store(key, data)
                if stored is None:
                    self._rejected += 1
                    return None, data
                return stored, None
            finally:
                del self._loading[key]
                pending.done.set()
