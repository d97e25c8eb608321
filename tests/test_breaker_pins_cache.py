"""Fault-injection attacks on pins, vrange.Cache, the mmap method overrides and regenerator
validation (the breaker's tests): each one fails on a bug it found, or stands as a regression test
of something that held."""

from __future__ import annotations

import functools
import gc
import mmap
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from conftest import CHUNK, PAGE, CountingRegenerator, kernel_reclaims, pattern

import vrange
from vrange.testing import page_out

SIZE = 8 * CHUNK


def fill(offset: int, buf: memoryview) -> None:
    buf[:] = pattern(offset, len(buf))


def discard(region: vrange.Region, how: str) -> None:
    if how == "kernel":
        page_out(region)
    else:
        region.purge()


def discard_kinds(backend: str) -> list[str]:
    return ["purge", "kernel"] if kernel_reclaims(backend) else ["purge"]


# --- regenerator validation ---------------------------------------------------------------------

def generator_regenerator(offset: int, buf: memoryview) -> Iterator[None]:
    """A sync def with a yield: calling it runs nothing of its body."""
    buf[:] = pattern(offset, len(buf))
    yield None


def test_a_generator_function_regenerator_never_hands_out_zeros(backend: str) -> None:
    """A generator function fills nothing when called (its body runs only when iterated): it must
    be refused at construction, or fail at the fault, never leave the chunk's zeros."""
    try:
        region = vrange.Region(SIZE, generator_regenerator, backend=backend)
    except TypeError:
        return  # refused at construction: fine
    with region:
        with pytest.raises(vrange.RegenerationError):
            region.mark_nonvolatile()


def test_a_generator_function_regenerator_is_refused_at_construction(backend: str) -> None:
    with pytest.raises(TypeError, match="generator"):
        vrange.Region(SIZE, generator_regenerator, backend=backend)


def test_a_function_returning_a_generator_fails_at_the_fault(backend: str) -> None:
    """A plain function returning a generator slips past any check at construction: the fault must
    fail (RegenerationError from the library call), never leave zeros."""
    def returns_a_generator(offset: int, buf: memoryview) -> Any:
        return generator_regenerator(offset, buf)

    with vrange.Region(SIZE, returns_a_generator, backend=backend) as region:
        with pytest.raises(vrange.RegenerationError, match="returned a generator"):
            region.mark_nonvolatile()


def test_isolated_generator_regenerators(backend: str) -> None:
    with pytest.raises(TypeError, match="generator function"):
        vrange.sources.Isolated("isolated_regenerators:generator_fill")
    source = vrange.sources.Isolated("isolated_regenerators:returns_a_generator")
    with vrange.Region(SIZE, source, backend=backend) as region:
        with pytest.raises(vrange.RegenerationError, match="returned a generator"):
            region.mark_nonvolatile()


async def async_fill(offset: int, buf: memoryview) -> None:
    buf[:] = pattern(offset, len(buf))


ASYNC_BEHIND_WRAPPERS: dict[str, Any] = {
    "lru_cache of async def": functools.lru_cache(maxsize=None)(async_fill),
    "staticmethod of async def": staticmethod(async_fill),
    "classmethod-bound async": None,  # filled below
}


class _WithAsyncClassmethod:
    @classmethod
    async def fill(cls, offset: int, buf: memoryview) -> None:
        buf[:] = pattern(offset, len(buf))


ASYNC_BEHIND_WRAPPERS["classmethod-bound async"] = _WithAsyncClassmethod.fill


@pytest.mark.parametrize("name", sorted(ASYNC_BEHIND_WRAPPERS))
def test_async_behind_a_wrapper_is_refused_at_construction(name: str) -> None:
    with pytest.raises(TypeError, match="async"):
        vrange.region._check_regenerator(ASYNC_BEHIND_WRAPPERS[name])


@pytest.mark.parametrize("name", sorted(ASYNC_BEHIND_WRAPPERS))
def test_async_behind_a_wrapper_never_hands_out_zeros(backend: str, name: str) -> None:
    try:
        region = vrange.Region(SIZE, ASYNC_BEHIND_WRAPPERS[name], backend=backend)
    except TypeError:
        return
    with region:
        with pytest.raises(vrange.RegenerationError):
            region.mark_nonvolatile()


class _Filler:
    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, offset: int, buf: memoryview) -> None:
        self.calls += 1
        buf[:] = pattern(offset, len(buf))

    def method(self, offset: int, buf: memoryview) -> None:
        buf[:] = pattern(offset, len(buf))

    @staticmethod
    def static(offset: int, buf: memoryview) -> None:
        buf[:] = pattern(offset, len(buf))

    @classmethod
    def klass(cls, offset: int, buf: memoryview) -> None:
        buf[:] = pattern(offset, len(buf))


def _sync_wrapping_async(offset: int, buf: memoryview) -> None:
    import asyncio

    asyncio.run(async_fill(offset, buf))


VALID: dict[str, Any] = {
    "callable instance": _Filler(),
    "bound method": _Filler().method,
    "staticmethod via class": _Filler.static,
    "classmethod via class": _Filler.klass,
    "partial of sync": functools.partial(lambda extra, offset, buf: fill(offset, buf), 1),
    "lru_cache-free wraps of async (sync body)":
        functools.wraps(async_fill)(_sync_wrapping_async),
    "varargs": lambda *args: fill(*args),
}


@pytest.mark.parametrize("name", sorted(VALID))
def test_valid_regenerators_are_accepted_and_fill(backend: str, name: str) -> None:
    with vrange.Region(SIZE, VALID[name], backend=backend) as region:
        region.mark_nonvolatile()
        assert bytes(region[0:SIZE]) == pattern(0, SIZE)


# --- pins: counting, reports, purges --------------------------------------------------------------

def chunk_volatile(region: vrange.Region, chunk: int) -> bool:
    return bool(region._core.chunk_states()[chunk] & 1)  # VR_CHUNK_VOLATILE


def test_refilled_by_access_then_pinned_is_reported(backend: str) -> None:
    """A volatile chunk discarded and then refilled by a plain access (its writes lost) is still
    reported as purged by the next pin, with and without populate."""
    for how in discard_kinds(backend):
        for populate in (True, False):
            with vrange.Region(SIZE, fill, backend=backend) as region:
                region.mark_nonvolatile()
                region[0:PAGE] = b"\xaa" * PAGE  # a write the purge will lose
                region.mark_volatile()
                discard(region, how)
                assert region[0] == pattern(0, 1)[0]  # refilled by the access: write lost
                assert region.mark_nonvolatile(0, CHUNK, populate=populate), (how, populate)


@pytest.mark.requires("kernel_reclaims")
def test_partly_discarded_chunk_keeps_its_present_pages_after_a_cheap_pin(backend: str) -> None:
    """The kernel takes some pages of a volatile chunk; a pin that does not fill reports it; a write
    to a page still present survives the refill of the missing ones."""
    with vrange.Region(SIZE, fill, backend=backend) as region:
        region.mark_nonvolatile()
        region.mark_volatile()
        # the kernel discards page 3 of chunk 0 only (stand-in: MADV_DONTNEED of one page)
        mmap.mmap.madvise(region, mmap.MADV_DONTNEED, 3 * PAGE, PAGE)
        assert region.mark_nonvolatile(0, CHUNK, populate=False)
        region[0:PAGE] = b"\xbb" * PAGE            # a page that stayed present
        assert bytes(region[3 * PAGE:4 * PAGE]) == pattern(3 * PAGE, PAGE)  # refilled
        assert bytes(region[0:PAGE]) == b"\xbb" * PAGE, "the refill overwrote a present page"
        assert bytes(region[PAGE:3 * PAGE]) == pattern(PAGE, 2 * PAGE)


def test_pins_in_many_threads_with_exceptions_balance(backend: str) -> None:
    with vrange.Region(SIZE, fill, backend=backend) as region:
        region.mark_volatile()
        barrier = threading.Barrier(8)
        errors: list[BaseException] = []

        def worker(index: int) -> None:
            try:
                for round_ in range(30):
                    offset = (index + round_) % 7 * CHUNK
                    try:
                        with region.pinned(offset, 2 * CHUNK, populate=bool(round_ % 2)) as pin:
                            if round_ == 0:
                                barrier.wait()
                            region.purge()
                            assert bytes(pin.view[:PAGE]) == pattern(offset, PAGE)
                            assert bytes(pin.view[-PAGE:]) == pattern(offset + 2 * CHUNK - PAGE,
                                                                     PAGE)
                            with region.pinned(offset + CHUNK, CHUNK):
                                if round_ % 3 == 0:
                                    raise KeyError("inside")
                    except KeyError:
                        pass
            except BaseException as error:  # noqa: BLE001
                errors.append(error)

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert not errors, errors
        for chunk in range(8):
            assert region.pin_count(chunk * CHUNK) == 0
            assert chunk_volatile(region, chunk), chunk


def test_cheap_pin_access_purge_inside_and_after(backend: str) -> None:
    for how in discard_kinds(backend):
        with vrange.Region(SIZE, fill, backend=backend) as region:
            region.mark_nonvolatile()
            region.mark_volatile()
            discard(region, how)
            with region.pinned(CHUNK, 2 * CHUNK, populate=False) as pin:
                assert pin.purged
                pin.view[0:PAGE] = b"\xcc" * PAGE     # first access: refill, then write
                discard(region, how)                 # must not take the pinned chunk
                assert bytes(pin.view[0:PAGE]) == b"\xcc" * PAGE, how
                assert bytes(pin.view[CHUNK:CHUNK + PAGE]) == pattern(2 * CHUNK, PAGE)
            discard(region, how)
            assert region.mark_nonvolatile(CHUNK, CHUNK, populate=False), how


def test_unaligned_pinned_ranges_count_per_chunk(backend: str) -> None:
    with vrange.Region(SIZE, fill, backend=backend) as region:
        region.mark_volatile()
        with region.pinned(CHUNK - PAGE, 2 * PAGE):        # chunks 0 and 1
            with region.pinned(CHUNK + PAGE, PAGE):         # chunk 1 again
                assert region.pin_count(0) == 1
                assert region.pin_count(CHUNK) == 2
                region.mark_volatile(0, 2 * CHUNK)           # cannot take a block's pin
                region.purge()
                assert region.pin_count(CHUNK) == 2
            assert not chunk_volatile(region, 1)
            region.purge()
        assert region.pin_count(0) == region.pin_count(CHUNK) == 0
        assert chunk_volatile(region, 0) and chunk_volatile(region, 1)


# --- vrange.Cache ---------------------------------------------------------------------------------

def value_of(key: object, size: int = CHUNK + 100) -> bytes:
    seed = hash(key) & 0xFFFF
    return pattern(seed * PAGE, size)


def test_cache_borrow_ended_on_another_thread_releases_its_pin(backend: str) -> None:
    """A borrow's context manager entered on one thread and exited on another (an ExitStack handed
    to a worker, a pool thread finishing a request): the item must not stay pinned for ever, nor
    the cache become unclosable."""
    cache = vrange.Cache(4 * CHUNK, value_of, backend=backend)
    manager = cache.borrow("a")
    view = manager.__enter__()
    assert bytes(view) == value_of("a")
    problems: list[BaseException] = []

    def finish() -> None:
        try:
            manager.__exit__(None, None, None)
        except BaseException as error:  # noqa: BLE001
            problems.append(error)

    worker = threading.Thread(target=finish)
    worker.start()
    worker.join()
    try:
        assert not problems, problems
        assert cache.stats().pinned_items == 0
        cache.purge()
        assert cache["a"] == value_of("a")
    finally:
        cache.close()  # BufferError if the borrow is still counted as open


def test_cache_stale_borrow_view_read_after_purge_does_not_hide_the_purge(backend: str) -> None:
    """A view kept past its borrow block reads zeros after a purge (documented) and so refills the
    chunk with zeros; the next lookup must still see the purge and reload, never hand the zeros."""
    for how in discard_kinds(backend):
        with vrange.Cache(4 * CHUNK, value_of, backend=backend) as cache:
            with cache.borrow("a") as view:
                kept = view[:]
            if how == "kernel":
                page_out(cache.region)
            else:
                cache.purge()
            assert bytes(kept[:16]) in (b"\0" * 16, value_of("a")[:16])  # refills the chunk
            assert bytes(kept[-16:]) in (b"\0" * 16, value_of("a")[-16:])
            kept.release()
            assert cache["a"] == value_of("a"), how
            with cache.borrow("a") as view:
                assert bytes(view) == value_of("a")


def test_cache_loads_of_changing_sizes_and_edge_values(backend: str) -> None:
    sizes = iter([0, CHUNK, 3 * CHUNK + 1, 1, 4 * CHUNK, 2 * CHUNK, 0, 5])
    current: dict[str, bytes] = {}

    def load(key: str) -> bytes:
        current[key] = value_of(key, next(sizes))
        return current[key]

    with vrange.Cache(4 * CHUNK, load, backend=backend) as cache:
        for _ in range(6):
            assert cache["k"] == current["k"]
            assert cache["k"] == current["k"]  # a hit
            with cache.borrow("k") as view:
                assert bytes(view) == current["k"]
            cache.purge()
        stats = cache.stats()
        assert stats.hits + stats.misses + stats.reloads == 18
        assert stats.misses == 1


def test_cache_value_of_exactly_capacity_evicts_everything_not_borrowed(backend: str) -> None:
    with vrange.Cache(4 * CHUNK, backend=backend) as cache:
        for key in range(4):
            cache[key] = value_of(key, CHUNK)
        with cache.borrow(2) as view:
            with pytest.raises(vrange.CacheFullError):
                cache["big"] = b"x" * (4 * CHUNK)
            assert bytes(view) == value_of(2, CHUNK)
        cache["big"] = b"y" * (4 * CHUNK)
        assert cache["big"] == b"y" * (4 * CHUNK)
        assert len(cache) == 1
        cache[""] = b""
        cache.purge()
        assert cache.get("") == b""


def test_cache_threads_never_see_a_wrong_value(backend: str) -> None:
    """Readers, borrowers, writers, removers and purgers at once; every value seen is load(key)."""
    keys = list(range(12))

    def load(key: int) -> bytes:
        return value_of(key, (key % 3 + 1) * CHUNK - 7)

    cache = vrange.Cache(8 * CHUNK, load, backend=backend)
    errors: list[BaseException] = []
    stop = threading.Event()

    def reader(seed: int) -> None:
        import random

        rng = random.Random(seed)
        try:
            while not stop.is_set():
                key = rng.choice(keys)
                action = rng.randrange(8)
                if action == 0:
                    with cache.borrow(key) as view:
                        assert bytes(view) == load(key), key
                elif action == 1:
                    try:
                        cache[key] = load(key)
                    except vrange.CacheFullError:
                        pass  # documented: items in use hold the room
                elif action == 2:
                    got = cache.pop(key, None)
                    assert got is None or got == load(key)
                elif action == 3:
                    cache.purge()
                elif action == 4 and kernel_reclaims(backend):
                    page_out(cache.region)
                elif action == 5:
                    del_ok = key in cache
                    assert isinstance(del_ok, bool)
                elif action == 6 and rng.random() < 0.05:
                    cache.clear()
                else:
                    assert cache[key] == load(key), key
        except BaseException as error:  # noqa: BLE001
            errors.append(error)
            stop.set()

    threads = [threading.Thread(target=reader, args=(i,)) for i in range(6)]
    for thread in threads:
        thread.start()
    stop.wait(4.0)
    stop.set()
    for thread in threads:
        thread.join()
    assert not errors, errors[0]
    stats = cache.stats()
    assert stats.pinned_items == 0
    cache.close()


def test_cache_load_that_uses_the_cache(backend: str) -> None:
    with vrange.Cache(8 * CHUNK, backend=backend) as plain:
        pass

    cache: vrange.Cache[str]

    def load(key: str) -> bytes:
        if key == "derived":
            return cache["base"] + b"!"
        if key == "self-removing":
            cache.pop(key, None)
            cache.clear()
            return b"s" * 10
        if key == "self":
            return cache["self"]
        return b"b" * 10

    cache = vrange.Cache(8 * CHUNK, load, backend=backend)
    with cache:
        assert cache["derived"] == b"b" * 10 + b"!"
        assert cache["self-removing"] == b"s" * 10
        with pytest.raises(RuntimeError):
            cache["self"]
        assert cache["derived"] == b"b" * 10 + b"!"
        assert cache.stats().pinned_items == 0


def test_cache_fork_inside_a_borrow() -> None:
    import os

    cache = vrange.Cache(4 * CHUNK, value_of)
    with cache.borrow("a") as view:
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                assert bytes(view) == value_of("a")
            except BaseException:  # noqa: BLE001
                code = 1
            os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert status == 0
    cache.purge()
    assert cache["a"] == value_of("a")
    cache.close()


# --- a block abandoned in a reference cycle, finalized by the garbage collector -----------------

def _abandon_in_a_cycle_then_work(kind: str, backend: str, allocations: int) -> None:
    """(in a child) Enter a pinned()/borrow() block, drop it in a reference cycle, and go on using
    the same object: the cyclic GC finalizes the block (its ``finally`` runs) at whatever
    allocation it happens to run, also while this thread holds the object's lock."""
    import os
    import signal

    signal.alarm(2)
    target: Any
    if kind == "cache":
        target = vrange.Cache(8 * CHUNK, lambda key: b"v" * 100, backend=backend)
        target["b"]
    else:
        target = vrange.Region(8 * CHUNK, vrange.sources.Zeros(), backend=backend)
    gc.collect()
    gc.disable()
    manager = target.borrow("a") if kind == "cache" else target.pinned(0, CHUNK)
    manager.__enter__()
    holder: list[Any] = [manager]
    holder.append(holder)
    del manager, holder
    gc.set_threshold(60, 10, 10)
    gc.enable()
    junk = [[] for _ in range(allocations)]
    for _ in range(3):
        if kind == "cache":
            target["b"]
        else:
            target.mark_nonvolatile(CHUNK, CHUNK)
            target.mark_volatile(CHUNK, CHUNK)
    gc.collect()
    del junk
    import time

    deadline = time.monotonic() + 1.5  # an abandoned block may end on another thread
    while (target.stats().pinned_items if kind == "cache" else target.pin_count(0)) and \
            time.monotonic() < deadline:
        time.sleep(0.01)
    if kind == "cache":
        assert target.stats().pinned_items == 0
        target.close()  # no borrow is counted open any more
    else:
        assert target.pin_count(0) == 0
    os._exit(0)


@pytest.mark.hang_timeout(240)
@pytest.mark.parametrize("kind", ["region", "cache"])
def test_a_block_finalized_by_the_gc_under_the_lock_does_not_deadlock(backend: str,
                                                                       kind: str) -> None:
    import os

    hung = []
    for allocations in range(0, 42, 3):
        pid = os.fork()
        if pid == 0:
            try:
                _abandon_in_a_cycle_then_work(kind, backend, allocations)
            finally:
                os._exit(3)
        _, status = os.waitpid(pid, 0)
        if status != 0:
            hung.append((allocations, "deadlock (SIGALRM)" if os.WIFSIGNALED(status) and
                         os.WTERMSIG(status) == 14 else status))
    assert not hung, hung


def test_an_abandoned_block_dropped_by_refcount_ends_at_once(backend: str) -> None:
    with vrange.Region(SIZE, fill, backend=backend) as region:
        region.mark_volatile()
        manager = region.pinned(0, CHUNK)
        manager.__enter__()
        assert region.pin_count(0) == 1
        del manager
        assert region.pin_count(0) == 0
        assert chunk_volatile(region, 0)
    with vrange.Cache(4 * CHUNK, value_of, backend=backend) as cache:
        borrow = cache.borrow("a")
        borrow.__enter__()
        assert cache.stats().pinned_items == 1
        del borrow
        assert cache.stats().pinned_items == 0


class _Failable:
    def __init__(self) -> None:
        self.fail = False

    def __call__(self, offset: int, buf: memoryview) -> None:
        if self.fail:
            raise OSError("source unavailable")
        buf[:] = pattern(offset, len(buf))


@pytest.mark.requires("kernel_reclaims")
def test_a_failed_populate_keeps_the_writes_of_a_pinned_partly_present_chunk(backend: str) -> None:
    """An outer cheap pin holds a chunk the kernel took one page of; the program writes a present
    page. A populating pin of the same chunk whose regeneration fails raises, but must not drop the
    pinned chunk's present (written) pages."""
    regenerate = _Failable()
    with vrange.Region(SIZE, regenerate, backend=backend, on_error="poison") as region:
        region.mark_nonvolatile()
        region.mark_volatile()
        mmap.mmap.madvise(region, mmap.MADV_DONTNEED, 3 * PAGE, PAGE)  # the kernel took page 3
        with region.pinned(0, CHUNK, populate=False) as outer:
            assert outer.purged
            outer.view[0:PAGE] = b"\xdd" * PAGE           # present page: no fault
            regenerate.fail = True
            with pytest.raises(vrange.RegenerationError):
                region.mark_nonvolatile(0, CHUNK)
            regenerate.fail = False
            region.purge()
            written = bytes(outer.view[0:PAGE])
            refilled = bytes(outer.view[3 * PAGE:4 * PAGE])
        assert written == b"\xdd" * PAGE, "the pinned chunk's written page was dropped"
        assert refilled == pattern(3 * PAGE, PAGE)


@pytest.mark.forked  # the policy (budgets, counters, its thread) is process-wide
def test_budget_never_takes_pinned_chunks(backend: str) -> None:
    import vrange.policy

    group = "breaker-pins"
    vrange.policy.set_budget(0, group=group)
    try:
        with vrange.Region(SIZE, fill, backend=backend, group=group) as region:
            region.mark_nonvolatile()
            region.mark_volatile()
            with region.pinned(2 * CHUNK, 2 * CHUNK, populate=False) as pin:
                pin.view[0:PAGE] = b"\xee" * PAGE
                region.mark_nonvolatile(5 * CHUNK, CHUNK)
                region[5 * CHUNK:5 * CHUNK + PAGE] = b"\xef" * PAGE
                region.mark_volatile(0, 2 * CHUNK)  # more volatile memory: budgets enforced
                vrange.policy.enforce()
                assert bytes(pin.view[0:PAGE]) == b"\xee" * PAGE
                assert bytes(pin.view[CHUNK:CHUNK + PAGE]) == pattern(3 * CHUNK, PAGE)
                assert bytes(region[5 * CHUNK:5 * CHUNK + PAGE]) == b"\xef" * PAGE
            # the block's chunks are volatile again: the budget may take them now
            vrange.policy.enforce()
            region.mark_nonvolatile(0, CHUNK, populate=False)
            assert region.stats().volatile_bytes <= SIZE
    finally:
        vrange.policy.set_budget(None, group=group)


def test_cache_new_value_while_old_is_borrowed_then_evictions(backend: str) -> None:
    with vrange.Cache(4 * CHUNK, backend=backend) as cache:
        cache["k"] = b"old" * 1000
        with cache.borrow("k") as view:
            cache["k"] = b"new" * 1000
            for key in range(10):                     # evictions all around the borrowed chunks
                cache[key] = bytes([key]) * CHUNK
            cache.purge()
            assert bytes(view) == b"old" * 1000
        assert cache.get("k") in (None, b"new" * 1000)
        for key in range(10):
            assert cache.get(key) in (None, bytes([key]) * CHUNK)
        stats = cache.stats()
        assert stats.pinned_items == 0
        assert stats.evictions >= 7


@pytest.mark.requires("kernel_reclaims")
def test_cache_stats_after_page_out(backend: str) -> None:
    loads: list[str] = []

    def load(key: str) -> bytes:
        loads.append(key)
        return value_of(key)

    with vrange.Cache(8 * CHUNK, load, backend=backend) as cache:
        for key in "abc":
            assert cache[key] == value_of(key)
        page_out(cache.region)
        for key in "abc":
            assert cache[key] == value_of(key)
            assert cache[key] == value_of(key)
        stats = cache.stats()
        assert stats.misses == 3
        assert stats.hits + stats.reloads == 6
        assert stats.reloads == len(loads) - 3
        assert stats.resident_bytes <= 3 * 2 * CHUNK


def test_cache_concurrent_misses_of_one_key_with_a_failing_first_load(backend: str) -> None:
    import time

    calls: list[int] = []
    lock = threading.Lock()

    def load(key: str) -> bytes:
        with lock:
            calls.append(1)
            first = len(calls) == 1
        time.sleep(0.2)
        if first:
            raise OSError("first load fails")
        return value_of(key)

    with vrange.Cache(4 * CHUNK, load, backend=backend) as cache:
        results: list[object] = []
        barrier = threading.Barrier(4)

        def reader() -> None:
            barrier.wait()
            try:
                results.append(cache["k"])
            except OSError as error:
                results.append(error)

        threads = [threading.Thread(target=reader) for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert sum(isinstance(each, OSError) for each in results) == 1
        assert results.count(value_of("k")) == 3
        assert len(calls) == 2
        stats = cache.stats()
        assert (stats.hits, stats.misses, stats.reloads) == (0, 4, 0)


def test_mocks_as_regenerators() -> None:
    from unittest import mock

    regenerate = mock.Mock(side_effect=fill)
    with vrange.Region(SIZE, regenerate) as region:
        region.mark_nonvolatile()
        assert bytes(region[0:PAGE]) == pattern(0, PAGE)
    assert regenerate.called
    with pytest.raises(TypeError, match="async"):
        vrange.Region(SIZE, mock.AsyncMock())


def test_cache_close_while_threads_read_frees_the_region(backend: str) -> None:
    import time

    def load(key: int) -> bytes:
        time.sleep(0.001)
        return value_of(key, 3 * CHUNK)

    cache = vrange.Cache(16 * CHUNK, load, backend=backend)
    stop = threading.Event()
    errors: list[BaseException] = []

    def reader(seed: int) -> None:
        key = seed
        while not stop.is_set():
            key = (key + 1) % 9
            try:
                if key % 2:
                    assert cache[key] == load(key)
                else:
                    with cache.borrow(key) as view:
                        assert bytes(view[:64]) == load(key)[:64]
            except ValueError as error:
                if "closed" not in str(error):
                    errors.append(error)
                return
            except BaseException as error:  # noqa: BLE001
                errors.append(error)
                return

    threads = [threading.Thread(target=reader, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    time.sleep(0.3)
    while True:
        try:
            cache.close()
            break
        except BufferError:  # a borrow is open right now
            time.sleep(0.001)
    stop.set()
    for thread in threads:
        thread.join()
    assert not errors, errors[0]
    assert cache.closed
    assert cache.region.closed, "the cache's memory was never freed"


@pytest.mark.parametrize("populate", [True, False])
@pytest.mark.requires("kernel_reclaims")
def test_a_chunk_missing_one_page_is_reported(backend: str, populate: bool) -> None:
    with vrange.Region(SIZE, fill, backend=backend) as region:
        region.mark_nonvolatile()
        region.mark_volatile()
        for page in (0, 15):  # first and last page of a chunk
            mmap.mmap.madvise(region, mmap.MADV_DONTNEED, 2 * CHUNK + page * PAGE, PAGE)
        with region.pinned(CHUNK, 3 * CHUNK, populate=populate) as pin:
            assert pin.purged_ranges == [(2 * CHUNK, CHUNK)]
            assert bytes(pin.view) == pattern(CHUNK, 3 * CHUNK)
        with region.pinned(CHUNK, 3 * CHUNK, populate=populate) as pin:
            assert not pin.purged  # reported once


def test_cache_on_the_memfd_trap_with_more_than_8192_chunks() -> None:
    try:
        cache = vrange.Cache(8193 * CHUNK, backend="sigbus:memfd")
    except vrange.VRangeError as error:
        pytest.skip(f"no memfd trap here: {error}")
    with cache:
        assert cache.capacity >= 8193 * CHUNK
        assert cache.capacity % cache.chunk_size == 0
        big = b"z" * cache.capacity
        cache["big"] = big
        cache.purge()
        assert cache.get("big") is None  # no load: a purged item is gone
        cache["small"] = b"s"
        assert cache["small"] == b"s"


@pytest.mark.forked  # the policy (budgets, counters, its thread) is process-wide
def test_cache_borrow_survives_a_zero_budget(backend: str) -> None:
    import vrange.policy

    group = "breaker-cache"
    vrange.policy.set_budget(0, group=group)
    try:
        with vrange.Cache(8 * CHUNK, value_of, backend=backend, group=group) as cache:
            for key in "abcd":
                cache[key]
            with cache.borrow("b") as view:
                vrange.policy.enforce()
                cache.purge()
                assert bytes(view) == value_of("b")
            vrange.policy.enforce()
            for key in "abcd":
                assert cache[key] == value_of(key)
            assert cache.stats().reloads >= 1
    finally:
        vrange.policy.set_budget(None, group=group)


def test_no_fd_or_mapping_leak_over_pins_and_caches(backend: str) -> None:
    import os

    def counts() -> tuple[int, int]:
        with open("/proc/self/maps") as maps:
            return len(os.listdir("/proc/self/fd")), sum(1 for _ in maps)

    def cycle() -> None:
        with vrange.Region(4 * CHUNK, fill, backend=backend) as region:
            region.mark_volatile()
            with region.pinned(0, 2 * CHUNK, populate=False) as pin:
                pin.view[0] = 1
                region.purge()
            region.purge()
            with region.pinned(0, CHUNK):
                pass
        with vrange.Cache(4 * CHUNK, value_of, backend=backend) as cache:
            with cache.borrow("a"):
                cache["b"]
            cache.purge()
            cache["a"]

    for _ in range(5):
        cycle()
    gc.collect()
    before = counts()
    for _ in range(60):
        cycle()
    gc.collect()
    after = counts()
    assert after[0] <= before[0], ("fds", before, after)
    assert after[1] <= before[1] + 4, ("mappings", before, after)
