"""vrange.Cache on every backend: loads, reloads after purges (vrange's, the kernel's, the pressure
policy's), LRU eviction, borrows, threads, bad input, and a model-checked state machine."""

from __future__ import annotations

import array
import json
import os
import random
import threading
import time
import traceback
import zlib
from collections import OrderedDict
from collections.abc import Callable

import numpy as np
import pytest
from conftest import CHUNK, PAGE, kernel_reclaims, missing_capability, require, run_python
from hypothesis import HealthCheck, note, settings
from hypothesis import strategies as st
from hypothesis.stateful import (RuleBasedStateMachine, invariant, precondition, rule,
                                 run_state_machine_as_test)

import vrange
import vrange.policy
import vrange.testing
from vrange.testing import page_out


def value_of(key: int) -> bytes:
    """The bytes ``load`` gives for ``key``: sizes from empty to several chunks, every key
    different."""
    length = (key * 7919) % (3 * CHUNK + 1000) if key % 5 else key % 3
    seed = zlib.crc32(key.to_bytes(8, "little"))
    return (seed.to_bytes(4, "little") * (length // 4 + 1))[:length]


class Loader:
    """``value_of`` with a count of calls per key (thread-safe)."""

    def __init__(self, value: Callable[[int], bytes] = value_of) -> None:
        self.value = value
        self.calls: dict[int, int] = {}
        self.lock = threading.Lock()

    def __call__(self, key: int) -> bytes:
        with self.lock:
            self.calls[key] = self.calls.get(key, 0) + 1
        return self.value(key)

    @property
    def total(self) -> int:
        return sum(self.calls.values())


@pytest.fixture
def discard(request: pytest.FixtureRequest, backend: str) -> Callable[[vrange.Cache[int]], None]:
    """Make every unpinned item of a cache purged: by ``cache.purge()`` or by the kernel
    (MADV_PAGEOUT, on the backends the kernel reclaims)."""

    def discard_all(cache: vrange.Cache[int]) -> None:
        if request.param == "purge":
            assert cache.purge() > 0
        else:
            page_out(cache.region)
        assert cache.region.stats().purged_bytes > 0, "nothing was discarded"

    return discard_all


def make(backend: str, max_bytes: int = 64 * CHUNK, load: object = None,
         **options: object) -> vrange.Cache[int]:
    return vrange.Cache(max_bytes, load, backend=backend, **options)  # type: ignore[arg-type]


# --- loads, hits, reloads ------------------------------------------------------------------------


def test_hits_misses_and_reloads_are_counted(backend: str) -> None:
    loader = Loader()
    with make(backend, load=loader) as cache:
        keys = list(range(1, 11))
        for key in keys:
            assert cache[key] == value_of(key)
        stats = cache.stats()
        assert (stats.hits, stats.misses, stats.reloads, stats.evictions) == (0, 10, 0, 0)
        assert stats.items == len(cache) == 10
        assert stats.bytes == sum(len(value_of(key)) for key in keys)
        assert stats.pinned_items == 0
        assert stats.capacity == 64 * CHUNK
        for key in keys:
            assert cache[key] == value_of(key)
            assert cache.get(key) == value_of(key)
        assert cache.stats().hits == 20 and loader.total == 10
        nonempty = [key for key in keys if value_of(key)]
        discarded = cache.purge()
        assert discarded == sum(-(-len(value_of(key)) // CHUNK) * CHUNK for key in keys)
        assert cache.stats().resident_bytes == 0
        for key in keys:
            assert cache[key] == value_of(key)
        stats = cache.stats()
        assert stats.reloads == len(nonempty)  # an empty value has no memory to lose
        assert stats.hits == 20 + len(keys) - len(nonempty)
        assert loader.total == 10 + len(nonempty)
        assert all(loader.calls[key] == 2 for key in nonempty)
        assert stats.resident_bytes == discarded


def test_values_read_back_right_after_every_kind_of_discard(
        backend: str, discard: Callable[[vrange.Cache[int]], None]) -> None:
    loader = Loader()
    with make(backend, load=loader) as cache:
        keys = list(range(1, 30))
        for key in keys:
            assert cache[key] == value_of(key)
        for _ in range(3):
            discard(cache)
            for key in random.Random(1).sample(keys, len(keys)):
                assert cache[key] == value_of(key), key
                with cache.borrow(key) as view:
                    assert view == value_of(key)
        stats = cache.stats()
        assert stats.reloads > 0
        assert stats.hits + stats.misses + stats.reloads == 2 * 3 * len(keys) + len(keys)
        assert loader.total == stats.misses + stats.reloads


def test_many_values_types_are_bytes_like(backend: str) -> None:
    samples: dict[int, object] = {
        1: b"bytes",
        2: bytearray(b"bytearray" * 1000),
        3: memoryview(b"a memoryview of bytes"),
        4: array.array("I", range(50_000)),  # 200,000 bytes: four chunks
        5: np.arange(30_000, dtype=np.int64)[::3],  # not contiguous: copied
        6: np.zeros((0,), dtype=np.uint8),
    }
    with make(backend, load=samples.__getitem__) as cache:
        for key, value in samples.items():
            expected = memoryview(value).tobytes()  # type: ignore[arg-type]
            assert cache[key] == expected
            assert type(cache[key]) is bytes
        cache.purge()
        for key, value in samples.items():
            assert cache[key] == memoryview(value).tobytes()  # type: ignore[arg-type]


def test_a_value_as_large_as_the_cache_and_chunk_sizes(backend: str) -> None:
    with make(backend, max_bytes=5 * PAGE + 1, chunk_size=PAGE) as cache:
        assert cache.capacity == 6 * PAGE and cache.chunk_size == PAGE
        big = bytes(range(256)) * (6 * PAGE // 256)
        cache["big"] = big  # type: ignore[index]
        assert cache["big"] == big  # type: ignore[index]
        cache.purge()
        assert "big" not in cache  # no load: gone
        with pytest.raises(ValueError, match=f"a value of {6 * PAGE + 1} bytes cannot be stored"):
            cache["bigger"] = big + b"!"  # type: ignore[index]


# --- eviction ------------------------------------------------------------------------------------


def test_eviction_is_least_recently_used(backend: str) -> None:
    loader = Loader(lambda key: bytes([key]) * CHUNK)  # one chunk each
    with make(backend, max_bytes=4 * CHUNK, load=loader) as cache:
        cache[0] = b""  # holds no chunk: never evicted to make room
        for key in (1, 2, 3, 4):
            cache[key]
        assert cache.keys() == [0, 1, 2, 3, 4]
        cache[1]            # used again: 2 is now the oldest
        assert cache.keys() == [0, 2, 3, 4, 1]
        cache[5]
        assert cache.keys() == [0, 3, 4, 1, 5] and 2 not in cache
        cache[6] = b"\x06" * (2 * CHUNK)  # two chunks: evicts 3 and 4 (their chunks adjoin)
        assert cache.keys() == [0, 1, 5, 6]
        assert cache.stats().evictions == 3
        with cache.borrow(1):  # a borrow is a use too
            pass
        assert cache.keys() == [0, 5, 6, 1]
        cache[7]
        assert cache.keys() == [0, 6, 1, 7] and cache.stats().evictions == 4
        assert cache[1] == b"\x01" * CHUNK and cache[6] == b"\x06" * (2 * CHUNK)
        assert cache.stats().resident_bytes == 4 * CHUNK and cache[0] == b""


def test_eviction_makes_a_run_of_chunks_for_a_large_value(backend: str) -> None:
    with make(backend, max_bytes=6 * CHUNK) as cache:
        for key in range(6):
            cache[key] = bytes([key]) * CHUNK
        del cache[1], cache[3]  # two free chunks, not adjacent
        cache[9] = b"\x09" * (2 * CHUNK)  # needs a run of two: evicts the oldest, 0
        assert cache.keys() == [2, 4, 5, 9]
        for key in (2, 4, 5):
            assert cache[key] == bytes([key]) * CHUNK
        assert cache[9] == b"\x09" * (2 * CHUNK)


def test_items_in_use_are_never_evicted(backend: str) -> None:
    loader = Loader(lambda key: bytes([key]) * CHUNK)
    with make(backend, max_bytes=3 * CHUNK, load=loader) as cache:
        with cache.borrow(1) as one, cache.borrow(2) as two:
            for key in range(3, 8):
                assert cache[key] == bytes([key]) * CHUNK
            assert one == b"\x01" * CHUNK and two == b"\x02" * CHUNK
            assert cache.keys() == [1, 2, 7]
            assert cache.stats().pinned_items == 2
            with cache.borrow(7):
                # Every chunk is in use: a loaded value is handed out without being stored...
                assert cache[8] == b"\x08" * CHUNK
                assert 8 not in cache and cache.stats().rejected == 1
                with cache.borrow(9) as nine:
                    assert nine == b"\x09" * CHUNK and nine.readonly
                # ...and storing one raises.
                with pytest.raises(vrange.CacheFullError, match="no room for a value of 65536"):
                    cache[10] = b"x" * CHUNK
                cache[11] = b""  # no memory needed
        assert cache.stats().pinned_items == 0
        cache[12] = b"y" * CHUNK
        assert cache[12] == b"y" * CHUNK


# --- borrows -------------------------------------------------------------------------------------


def test_borrow_is_zero_copy_and_pinned(backend: str) -> None:
    loader = Loader()
    key = 2  # three chunks and a bit
    with make(backend, load=loader) as cache:
        with cache.borrow(key) as view:
            assert view.readonly and view.obj is cache.region
            numbers = np.frombuffer(view, dtype=np.uint8)
            address = numbers.ctypes.data
            del numbers
            assert cache.region.address <= address < cache.region.address + len(cache.region)
            assert view == value_of(key)
            # Neither an explicit purge nor the kernel takes a borrowed item.
            cache.purge()
            vrange.testing.inject_purge(cache.region)
            if cache.region.kernel_reclaims:
                page_out(cache.region)
            assert view == value_of(key)
            assert cache.stats().pinned_items == 1
        assert cache[key] == value_of(key)
        assert cache.stats().reloads == 0 and loader.total == 1
        cache.purge()
        with cache.borrow(key) as view:
            assert view == value_of(key)
        assert cache.stats().reloads == 1


def test_borrows_nest_and_removal_waits_for_the_last(backend: str) -> None:
    with make(backend, max_bytes=4 * CHUNK, load=Loader()) as cache:
        with cache.borrow(2) as outer:
            with cache.borrow(2) as inner:
                assert inner == outer == value_of(2)
                assert cache.stats().pinned_items == 1
            assert outer == value_of(2)
            del cache[2]                   # gone from the mapping at once...
            assert 2 not in cache and cache.stats().bytes == 0
            cache.purge()
            assert outer == value_of(2)    # ...but its memory is kept for the borrow
            cache[1] = b"z" * (2 * CHUNK)  # the free chunks do not include the borrowed ones
            assert outer == value_of(2)
            with pytest.raises(vrange.CacheFullError):
                cache[3] = b"w" * (4 * CHUNK)  # nothing evicted: it could not fit anyway
            assert cache.keys() == [1]
        cache[3] = b"w" * (4 * CHUNK)  # evicts 1, and reuses the chunk 2 had
        assert cache[3] == b"w" * (4 * CHUNK) and cache.keys() == [3]


def test_the_view_ends_with_the_borrow_and_what_outlives_it_keeps_the_memory_mapped(
        backend: str) -> None:
    cache = make(backend)
    cache[1] = b"abc" * 1000
    with pytest.raises(KeyError, match="mine"):
        with cache.borrow(1) as view:
            kept = np.frombuffer(view, dtype=np.uint8)
            raise KeyError("mine")
    with pytest.raises(ValueError, match="released"):
        view[0]
    assert cache.stats().pinned_items == 0
    with pytest.raises(BufferError):
        cache.close()  # the region stays mapped while the array exists...
    assert cache[1] == b"abc" * 1000
    del kept
    cache.close()      # ...and is closed once it is gone
    assert cache.closed


# --- the mapping without load, and changes -------------------------------------------------------


def test_a_cache_without_load_is_a_mapping_that_forgets(backend: str) -> None:
    with make(backend) as cache:
        with pytest.raises(KeyError):
            cache[1]
        assert cache.get(1) is None and cache.get(1, b"d") == b"d"
        for key in range(1, 8):
            cache[key] = value_of(key)
        assert len(cache) == 7 and set(cache) == set(range(1, 8))
        assert cache.pop(1) == value_of(1) and 1 not in cache
        assert cache.pop(1, None) is None
        with pytest.raises(KeyError):
            cache.pop(1)
        with cache.borrow(2):
            assert cache.purge() > 0
        # The borrowed item survived; the others (but the empty one) were dropped.
        assert sorted(cache) == sorted([2] + [key for key in range(3, 8) if not value_of(key)])
        assert cache[2] == value_of(2)
        cache[3] = value_of(3)
        cache[4] = value_of(4)
        cache.region.purge()  # as pressure would: the cache learns of it at the next lookup
        assert len(cache) >= 3
        assert 3 not in cache and cache.get(2) is None
        assert cache.pop(4, "purged") == "purged" and 4 not in cache
        assert cache.stats().reloads == 0
        stats = cache.stats()
        assert stats.items == len(cache) and stats.bytes == sum(
            len(value_of(key)) for key in cache)
        cache.clear()
        assert len(cache) == 0 and cache.stats().bytes == 0 and cache.stats().resident_bytes == 0


def test_set_replace_pop_and_delete(backend: str) -> None:
    loader = Loader()
    with make(backend, load=loader) as cache:
        cache[1] = b"first"
        assert cache[1] == b"first" and loader.total == 0  # a stored value is not loaded
        cache[1] = bytearray(b"second" * 30_000)
        assert cache[1] == b"second" * 30_000 and len(cache) == 1
        assert cache.pop(1) == b"second" * 30_000
        assert cache.pop(1, "gone") == "gone" and loader.total == 0  # pop never loads
        assert cache[2] == value_of(2)
        cache.purge()
        assert cache.pop(2) == value_of(2)  # purged: loaded once more to be returned
        assert loader.total == 2 and cache.stats().reloads == 1
        cache[3]
        del cache[3]
        with pytest.raises(KeyError):
            del cache[3]
        assert cache.stats().resident_bytes == 0 and cache.stats().bytes == 0


def test_get_loads_and_a_key_error_from_load_is_a_miss(backend: str) -> None:
    known = {1: b"one"}
    with make(backend, load=known.__getitem__) as cache:
        assert cache.get(1) == b"one"
        assert cache.get(2, b"default") == b"default"
        with pytest.raises(KeyError):
            cache[2]
        assert 2 not in cache and 1 in cache
        assert cache.stats().misses == 3


@pytest.mark.forked
def test_a_forked_child_has_a_working_cache(backend: str) -> None:
    loader = Loader()
    with make(backend, load=loader) as cache:
        for key in range(1, 9):
            cache[key]
        started, release = threading.Event(), threading.Event()

        def slow(key: int) -> bytes:
            started.set()
            release.wait(10)
            return value_of(key)

        other = make(backend, load=slow)
        thread = threading.Thread(target=lambda: other[1])
        thread.start()
        assert started.wait(10)  # a load in flight in another thread at fork
        borrowed, done = threading.Event(), threading.Event()

        def borrow() -> None:
            with cache.borrow(2):
                borrowed.set()
                done.wait(10)

        borrower = threading.Thread(target=borrow)
        borrower.start()
        assert borrowed.wait(10)  # and a borrow open in another thread
        with cache.borrow(3):
            pid = os.fork()
        if pid == 0:
            status = 1
            try:
                # The borrow of the thread that does not exist here has ended; this thread's own
                # ended normally.
                assert cache.stats().pinned_items == 0
                for key in range(1, 9):
                    assert cache[key] == value_of(key)
                assert cache.purge() > 0
                for key in range(1, 12):
                    assert cache[key] == value_of(key)
                assert cache.stats().reloads >= 8
                release.set()  # no thread loads it in the child: the lookup loads it itself
                assert other[1] == value_of(1)
                other.close()
                with pytest.raises(BufferError):  # the other thread's view is still here
                    cache.close()
                status = 0
            except BaseException:
                traceback.print_exc()
            finally:
                os._exit(status)
        _, status = os.waitpid(pid, 0)
        release.set()
        done.set()
        thread.join()
        borrower.join()
        other.close()
        assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
        assert all(cache[key] == value_of(key) for key in range(1, 9))


def test_larger_chunks_chosen_by_the_backend_are_whole(report: vrange.Features) -> None:
    """The memfd trap uses at most 8192 chunks per region: the cache's chunks grow, and its size
    stays a whole number of them."""
    require("sigbus_memfd_trap", "(it chooses larger chunks for large regions)", report)
    max_bytes = 8193 * CHUNK
    with vrange.Cache[int](max_bytes, backend="sigbus:memfd") as cache:
        assert cache.chunk_size == 2 * CHUNK
        assert cache.capacity == len(cache.region) == 4097 * 2 * CHUNK >= max_bytes
        cache[1] = b"x" * (3 * CHUNK)
        assert cache[1] == b"x" * (3 * CHUNK)
        assert cache.stats().resident_bytes == 4 * CHUNK


# --- bad input -----------------------------------------------------------------------------------


@pytest.mark.parametrize("max_bytes, error", [(0, ValueError), (-1, ValueError),
                                              ("1M", TypeError), (1.5, TypeError),
                                              (True, TypeError)])
def test_bad_max_bytes(max_bytes: object, error: type[Exception]) -> None:
    with pytest.raises(error, match="max_bytes"):
        vrange.Cache(max_bytes)  # type: ignore[arg-type]


def test_bad_load_and_chunk_size(backend: str) -> None:
    with pytest.raises(TypeError, match="load must be"):
        vrange.Cache(CHUNK, b"not callable", backend=backend)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="chunk_size"):
        vrange.Cache(CHUNK, backend=backend, chunk_size=1000)


def test_bad_values_store_nothing(backend: str) -> None:
    results: dict[int, object] = {1: "a str", 2: 42, 3: None, 4: b"x" * (4 * CHUNK + 1)}

    def load(key: int) -> object:
        if key == 5:
            raise OSError("the backing store is down")
        return results[key]

    with make(backend, max_bytes=4 * CHUNK, load=load) as cache:
        with pytest.raises(TypeError, match="load\\(1\\) must be a bytes-like object, not str"):
            cache[1]
        with pytest.raises(TypeError, match="not int"):
            cache.get(2)
        with pytest.raises(TypeError, match="not NoneType"):
            with cache.borrow(3):
                pass
        with pytest.raises(ValueError, match="cannot be stored"):
            cache[4]
        with pytest.raises(OSError, match="backing store is down"):
            cache[5]
        with pytest.raises(TypeError, match="a cache value must be a bytes-like object"):
            cache[6] = "text"  # type: ignore[assignment]
        with pytest.raises(TypeError):
            cache[6] = 6  # type: ignore[assignment]
        assert len(cache) == 0 and cache.stats().resident_bytes == 0
        assert cache.stats().misses == 5


def test_a_load_that_looks_up_its_own_key_is_refused(backend: str) -> None:
    cache: vrange.Cache[int]

    def load(key: int) -> bytes:
        return cache[key]

    with make(backend, load=load) as cache:
        with pytest.raises(RuntimeError, match="looked up its own key"):
            cache[1]
        assert len(cache) == 0


def test_closed_cache(backend: str) -> None:
    cache = make(backend, load=Loader())
    region = cache.region
    with cache.borrow(1):
        with pytest.raises(BufferError, match="borrow"):
            cache.close()
    cache.close()
    cache.close()
    assert region.closed and cache.closed and repr(cache) == "<vrange.Cache closed>"
    for call in (lambda: cache[1], lambda: cache.get(1), lambda: 1 in cache, cache.stats,
                 cache.purge, cache.clear, lambda: cache.pop(1), lambda: cache.borrow(1).__enter__(),
                 lambda: cache.__setitem__(1, b"x"), lambda: cache.__enter__()):
        with pytest.raises(ValueError, match="closed vrange.Cache"):
            call()


# --- threads -------------------------------------------------------------------------------------


def test_one_load_per_key_for_threads_that_miss_together(backend: str) -> None:
    started, release = threading.Event(), threading.Event()
    loader = Loader()

    def slow_load(key: int) -> bytes:
        if key == 2:
            started.set()
            assert release.wait(10)
        return loader(key)

    with make(backend, load=slow_load) as cache:
        results: list[bytes] = []
        threads = [threading.Thread(target=lambda: results.append(cache[2])) for _ in range(4)]
        threads[0].start()
        assert started.wait(10)
        for thread in threads[1:]:
            thread.start()
        assert cache[3] == value_of(3)  # another key is not blocked by the slow load
        time.sleep(0.05)
        release.set()
        for thread in threads:
            thread.join()
        assert results == [value_of(2)] * 4
        assert loader.calls[2] == 1
        stats = cache.stats()  # a thread that came after the load is a hit
        assert stats.misses >= 2 and stats.misses + stats.hits == 5


def test_a_failed_load_lets_a_waiting_thread_load(backend: str) -> None:
    started, release = threading.Event(), threading.Event()
    calls = []

    def load(key: int) -> bytes:
        calls.append(key)
        if len(calls) == 1:
            started.set()
            assert release.wait(10)
            raise ConnectionError("first attempt fails")
        return value_of(key)

    with make(backend, load=load) as cache:
        errors: list[BaseException] = []

        def first() -> None:
            try:
                cache[2]
            except ConnectionError as error:
                errors.append(error)

        thread = threading.Thread(target=first)
        thread.start()
        assert started.wait(10)
        waiter_result: list[bytes] = []
        waiter = threading.Thread(target=lambda: waiter_result.append(cache[2]))
        waiter.start()
        time.sleep(0.05)
        release.set()
        thread.join()
        waiter.join()
        assert len(errors) == 1 and waiter_result == [value_of(2)] and calls == [2, 2]


def test_a_reload_of_another_size_is_stored_anew(backend: str) -> None:
    sizes = iter([CHUNK // 2, 3 * CHUNK, 100, 0, CHUNK])
    loads: list[bytes] = []

    def load(key: int) -> bytes:
        loads.append(bytes([len(loads) + 1]) * next(sizes))
        return loads[-1]

    with make(backend, max_bytes=4 * CHUNK, load=load) as cache:
        cache[9] = b"\x09" * CHUNK
        for _ in range(5):
            assert cache[1] == loads[-1]
            assert cache[9] == b"\x09" * CHUNK  # no chunk of another item is overwritten
            stats = cache.stats()
            assert stats.bytes == len(loads[-1]) + CHUNK
            assert cache._allocator.free_chunks + cache._stored_chunks == 4
            cache.purge()
            cache[9] = b"\x09" * CHUNK
        # Loaded once, reloaded three times; the empty value (the fourth) is never purged.
        assert len(loads) == 4 and cache.stats().reloads == 3
        assert cache.stats().evictions == 0


def test_changes_during_a_load_win(backend: str) -> None:
    """A store or a removal of the key while its load runs: the load's result goes to its caller
    only."""
    for change in ("store", "pop", "clear"):
        started, release = threading.Event(), threading.Event()

        def load(key: int) -> bytes:
            started.set()
            assert release.wait(10)
            return value_of(key)

        with make(backend, load=load) as cache:
            cache[2] = value_of(2)
            cache.purge()  # so that the next read reloads (under its pin)
            for key in (1, 2):  # a miss, and a reload
                started.clear()
                release.clear()
                got: list[bytes] = []
                reader = threading.Thread(target=lambda: got.append(cache[key]))
                reader.start()
                assert started.wait(10)
                if change == "store":
                    cache[key] = b"newer"
                elif change == "pop":
                    release.set()  # pop loads a purged item itself, with the same load
                    assert cache.pop(key, None) in (None, value_of(key))
                else:
                    cache.clear()
                release.set()
                reader.join()
                assert got == [value_of(key)]
                if change == "store":
                    assert cache[key] == b"newer"
                else:
                    assert key not in cache
            assert cache.stats().pinned_items == 0


@pytest.mark.hang_timeout(120)
def test_threads_hammering_the_cache_always_read_the_right_bytes(backend: str) -> None:
    """Readers, borrowers, writers, removers and purgers at once; every value read is checked."""
    loader = Loader()
    keys = list(range(1, 40))
    with make(backend, max_bytes=24 * CHUNK, load=loader) as cache:
        stop = time.monotonic() + 3
        failures: list[str] = []
        reads = [0]

        def worker(seed: int) -> None:
            generator = random.Random(seed)
            try:
                while time.monotonic() < stop:
                    key = generator.choice(keys)
                    action = generator.random()
                    if action < 0.45:
                        if cache[key] != value_of(key):
                            failures.append(f"cache[{key}]")
                        reads[0] += 1
                    elif action < 0.65:
                        with cache.borrow(key) as view:
                            if view != value_of(key):
                                failures.append(f"borrow({key})")
                            time.sleep(0)
                            if view != value_of(key):
                                failures.append(f"borrow({key}) changed")
                    elif action < 0.75:
                        cache[key] = value_of(key)
                    elif action < 0.82:
                        value = cache.pop(key, None)
                        if value is not None and value != value_of(key):
                            failures.append(f"pop({key})")
                    elif action < 0.85:
                        cache.get(key)
                        key in cache  # noqa: B015
                    elif action < 0.9:
                        cache.purge()
                    elif action < 0.95:
                        vrange.testing.inject_purge(cache.region,
                                                    page_out=cache.region.kernel_reclaims)
                    else:
                        cache.stats()
            except BaseException as error:  # noqa: BLE001 - reported below
                failures.append(repr(error))

        threads = [threading.Thread(target=worker, args=(seed,)) for seed in range(6)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert failures == []
        stats = cache.stats()
        note = f"{reads[0]} reads, {stats}"
        assert stats.pinned_items == 0, note
        assert stats.reloads > 0 and stats.evictions > 0, note
        assert stats.bytes == sum(len(value_of(key)) for key in cache), note
        assert stats.bytes <= cache.capacity
        for key in keys:
            assert cache[key] == value_of(key)
        # Nothing leaked: every chunk is back once the items are gone.
        cache.clear()
        assert cache._allocator.free_chunks * cache.chunk_size == cache.capacity
        cache[0] = b"\0" * cache.capacity
        assert cache[0] == b"\0" * cache.capacity


# --- the pressure policy and real memory pressure ------------------------------------------------


@pytest.mark.forked  # budgets are process-wide
def test_a_budget_keeps_the_cache_in_bounds_and_every_value_right(backend: str) -> None:
    loader = Loader(lambda key: bytes([key % 256]) * CHUNK)
    vrange.policy.set_budget(8 * CHUNK, group="cache-test")
    try:
        with make(backend, max_bytes=64 * CHUNK, load=loader, group="cache-test") as cache:
            assert cache.region.managed
            for _ in range(3):
                for key in range(64):
                    assert cache[key] == bytes([key % 256]) * CHUNK
                    assert cache.region.stats().resident_bytes <= 9 * CHUNK
            stats = cache.stats()
            assert stats.evictions == 0 and stats.reloads > 64
            assert cache.region.stats().purges_by_reason["budget"] > 0
    finally:
        vrange.policy.set_budget(None, group="cache-test")


@pytest.mark.forked  # the policy's settings are process-wide
@pytest.mark.requires("sigbus_memfd_trap", "(the regions only vrange purges)")
def test_a_store_runs_the_policy_check_where_the_kernel_cannot_reclaim() -> None:
    """On the memfd trap a store does not wait for the monitor thread to wake: it runs the
    policy's check itself first (unless the monitor is switched off: nothing purges then)."""
    loader = Loader(lambda key: bytes([key]) * CHUNK)
    with make("sigbus:memfd", load=loader) as cache:
        assert cache.region.managed and not cache.region.kernel_reclaims
        vrange.policy.configure(monitor=False, high_water=1, low_water=0)  # always over
        cache[1]
        cache[2]
        assert cache[1] == b"\x01" * CHUNK and cache.stats().reloads == 0  # switched off
        pressure_purges = cache.region.stats().purges_by_reason["pressure"]
        vrange.policy.configure(monitor=True)  # its thread may purge 1 and 2 first, or the store
        cache[3]  # its store purges 1 and 2 first, at once, if the thread has not yet
        assert cache.region.stats().purges_by_reason["pressure"] >= pressure_purges + 2
        assert cache[1] == b"\x01" * CHUNK and cache.stats().reloads == 1


PRESSURE_CHILD = """
import json, os, random, sys, zlib
import vrange
import vrange._backends.sigbus, vrange._backends.uffd, vrange.testing  # before dropping privileges
procs, backend, container = sys.argv[1], sys.argv[2], sys.argv[3] == "container"
with open(procs, "w") as file:
    file.write(str(os.getpid()))
if container:  # no userfaultfd at all (a default seccomp profile), and not root
    vrange.testing.deny_userfaultfd()
    os.setgroups([])
    os.setgid(65534)
    os.setuid(65534)
VALUE = 256 << 10
def load(key):
    seed = zlib.crc32(key.to_bytes(4, "little")).to_bytes(4, "little")
    return seed * (VALUE // 4)
keys = int(sys.argv[4]) // VALUE
wrong = 0
with vrange.Cache(keys * VALUE, load, backend=backend) as cache:
    generator = random.Random(1)
    for step in range(3 * keys):
        key = step if step < keys else generator.randrange(keys)
        with cache.borrow(key) as view:
            wrong += view != load(key)
    stats = cache.stats()
    region = cache.region.stats()
    spec = f"{cache.region.backend}:{cache.region.trap}"
print(json.dumps({"wrong": wrong, "reloads": stats.reloads, "evictions": stats.evictions,
                  "purges": region.purges_by_reason, "spec": spec, "uid": os.geteuid()}))
"""


PRESSURE_LIMIT = 96 << 20  # tests/test_memory_pressure.py's cgroup
PRESSURE_CACHE = 320 << 20
HIGH_WATER = PRESSURE_LIMIT - PRESSURE_LIMIT // 8  # the policy purges above it (docs/policy.md)


def run_pressure_child(backend: str, profile: str) -> dict[str, object]:
    from test_memory_pressure import _make_cgroup

    report = vrange.features()
    cgroup = _make_cgroup("v1" if missing_capability("cgroup_v1_memory", report) is None else "v2")
    assert cgroup.path.joinpath("memory.limit_in_bytes" if cgroup.version == "v1"
                                else "memory.max").read_text().strip() == str(PRESSURE_LIMIT)
    try:
        completed = run_python(PRESSURE_CHILD, timeout=140, args=[
            str(cgroup.procs), backend, profile, str(PRESSURE_CACHE)])
        assert completed.returncode != -9, f"OOM-killed: {completed.stderr[-2000:]}"
        assert completed.returncode == 0, completed.stdout + completed.stderr[-2000:]
        assert cgroup.oom_kills() == 0
        result: dict[str, object] = json.loads(completed.stdout)
        peak_file = "memory.max_usage_in_bytes" if cgroup.version == "v1" else "memory.peak"
        if cgroup.path.joinpath(peak_file).exists():
            result["peak"] = int(cgroup.path.joinpath(peak_file).read_text())
        assert result["wrong"] == 0 and result["evictions"] == 0, result
        assert isinstance(result["reloads"], int) and result["reloads"] > 0, result
        return result
    finally:
        cgroup.path.rmdir()


@pytest.mark.hang_timeout(150)
@pytest.mark.requires("root", "(to make a memory cgroup)")
def test_a_cache_three_times_its_memory_cgroup_is_reclaimed_not_oom_killed(backend: str) -> None:
    """A 320 MiB cache in a 96 MiB memory cgroup: the kernel (or vrange's monitor, on the memfd
    trap) takes items back; every value read is right, reloaded where it was taken."""
    result = run_pressure_child(backend, "root")
    purges = result["purges"]
    assert isinstance(purges, dict), result
    assert purges["kernel" if kernel_reclaims(backend) else "pressure"] > 0, result
    if not kernel_reclaims(backend) and "peak" in result:
        # A store runs the policy's check first: usage never gets far past the high-water mark
        # (without that, native refills outran the monitor thread: peaks of 87-92 MiB, and an OOM
        # kill on a busy machine).
        assert result["peak"] <= HIGH_WATER + (4 << 20), result


@pytest.mark.hang_timeout(150)
@pytest.mark.requires("root", "(to make a memory cgroup, then drop to uid 65534)")
@pytest.mark.requires("sigbus_memfd_trap", "(what auto gives where no userfaultfd opens)")
def test_a_container_like_process_keeps_a_cache_three_times_its_limit() -> None:
    """As uid 65534 with userfaultfd denied, ``auto`` gives the memfd trap: vrange's pressure
    monitor purges the cache's items before the OOM killer, and they are reloaded."""
    result = run_pressure_child("auto", "container")
    assert (result["spec"], result["uid"]) == ("sigbus:memfd", 65534), result
    purges = result["purges"]
    assert isinstance(purges, dict) and purges["pressure"] > 0 and purges["kernel"] == 0, result
    if "peak" in result:
        assert result["peak"] <= HIGH_WATER + (4 << 20), result


# --- a model ----------------------------------------------------------------------------------------

SETTINGS = settings(max_examples=150, stateful_step_count=50, deadline=None, print_blob=True,
                    suppress_health_check=[HealthCheck.too_slow])
MODEL_CHUNKS = 6
MODEL_KEYS = st.integers(0, 9)


def model_value(key: int, version: int) -> bytes:
    """At most one chunk, so that the model's LRU eviction is exact (no fragmentation)."""
    length = 0 if key == 0 else (key * 1237 + version * 401) % CHUNK + 1
    return bytes([(key * 31 + version) % 256]) * length


def build_machine(backend: str) -> type[RuleBasedStateMachine]:
    class CacheMachine(RuleBasedStateMachine):
        """The cache against an OrderedDict in LRU order; ``load`` gives version 0 of a value,
        ``cache[key] = ...`` stores other versions (which a purge loses: reloads give version 0)."""

        def __init__(self) -> None:
            super().__init__()
            self.loads = 0
            self.cache: vrange.Cache[int] = vrange.Cache(
                MODEL_CHUNKS * CHUNK, self.load, backend=backend)
            self.model: OrderedDict[int, bytes] = OrderedDict()
            self.hits = self.misses = self.reloads = self.evictions = 0
            self.maybe_purged: set[int] = set()  # page_out may keep some pages: purged or not

        def load(self, key: int) -> bytes:
            self.loads += 1
            return model_value(key, 0)

        def teardown(self) -> None:
            self.cache.close()

        def _make_room(self, key: int, value: bytes) -> None:
            self.model.pop(key, None)
            if not value:
                return
            while sum(1 for stored in self.model.values() if stored) >= MODEL_CHUNKS:
                victim = next(k for k, stored in self.model.items() if stored)
                del self.model[victim]
                self.maybe_purged.discard(victim)
                self.evictions += 1

        def _expect_read(self, key: int) -> bytes:
            if key in self.model:
                expected = self.model[key]
                self.model.move_to_end(key)
                if key in self.maybe_purged:
                    return expected  # checked by the caller: old value or version 0
                self.hits += 1
                return expected
            self.misses += 1
            value = model_value(key, 0)
            self._make_room(key, value)
            self.model[key] = value
            return value

        def _check_read(self, key: int, got: bytes) -> None:
            was_stored = key in self.model
            maybe = key in self.maybe_purged
            expected = self._expect_read(key)
            if maybe:
                self.maybe_purged.discard(key)
                if got == expected and self.cache.stats().reloads == self.reloads:
                    self.hits += 1
                else:
                    assert got == model_value(key, 0)
                    self.reloads += 1
                    self.model[key] = got
            else:
                assert was_stored or got == expected
                assert got == expected, (key, len(got), len(expected))

        @rule(key=MODEL_KEYS)
        def read(self, key: int) -> None:
            note(f"cache[{key}]")
            self._check_read(key, self.cache[key])

        @rule(key=MODEL_KEYS)
        def borrow(self, key: int) -> None:
            note(f"borrow({key})")
            with self.cache.borrow(key) as view:
                got = bytes(view)
                self.cache.purge()
                assert bytes(view) == got
            self._check_read(key, got)
            self.maybe_purged |= {stored for stored, value in self.model.items()
                                  if value and stored != key}

        @rule(key=MODEL_KEYS, version=st.integers(1, 3))
        def store(self, key: int, version: int) -> None:
            note(f"cache[{key}] = version {version}")
            value = model_value(key, version)
            self.cache[key] = value
            self._make_room(key, value)
            self.model[key] = value
            self.maybe_purged.discard(key)

        @rule(key=MODEL_KEYS)
        def pop(self, key: int) -> None:
            note(f"pop({key})")
            got = self.cache.pop(key, None)
            if key not in self.model:
                assert got is None
                return
            expected = self.model.pop(key)
            if key in self.maybe_purged:
                self.maybe_purged.discard(key)
                assert got in (expected, model_value(key, 0))
                if got != expected or self.cache.stats().reloads != self.reloads:
                    self.reloads += 1
            else:
                assert got == expected

        @rule(key=MODEL_KEYS)
        def delete(self, key: int) -> None:
            note(f"del cache[{key}]")
            if key in self.model:
                del self.cache[key]
                del self.model[key]
                self.maybe_purged.discard(key)
            else:
                try:
                    del self.cache[key]
                except KeyError:
                    pass
                else:
                    raise AssertionError(f"deleted {key}, which is not stored")

        @rule()
        def purge(self) -> None:
            note("purge()")
            self.cache.purge()
            self.maybe_purged |= {key for key, value in self.model.items() if value}

        @precondition(lambda self: kernel_reclaims(backend))
        @rule()
        def kernel_purge(self) -> None:
            note("page_out")
            page_out(self.cache.region)
            self.maybe_purged |= {key for key, value in self.model.items() if value}

        @rule()
        def clear(self) -> None:
            note("clear()")
            self.cache.clear()
            self.model.clear()
            self.maybe_purged.clear()

        @invariant()
        def matches_the_model(self) -> None:
            assert self.cache.keys() == list(self.model)
            assert len(self.cache) == len(self.model)
            stats = self.cache.stats()
            assert (stats.hits, stats.misses, stats.reloads, stats.evictions) == \
                (self.hits, self.misses, self.reloads, self.evictions)
            assert stats.bytes == sum(len(value) for value in self.model.values())
            assert stats.pinned_items == 0
            assert self.loads == self.misses + self.reloads
            # No chunk leaks: each is free or held by exactly one stored item.
            chunks = self.cache.capacity // self.cache.chunk_size
            assert self.cache._allocator.free_chunks + self.cache._stored_chunks == chunks
            assert all(key in self.cache for key in self.model)

    return CacheMachine


@pytest.mark.forked
@pytest.mark.hang_timeout(180)
def test_the_cache_matches_a_model(backend: str) -> None:
    run_state_machine_as_test(build_machine(backend), settings=SETTINGS)


