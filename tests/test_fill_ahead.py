"""Fill-ahead: a thread walking forward through missing memory gets the chunks after its fault
filled with the fault (docs/design.md#fill-ahead), on every backend and for every kind of source;
random access never does, the bytes are always the region's, and a failure ahead is left to a real
fault."""

from __future__ import annotations

import os
import random
import tempfile
import threading
import time
from collections.abc import Iterator

import pytest
from conftest import (CHUNK, PAGE, CountingRegenerator, assert_pages_match, pattern,
                      resident_pages, run_python)

import vrange
from vrange import sources
from vrange._backends._memory import touch_pages
from vrange.testing import page_out

CHUNKS = 64
SIZE = CHUNKS * CHUNK


@pytest.fixture(params=["zeros", "file", "python"])
def source(request: pytest.FixtureRequest) -> Iterator[tuple[object, bytes]]:
    """A regenerator of each kind, and the region's bytes it defines."""
    if request.param == "zeros":
        yield sources.Zeros(), bytes(SIZE)
    elif request.param == "python":
        yield CountingRegenerator(), pattern(0, SIZE)
    else:
        with tempfile.NamedTemporaryFile() as backing:
            backing.write(pattern(0, SIZE))
            backing.flush()
            yield sources.File(backing.name), pattern(0, SIZE)


def walk(region: vrange.Region, chunks: list[int]) -> None:
    """Write-free reads of one byte per page of each chunk, in this order, from C (GIL released)."""
    for chunk in chunks:
        touch_pages(region.address + chunk * CHUNK, CHUNK, PAGE, False)


def test_a_forward_walk_fills_ahead_and_every_byte_is_right(
        backend: str, source: tuple[object, bytes]) -> None:
    regenerate, expected = source
    with vrange.Region(SIZE, regenerate, backend=backend) as region:  # type: ignore[arg-type]
        walk(region, list(range(CHUNKS)))
        stats = region.stats()
        assert stats.chunks_filled_ahead > CHUNKS // 2, stats
        # Every chunk was served once, by a fault or ahead of one, and none twice.
        assert stats.faults_served == CHUNKS
        assert stats.bytes_regenerated == SIZE
        if isinstance(regenerate, CountingRegenerator):
            assert regenerate.calls == {chunk * CHUNK: 1 for chunk in range(CHUNKS)}
        assert_pages_match(region, expected)


def test_random_access_never_fills_ahead(backend: str, regenerator: CountingRegenerator) -> None:
    order = list(range(0, CHUNKS, 2)) + list(range(1, CHUNKS, 2))
    random.Random(7).shuffle(order)
    order = [chunk for index, chunk in enumerate(order)
             if index == 0 or chunk != order[index - 1] + 1]  # never the next chunk
    with vrange.Region(SIZE, regenerator, backend=backend) as region:
        walk(region, order)
        stats = region.stats()
        assert stats.chunks_filled_ahead == 0
        assert stats.faults_served == len(order)
        assert set(regenerator.calls) == {chunk * CHUNK for chunk in order}


def test_the_first_faults_of_a_walk_fill_nothing_ahead(backend: str,
                                                        regenerator: CountingRegenerator) -> None:
    with vrange.Region(SIZE, regenerator, backend=backend) as region:
        walk(region, [0, 1, 2])
        assert region.stats().chunks_filled_ahead == 0
        assert sorted(regenerator.calls) == [0, CHUNK, 2 * CHUNK]
        assert sum(resident_pages(region)) == 3 * CHUNK // PAGE


def test_fill_ahead_keeps_what_the_program_wrote(backend: str,
                                                 regenerator: CountingRegenerator) -> None:
    with vrange.Region(SIZE, regenerator, backend=backend) as region:
        region[20 * CHUNK:21 * CHUNK] = b"\x01" * CHUNK  # a whole chunk written first
        region[30 * CHUNK + PAGE:30 * CHUNK + 2 * PAGE] = b"\x02" * PAGE  # one page of a chunk
        walk(region, list(range(CHUNKS)))
        assert region.stats().chunks_filled_ahead > 0
        assert region[20 * CHUNK:21 * CHUNK] == b"\x01" * CHUNK
        assert region[30 * CHUNK + PAGE:30 * CHUNK + 2 * PAGE] == b"\x02" * PAGE
        assert_pages_match(region, pattern(30 * CHUNK, PAGE), 30 * CHUNK)
        assert_pages_match(region, pattern(31 * CHUNK, 33 * CHUNK), 31 * CHUNK)


@pytest.mark.requires("kernel_reclaims")
def test_chunks_filled_ahead_stay_volatile(backend: str, regenerator: CountingRegenerator) -> None:
    with vrange.Region(SIZE, regenerator, backend=backend) as region:
        region.mark_volatile()
        walk(region, list(range(CHUNKS)))
        assert region.purge() == SIZE  # every chunk discarded
        before = region.stats()
        walk(region, list(range(CHUNKS)))  # refilled, most of them ahead of a fault
        after = region.stats()
        assert after.chunks_filled_ahead > before.chunks_filled_ahead
        assert after.volatile_refills - before.volatile_refills == CHUNKS
        page_out(region)  # still the kernel's to take: nothing was pinned by the refills
        assert region.stats().purged_bytes > SIZE // 2
        assert_pages_match(region, pattern(0, SIZE))


class FailsOnceAt:
    """A regenerator whose first call for one chunk raises."""

    def __init__(self, failing_chunk: int) -> None:
        self.failing_offset = failing_chunk * CHUNK
        self.failed = False
        self.calls: list[int] = []
        self.lock = threading.Lock()

    def __call__(self, offset: int, buf: memoryview) -> None:
        with self.lock:
            self.calls.append(offset)
            fail = offset == self.failing_offset and not self.failed
            self.failed = self.failed or fail
        if fail:
            raise RuntimeError("a failure ahead of the walk")
        buf[:] = pattern(offset, len(buf))


def test_a_failure_ahead_is_left_to_a_real_fault(backend: str) -> None:
    regenerate = FailsOnceAt(failing_chunk=6)  # filled ahead: the walk fills ahead from chunk 4
    with vrange.Region(SIZE, regenerate, backend=backend) as region:
        walk(region, list(range(CHUNKS)))
        assert regenerate.failed
        # Called twice: ahead (it failed, the chunk stayed missing), then for the walk's own fault.
        assert regenerate.calls.count(6 * CHUNK) == 2
        assert [offset for offset, _ in region.regeneration_failures] == [6 * CHUNK]
        assert_pages_match(region, pattern(0, SIZE))


def test_fill_ahead_and_spinning_can_be_turned_off(backend: str) -> None:
    code = f"""
        import vrange
        from vrange._backends._memory import touch_pages
        with vrange.Region({SIZE}, vrange.sources.Zeros(), backend={backend!r}) as region:
            for chunk in range({CHUNKS}):
                touch_pages(region.address + chunk * {CHUNK}, {CHUNK}, {PAGE}, False)
            stats = region.stats()
            print(stats.chunks_filled_ahead, stats.faults_served, bytes(region) == bytes({SIZE}))
    """
    result = run_python(code, env={"VRANGE_FILL_AHEAD_KIB": "0", "VRANGE_UFFD_SPIN_US": "0"})
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["0", str(CHUNKS), "True"]


# --- the uffd backend's routes ----------------------------------------------------------------------


@pytest.mark.requires("fault_signal")
def test_a_thread_without_the_gil_is_served_on_itself(backend: str,
                                                      regenerator: CountingRegenerator) -> None:
    """A C loop that let the GIL go takes it in the fault signal's handler, rather than waiting for
    a worker."""
    with vrange.Region(SIZE, regenerator, backend=backend) as region:
        walk(region, [0, 5, 10])  # no forward walk: three faults
        stats = region.stats()
        assert (stats.faults_on_faulting_thread, stats.faults_on_worker_thread) == (3, 0)
        assert_pages_match(region, pattern(0, CHUNK))


def proc_task_descriptors(pid: int | str = "self") -> list[str]:
    """This process's descriptors open on /proc/*/task/* files."""
    found = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except FileNotFoundError:
            continue
        if "/task/" in target:
            found.append(target)
    return found


@pytest.mark.forked
@pytest.mark.requires("fault_signal")
def test_many_short_lived_faulting_threads_are_served_with_few_descriptors(
        backend: str, regenerator: CountingRegenerator) -> None:
    """The handler keeps the /proc files of the last few faulting threads open: thread ids that end
    and are reused read right, and the descriptors stay bounded; a forked child closes them."""
    with vrange.Region(4 * SIZE, regenerator, backend=backend) as region:
        view = memoryview(region)
        results: list[bool] = []

        def read_one(chunk: int) -> None:  # holds the GIL at its fault: served in its signal handler
            results.append(bytes(view[chunk * CHUNK:chunk * CHUNK + PAGE]) ==
                           pattern(chunk * CHUNK, PAGE))

        for chunk in range(0, 4 * CHUNKS, 2):
            thread = threading.Thread(target=read_one, args=(chunk,))
            thread.start()
            thread.join()
        assert results == [True] * (2 * CHUNKS)
        assert region.stats().faults_on_faulting_thread == 2 * CHUNKS
        assert 0 < len(proc_task_descriptors()) <= 3 * 8
        read_fd, write_fd = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: the parent's threads' files are not its own
            os.write(write_fd, str(len(proc_task_descriptors())).encode())
            os._exit(0)
        os.close(write_fd)
        child_count = os.read(read_fd, 16)
        os.waitpid(pid, 0)
        os.close(read_fd)
        view.release()
    assert child_count == b"0"


def test_fill_ahead_can_be_turned_off_for_one_region(backend: str,
                                                     regenerator: CountingRegenerator) -> None:
    with vrange.Region(SIZE, regenerator, backend=backend, fill_ahead=False) as region, \
            vrange.Region(SIZE, sources.Zeros(), backend=backend) as other:
        assert (region.fill_ahead, other.fill_ahead) == (False, True)
        walk(region, list(range(CHUNKS)))
        walk(other, list(range(CHUNKS)))
        assert region.stats().chunks_filled_ahead == 0
        assert region.stats().faults_served == CHUNKS
        assert other.stats().chunks_filled_ahead > 0
        assert regenerator.calls == {chunk * CHUNK: 1 for chunk in range(CHUNKS)}
        assert_pages_match(region, pattern(0, SIZE))


@pytest.mark.parametrize("value", [0, 1, None, "no"])
def test_fill_ahead_must_be_a_bool(backend: str, value: object) -> None:
    with pytest.raises(TypeError, match="fill_ahead must be True or False"):
        vrange.Region(SIZE, sources.Zeros(), backend=backend, fill_ahead=value)  # type: ignore[arg-type]


@pytest.mark.parametrize("call", ["prefault", "mark_nonvolatile"])
def test_a_library_call_regenerates_its_range_and_nothing_after_it(
        backend: str, regenerator: CountingRegenerator, call: str) -> None:
    """mark_nonvolatile and prefault walk their range forward (a walk that fills ahead), but never
    past its end."""
    with vrange.Region(SIZE, regenerator, backend=backend) as region:
        region.mark_volatile()
        assert region.purge() == 0  # nothing was ever filled: every chunk is missing
        getattr(region, call)(4 * CHUNK, 20 * CHUNK)
        assert sorted(regenerator.calls) == [chunk * CHUNK for chunk in range(4, 24)]
        present = resident_pages(region)
        assert [index for index, page in enumerate(present) if page] == \
            list(range(4 * CHUNK // PAGE, 24 * CHUNK // PAGE))
        # Afterwards, a walk of the rest fills ahead again, up to the region's end.
        walk(region, list(range(24, CHUNKS)))
        assert region.stats().chunks_filled_ahead > 0
        assert_pages_match(region, pattern(0, SIZE))


@pytest.mark.requires("uffd_handler")
def test_a_late_worker_fills_nothing_ahead_after_a_purge(backend: str) -> None:
    """Faults inside a system call go to workers, which may run after the call returned: a worker
    that gets to its fill-ahead after vrange purged the region fills nothing (the walk it saw is
    gone), so a purge that returned stays purged."""
    for _ in range(20):
        regenerator = CountingRegenerator()
        with vrange.Region(16 * CHUNK, regenerator, backend=backend) as region:
            region.mark_nonvolatile()  # MADV_POPULATE_WRITE: every fault goes to a worker
            region.mark_volatile()
            assert region.purge() == 16 * CHUNK
            calls = regenerator.total
            time.sleep(0.02)  # a late worker would have filled chunks ahead by now
            assert region.stats().resident_bytes == 0
            assert regenerator.total == calls
