"""Resource leaks: 10,000 regions made, used and given back leave the process as they found it.

Each cycle makes a region (a Python regenerator, ``Zeros`` or ``File`` in turn), touches a few
pages, marks it volatile, purges it and reads a purged page back (a refill), then gives it back:
by ``close()``, or by dropping the last reference with the cycle collector disabled (reference
counting alone must free a region). After a warm-up (the uffd handler and its workers, the sigbus
trap descriptor and handler, the allocator's arenas), the process's descriptors, mappings, threads
and resident memory must stay flat. Isolated sources, which start a helper process each, are made
and dropped 20 times: no helper, descriptor or mapping may stay behind. The paths that end in an
error or take a detour (a failing regenerator, close() refused while exported, system calls on
purged pages) are cycled 1,500 times and must stay flat too.
"""

from __future__ import annotations

import gc
import logging
import os
import tempfile
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest
from conftest import CHUNK, PAGE, dropped_open, has_trait, helper_processes, pattern

import vrange
from vrange import sources

# Each backend in a child of its own: the measurements see only this test's process, and the
# sigbus backend's process-wide state (handler, trap descriptor, monitor thread) starts fresh.
pytestmark = [pytest.mark.forked, pytest.mark.hang_timeout(300)]

CYCLES = 10_000  # 5 to 8 s per backend and way on 2 CPUs (0.5 to 0.8 ms a cycle)
WARM_UP = 300
SIZE = 4 * CHUNK
TOUCHED = (0, CHUNK + 5, 2 * CHUNK + PAGE)  # three chunks of four
MIB = 1 << 20
# Growth allowed over CYCLES cycles. Descriptors and threads: none. Mappings: 2, for the interpreter's
# own allocator, which maps and unmaps arenas as objects come and go. Resident memory: 2 MiB, for the
# same allocator and numpy's caches (measured on every backend, both ways, 2 CPUs: 0 mappings and
# 0 KiB; descriptors and threads 0). A region leaked per cycle would be 10,000 mappings (and as many
# descriptors on the memfd trap); 210 bytes leaked per cycle, 2 MiB: the bounds catch a leaked
# Region object, a regenerator or a cffi handle, not only a leaked mapping.
MAX_GROWTH = {"fds": 0, "maps": 2, "tasks": 0, "python_threads": 0, "rss": 2 * MIB}
# The uffd backend's pool of worker threads (for faults it serves off the faulting thread: Isolated
# sources, syscalls) grows on demand and never shrinks, up to 16: a worker still finishing its last
# job when the next one is queued makes a new one. Those threads (two mappings each, a stack and
# its guard page) are allowed; anything more is not.
UFFD_MAX_WORKERS = 16


def assert_flat(backend: str, growth: dict[str, int], cycles: int, before: Usage,
                after: Usage) -> None:
    limits = dict(MAX_GROWTH)
    if has_trait(backend, "uffd_handler") and 0 < growth["tasks"] <= UFFD_MAX_WORKERS:
        limits["tasks"] = growth["tasks"]
        limits["maps"] += 2 * growth["tasks"]
    assert all(growth[name] <= limit for name, limit in limits.items()), \
        f"grew over {cycles} cycles: {growth} (limits {limits}); before {before}, after {after}"


@dataclass(frozen=True)
class Usage:
    fds: int
    maps: int
    tasks: int
    python_threads: int
    rss: int

    @staticmethod
    def now() -> Usage:
        with open("/proc/self/maps") as maps:
            map_count = sum(1 for _ in maps)
        with open("/proc/self/status") as status:
            rss = next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmRSS:"))
        return Usage(fds=len(os.listdir("/proc/self/fd")), maps=map_count,
                     tasks=len(os.listdir("/proc/self/task")),
                     python_threads=threading.active_count(), rss=rss)

    def growth_since(self, before: Usage) -> dict[str, int]:
        return {name: getattr(self, name) - getattr(before, name) for name in MAX_GROWTH}


def settled_usage(before: Usage) -> Usage:
    """Usage now, after threads that were ending (a monitor stopping once its last region went)
    are gone: waits up to 2 s while there are more than before."""
    deadline = time.monotonic() + 2
    usage = Usage.now()
    while usage.tasks > before.tasks and time.monotonic() < deadline:
        time.sleep(0.01)
        usage = Usage.now()
    return usage


@pytest.fixture
def source_file() -> Iterator[str]:
    with tempfile.NamedTemporaryFile(prefix="vrange-leaks-") as file:
        file.write(pattern(0, SIZE))
        file.flush()
        yield file.name


class Fill:
    """A Python regenerator, a new one per region: each must be freed with its region."""

    def __call__(self, offset: int, buf: memoryview) -> None:
        buf[:] = pattern(offset, len(buf))


def cycles(backend: str, path: str, count: int, give_back: Callable[[vrange.Region], None],
           regenerators: weakref.WeakSet[object]) -> None:
    expected = pattern(2 * CHUNK, PAGE)
    for cycle in range(count):
        kind = cycle % 3
        if kind == 0:
            regenerate: object = Fill()
            regenerators.add(regenerate)
        elif kind == 1:
            regenerate = sources.Zeros()
        else:
            regenerate = sources.File(path)
        region = vrange.Region(SIZE, regenerate, backend=backend)  # type: ignore[arg-type]
        del regenerate
        for offset in TOUCHED:
            region[offset]
        region.mark_volatile()
        assert region.purge() == len(TOUCHED) * CHUNK
        page = region[2 * CHUNK:2 * CHUNK + PAGE]  # a refill
        assert page == (bytes(PAGE) if kind == 1 else expected)
        if give_back is drop:
            with dropped_open():
                del region
        else:
            give_back(region)
            del region


def close(region: vrange.Region) -> None:
    region.close()


def drop(region: vrange.Region) -> None:
    pass  # the caller's `del` drops the last reference


def live_regions() -> int:
    return sum(1 for thing in gc.get_objects() if isinstance(thing, vrange.Region))


@pytest.mark.parametrize("give_back", [close, drop], ids=["close", "del"])
def test_regions_leave_nothing_behind(backend: str, source_file: str,
                                      give_back: Callable[[vrange.Region], None]) -> None:
    regenerators: weakref.WeakSet[object] = weakref.WeakSet()
    if give_back is drop:
        gc.collect()
        gc.disable()  # nothing but reference counting may free the regions
    try:
        cycles(backend, source_file, WARM_UP, give_back, regenerators)
        before = Usage.now()
        started = time.monotonic()
        cycles(backend, source_file, CYCLES, give_back, regenerators)
        elapsed = time.monotonic() - started
        after = settled_usage(before)
        # Checked with the collector still off: whatever is alive now was kept by a reference.
        assert live_regions() == 0, "a region outlived its last reference"
        assert len(regenerators) == 0, "a regenerator outlived its region"
    finally:
        gc.enable()
    growth = after.growth_since(before)
    print(f"{backend}, {give_back.__name__}: {CYCLES} cycles in {elapsed:.1f} s, growth {growth}, "
          f"now {after}")
    assert_flat(backend, growth, CYCLES, before, after)


ISOLATED_CYCLES = 20  # each starts a helper process (a Python interpreter): 0.1 to 0.3 s


def test_isolated_sources_leave_nothing_behind(backend: str) -> None:
    """An Isolated source holds the most: a helper process, a shared memfd, a socket per slot.
    Dropping the source (with its region) ends the helper and closes all of it."""

    def cycle() -> None:
        source = sources.Isolated("isolated_regenerators:filled", 0x33)
        with vrange.Region(SIZE, source, backend=backend) as region:
            region[0]
            region.mark_volatile()
            assert region.purge() == CHUNK
            assert region[0:PAGE] == b"\x33" * PAGE  # a refill
        assert len(helper_processes()) == 1

    cycle()
    before = Usage.now()
    for _ in range(ISOLATED_CYCLES):
        cycle()
        assert helper_processes() == [], "a helper outlived its source (or was not waited for)"
    after = settled_usage(before)
    growth = after.growth_since(before)
    print(f"{backend}, Isolated: {ISOLATED_CYCLES} cycles, growth {growth}, now {after}")
    assert_flat(backend, growth, ISOLATED_CYCLES, before, after)


FAILURE_CYCLES = 1_500  # 1 to 2 ms a cycle


class Failing:
    """A Python regenerator whose chunk 1 fails: a new one per region, freed with it."""

    def __call__(self, offset: int, buf: memoryview) -> None:
        if offset == CHUNK:
            raise KeyError("the tile store is gone")
        buf[:] = pattern(offset, len(buf))


def _refused_pin(region: vrange.Region) -> None:
    with pytest.raises(vrange.RegenerationError):
        region.mark_nonvolatile()  # the exception (and its frames) die with this call


def failure_cycles(backend: str, count: int, regenerators: weakref.WeakSet[object]) -> None:
    """The ways a region is used that end in an error or take another path than a plain access:
    a failing regenerator (RegenerationError, then on_error="zeros" on raw access), close() refused
    while a memoryview exports the region, and system calls on purged pages (vrange.io: a worker on
    the uffd backend, EFAULT and a retry on the sigbus backend)."""
    read_end, write_end = os.pipe()
    try:
        for cycle in range(count):
            failing = Failing()
            regenerators.add(failing)
            kind = cycle % 2
            source: object = failing if kind == 0 else sources.Zeros()
            region = vrange.Region(SIZE, source, backend=backend,  # type: ignore[arg-type]
                                   on_error="zeros")
            del source, failing
            if kind == 0:
                _refused_pin(region)
                assert region[CHUNK:CHUNK + 8] == bytes(8)  # raw access: the policy's zeros
            view = memoryview(region)
            with pytest.raises(BufferError):
                region.close()  # exported: refused, the region stays open
            region.mark_volatile()
            region.purge()
            assert vrange.io.write(write_end, view[2 * CHUNK:2 * CHUNK + PAGE]) == PAGE
            assert os.read(read_end, PAGE) == (pattern(2 * CHUNK, PAGE) if kind == 0 else bytes(PAGE))
            view.release()
            region.close()
            del view, region
    finally:
        os.close(read_end)
        os.close(write_end)


def test_failures_and_refusals_leave_nothing_behind(backend: str) -> None:
    regenerators: weakref.WeakSet[object] = weakref.WeakSet()
    # Each failure is logged with its exception: a capturing handler would keep them all.
    logger = logging.getLogger("vrange")
    logger.disabled = True
    try:
        failure_cycles(backend, WARM_UP, regenerators)
        gc.collect()
        before = Usage.now()
        started = time.monotonic()
        failure_cycles(backend, FAILURE_CYCLES, regenerators)
        elapsed = time.monotonic() - started
        gc.collect()
        after = settled_usage(before)
    finally:
        logger.disabled = False
    assert live_regions() == 0, "a region outlived its last reference"
    assert len(regenerators) == 0, "a regenerator outlived its region"
    growth = after.growth_since(before)
    print(f"{backend}, failures: {FAILURE_CYCLES} cycles in {elapsed:.1f} s, growth {growth}, "
          f"now {after}")
    assert_flat(backend, growth, FAILURE_CYCLES, before, after)
