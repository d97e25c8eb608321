"""vrange.sources.Isolated: regenerators in a helper process keep a faulting operation atomic."""

from __future__ import annotations

import os
import pickle
import sys
import threading
import time

import pytest
from conftest import CHUNK, assert_pages_match, helper_processes, pattern, wait_until

import vrange
from vrange.sources import Isolated

SIZE = 16 * CHUNK


def _count_other_thread_steps(region: vrange.Region, data: bytearray,
                              theirs: bytearray) -> list[int]:
    """Extend ``data`` from each purged chunk of ``region`` while another thread clears and refills
    ``theirs`` (when it is ``data``: the interleaving that corrupted the heap with an in-process
    regenerator); return how
    many steps that other thread made during each extend. The switch interval is raised so that
    the other thread runs only when this one lets the GIL go (it yields voluntarily itself)."""
    steps = [0]
    stop = threading.Event()

    def other_thread() -> None:
        while not stop.is_set():
            steps[0] += 1
            theirs.clear()
            theirs.extend(bytes(CHUNK))
            time.sleep(0)

    saved = sys.getswitchinterval()
    other = threading.Thread(target=other_thread)
    other.start()
    view = memoryview(region)
    during: list[int] = []
    try:
        sys.setswitchinterval(1000.0)
        # Two more steps of the other thread: it has waited for the GIL since, and every wait it
        # begins from now on uses the new interval.
        changed = steps[0]
        wait_until(lambda: steps[0] >= changed + 2, "the other thread stepped twice")
        region.purge()
        for chunk in range(16):
            before = steps[0]
            data.extend(view[chunk * CHUNK:(chunk + 1) * CHUNK])  # faults while holding the GIL
            during.append(steps[0] - before)
    finally:
        sys.setswitchinterval(saved)
        stop.set()
        other.join(timeout=30)
        view.release()
    return during


def test_the_faulting_statement_stays_atomic(backend: str) -> None:
    """The regenerator takes 30 ms and sleeps (it would let the GIL go in-process); with Isolated
    the other thread cannot run until each faulting statement has completed."""
    with vrange.Region(SIZE, Isolated("isolated_regenerators:slow_pattern", 0.03),
                       backend=backend) as region:
        region.mark_volatile()
        data = bytearray()
        assert _count_other_thread_steps(region, data, data) == [0] * 16
        assert region.stats().faults_served >= 16
        assert_pages_match(region, pattern(0, SIZE))


def test_an_in_process_regenerator_that_lets_the_gil_go_is_reported(
        backend: str, caplog: pytest.LogCaptureFixture) -> None:
    """The same with an in-process regenerator that sleeps: the other thread runs inside the
    faulting statement (here harmlessly: it uses its own bytearray), and vrange warns."""
    import vrange._backends._regeneration

    def sleeping(offset: int, buf: memoryview) -> None:
        time.sleep(0.03)
        buf[:] = pattern(offset, len(buf))

    vrange._backends._regeneration._warned_about_other_threads = False
    with vrange.Region(SIZE, sleeping, backend=backend) as region:
        region.mark_volatile()
        during = _count_other_thread_steps(region, bytearray(), bytearray())
    assert any(steps > 0 for steps in during), during
    assert "another Python thread ran while a regenerator ran" in caplog.text
    assert "vrange.sources.Isolated" in caplog.text


def test_every_fault_context_is_served(backend: str) -> None:
    import numpy as np

    with vrange.Region(SIZE, Isolated("isolated_regenerators:slow_pattern", 0.0),
                       backend=backend) as region:
        assert_pages_match(region, pattern(0, SIZE))              # GIL held
        region.mark_volatile()
        region.purge()
        copy = np.empty(SIZE, dtype=np.uint8)
        np.copyto(copy, np.frombuffer(region, dtype=np.uint8))    # GIL released
        assert copy.tobytes() == pattern(0, SIZE)
        region.purge()
        results: list[bytes] = []
        reader = threading.Thread(target=lambda: results.append(bytes(region[CHUNK:3 * CHUNK])))
        reader.start()
        reader.join(timeout=30)                                    # another thread
        assert results == [pattern(CHUNK, 2 * CHUNK)]
        region.purge()
        assert region.mark_nonvolatile() is True                    # a library call


def test_a_raising_regenerator_is_reported_with_its_traceback(backend: str) -> None:
    with vrange.Region(SIZE, Isolated("isolated_regenerators:broken"), backend=backend) as region:
        with pytest.raises(vrange.RegenerationError, match="the tile store is gone"):
            region.prefault(0, CHUNK)
        assert region.stats().regeneration_errors >= 1


def test_a_helper_that_dies_is_replaced(backend: str, tmp_path: "os.PathLike[str]") -> None:
    source = Isolated("isolated_regenerators:dies_once", os.path.join(tmp_path, "died"))
    with vrange.Region(SIZE, source, backend=backend) as region:
        with pytest.raises(vrange.RegenerationError, match="died or did not answer"):
            region.prefault(0, CHUNK)
        region.prefault(0, CHUNK)  # a new helper
        assert source.restarts == 1
        assert_pages_match(region, pattern(0, SIZE))


@pytest.mark.hang_timeout(60)
def test_a_helper_that_hangs_is_killed_and_nothing_hangs(backend: str) -> None:
    source = Isolated("isolated_regenerators:hangs", timeout=0.5)
    with vrange.Region(SIZE, source, backend=backend) as region:
        started = time.monotonic()
        with pytest.raises(vrange.RegenerationError, match="did not answer in time"):
            region.prefault(0, CHUNK)
        assert time.monotonic() - started < 10


@pytest.mark.forked
def test_a_forked_child_gets_a_helper_of_its_own(backend: str) -> None:
    source = Isolated("isolated_regenerators:slow_pattern", 0.0)
    with vrange.Region(SIZE, source, backend=backend) as region:
        region.mark_volatile()
        assert bytes(region[0:8]) == pattern(0, 8)
        [parent_helper] = helper_processes()  # the only child of this (forked) test process
        region.purge()
        pid = os.fork()
        if pid == 0:
            try:
                ok = bytes(region[:]) == pattern(0, SIZE)
                helpers = helper_processes()  # the child's own children
                ok = ok and len(helpers) == 1 and helpers[0] != parent_helper
                os._exit(0 if ok else 1)
            except BaseException:
                os._exit(2)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert bytes(region[:]) == pattern(0, SIZE)  # the parent's helper still serves it


def test_bad_input_is_refused_at_construction() -> None:
    with pytest.raises(ValueError, match="cannot be imported"):
        Isolated(lambda offset, buf: None)
    with pytest.raises(ValueError, match="cannot import"):
        Isolated("no_such_module_here:function")
    with pytest.raises(TypeError, match="package.module:function"):
        Isolated("no_colon")
    with pytest.raises(TypeError, match="picklable"):
        Isolated("isolated_regenerators:broken", threading.Lock())
    with pytest.raises(ValueError, match="timeout"):
        Isolated("isolated_regenerators:broken", timeout=0)
    assert pickle.dumps(1)  # (pickle itself works here)


def test_a_forked_child_and_its_parent_never_see_each_others_bytes(backend: str) -> None:
    """After fork each process has a helper and a shared buffer of its own (sharing the buffer
    handed one process the other's chunks)."""
    source = Isolated("isolated_regenerators:slow_pattern", 0.02)
    with vrange.Region(SIZE, source, backend=backend) as region:
        region.mark_volatile()
        assert bytes(region[0:8]) == pattern(0, 8)
        region.purge()
        pid = os.fork()
        view = memoryview(region)
        chunks = range(1, 16, 2) if pid == 0 else range(2, 16, 2)
        wrong = [chunk for chunk in chunks
                 if bytes(view[chunk * CHUNK:(chunk + 1) * CHUNK]) != pattern(chunk * CHUNK, CHUNK)]
        view.release()
        if pid == 0:
            os._exit(1 if wrong else 0)
        _, status = os.waitpid(pid, 0)
        assert wrong == [] and os.waitstatus_to_exitcode(status) == 0


@pytest.mark.forked  # a fault that times out fails by policy: SIGBUS
@pytest.mark.hang_timeout(60)
def test_concurrent_faults_are_served_at_once_within_their_own_timeout(backend: str) -> None:
    """Eight threads fault at once (GIL released); each answer takes 0.5 s and the timeout is
    2 s: queueing behind the others (4 s in all) must not count against it (nor kill the helper).
    The slack leaves room for a loaded machine."""
    import hashlib

    source = Isolated("isolated_regenerators:slow_pattern", 0.5, timeout=2.0)
    with vrange.Region(SIZE, source, backend=backend) as region:
        assert bytes(region[0:8]) == pattern(0, 8)  # the helper is up
        view = memoryview(region)
        digests: dict[int, bytes] = {}
        barrier = threading.Barrier(8)

        def read(chunk: int) -> None:
            barrier.wait()
            digests[chunk] = hashlib.sha256(view[chunk * CHUNK:(chunk + 1) * CHUNK]).digest()

        threads = [threading.Thread(target=read, args=(chunk,)) for chunk in range(1, 9)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=30)
        view.release()
        assert digests == {chunk: hashlib.sha256(pattern(chunk * CHUNK, CHUNK)).digest()
                           for chunk in range(1, 9)}
        assert source.restarts == 0 and region.stats().regeneration_errors == 0


@pytest.mark.requires("uffd_handler", "(its handler thread must not wait for a helper)")
def test_a_slow_helper_does_not_hold_up_other_regions(backend: str,
                                                      tmp_path: "os.PathLike[str]") -> None:
    """uffd: helpers are waited for on workers, not on the handler thread that serves every
    other fault."""
    started = os.path.join(tmp_path, "started")
    slow = vrange.Region(SIZE, Isolated("isolated_regenerators:announced_slow_pattern", started,
                                        2.0), backend=backend)
    quick = vrange.Region(SIZE, vrange.sources.Zeros(), backend=backend)
    finished: list[str] = []
    try:
        import hashlib

        view = memoryview(slow)
        reader = threading.Thread(target=lambda: (hashlib.sha256(view[0:CHUNK]).digest(),
                                                  finished.append("slow")))
        reader.start()
        # The helper is regenerating the slow region's chunk: its fault is in flight.
        wait_until(lambda: os.path.exists(started), "the helper began the slow chunk", timeout=30)
        assert bytes(quick[CHUNK:CHUNK + 4]) == bytes(4)
        finished.append("quick")
        reader.join(timeout=30)
        view.release()
        assert finished == ["quick", "slow"]
    finally:
        slow.close()
        quick.close()


def test_sources_leave_nothing_behind(backend: str) -> None:
    import gc

    def vrange_mappings() -> int:
        with open("/proc/self/maps") as maps:
            return sum("vrange-isolated" in line for line in maps)

    def descriptors() -> int:
        return len(os.listdir("/proc/self/fd"))

    gc.collect()
    before = (descriptors(), vrange_mappings())
    for _ in range(10):
        with vrange.Region(SIZE, Isolated("isolated_regenerators:slow_pattern", 0.0),
                           backend=backend) as region:
            assert bytes(region[0:4]) == pattern(0, 4)
        del region
        gc.collect()
    assert (descriptors(), vrange_mappings()) == before


@pytest.mark.forked
def test_closing_the_region_and_dropping_the_source_ends_the_helper_at_once(backend: str) -> None:
    """A closed region's native state may be kept a while (the uffd backend retires it until no
    fault job holds it any more); the regenerator must not live on with it: the helper process ends
    when the region is closed and the source dropped, however long that state is kept."""
    import weakref

    source = Isolated("isolated_regenerators:slow_pattern", 0.0)
    region = vrange.Region(SIZE, source, backend=backend)
    region.mark_volatile()
    assert bytes(region[0:8]) == pattern(0, 8)
    [helper] = helper_processes()
    kept = region._core  # what a fault job still in flight at close() keeps alive
    source_ref = weakref.ref(source)
    region.close()
    del region, source
    assert source_ref() is None, "the closed region's native state kept the regenerator alive"
    wait_until(lambda: helper not in helper_processes(), timeout=10,
               what="the helper to end with its closed region and dropped source")
    del kept
