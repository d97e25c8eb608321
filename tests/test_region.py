"""The Region API, one suite for every backend: the backends must be interchangeable."""

from __future__ import annotations

import errno
import mmap
import os
import signal
import socket
import subprocess
import tempfile
import textwrap
import threading
import time
from collections.abc import Callable

import numpy as np
import pytest
from conftest import (CHUNK, PAGE, CountingRegenerator, assert_pages_match, backend_name,
                      dropped_open, kernel_reclaims, pattern, python_command, raw_failure_signal,
                      resident_pages, run_python as run_python_in, syscalls_are_served,
                      threads_waiting_in_userfault, wait_until)

import vrange
from vrange import sources
from vrange._native import lib  # the chunk-state bits: test_a_pin_racing_a_refill_...
from vrange.testing import page_out

SIZE = 16 * CHUNK  # 1 MiB


@pytest.fixture
def discard(request: pytest.FixtureRequest, backend: str) -> Callable[[vrange.Region], None]:
    """Make a whole region purged: by ``purge()``, or by the kernel (MADV_PAGEOUT, on the backends
    the kernel reclaims; conftest makes only the combinations that exist)."""

    def discard_all(region: vrange.Region) -> None:
        region.mark_nonvolatile()
        region.mark_volatile()
        if request.param == "purge":
            assert region.purge() == len(region)
        else:
            page_out(region)
        assert region.stats().purged_bytes > len(region) // 2, "nothing was discarded"

    return discard_all


def make(backend: str, regenerate: vrange.sources.Source | CountingRegenerator | object,
         size: int = SIZE, **options: object) -> vrange.Region:
    return vrange.Region(size, regenerate, backend=backend, **options)  # type: ignore[arg-type]


# --- construction and bad input ------------------------------------------------------------------


def test_size_is_rounded_up_to_pages(backend: str, regenerator: CountingRegenerator) -> None:
    with make(backend, regenerator, size=1) as region:
        assert len(region) == PAGE
        assert region.backend == backend_name(backend)
        assert region.chunk_size == vrange.DEFAULT_CHUNK_SIZE == CHUNK
        assert region[0] == pattern(0, 1)[0]


@pytest.mark.parametrize("nbytes, error", [(0, ValueError), (-4096, ValueError),
                                           ("4096", TypeError), (4096.0, TypeError),
                                           (True, TypeError)])
def test_bad_sizes(backend: str, nbytes: object, error: type[Exception]) -> None:
    with pytest.raises(error, match="nbytes"):
        vrange.Region(nbytes, sources.Zeros(), backend=backend)  # type: ignore[arg-type]


@pytest.mark.parametrize("chunk_size", [0, 1000, 3 * PAGE, PAGE // 2, -PAGE, "64k", 1 << 31, 1 << 36])
def test_bad_chunk_sizes(backend: str, chunk_size: object) -> None:
    with pytest.raises(ValueError, match="chunk_size"):
        vrange.Region(SIZE, sources.Zeros(), backend=backend, chunk_size=chunk_size)  # type: ignore[arg-type]


def test_bad_regenerator_backend_and_policy(backend: str) -> None:
    with pytest.raises(TypeError, match="regenerate must be"):
        vrange.Region(SIZE, 42, backend=backend)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown backend 'nope'"):
        vrange.Region(SIZE, sources.Zeros(), backend="nope")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="on_error"):
        vrange.Region(SIZE, sources.Zeros(), backend=backend, on_error="ignore")  # type: ignore[arg-type]


def test_environment_variable_chooses_the_default_backend(
        backend: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VRANGE_BACKEND", backend)
    with vrange.Region(SIZE, sources.Zeros()) as region:
        assert region.backend == backend_name(backend)
        assert region.trap == (backend.partition(":")[2] or None)
    monkeypatch.setenv("VRANGE_BACKEND", "bogus")
    with pytest.raises(ValueError, match=r"unknown backend 'bogus' \(from \$VRANGE_BACKEND\)"):
        vrange.Region(SIZE, sources.Zeros())


@pytest.mark.parametrize("offset, length, error", [
    (1, PAGE, ValueError), (0, 1, ValueError), (-PAGE, PAGE, ValueError),
    (SIZE, PAGE, ValueError), (0, SIZE + PAGE, ValueError), (0.0, PAGE, TypeError),
])
def test_bad_ranges(backend: str, offset: object, length: object, error: type[Exception]) -> None:
    with make(backend, sources.Zeros()) as region:
        for method in (region.mark_volatile, region.mark_nonvolatile, region.purge):
            with pytest.raises(error):
                method(offset, length)  # type: ignore[arg-type]


# --- content -----------------------------------------------------------------------------------------


def test_first_access_materializes_without_counting_a_purge(
        backend: str, regenerator: CountingRegenerator) -> None:
    with make(backend, regenerator) as region:
        assert_pages_match(region, pattern(0, SIZE))
        assert region.mark_nonvolatile() is False
        stats = region.stats()
        assert stats.faults_served == 16
        assert stats.bytes_regenerated == SIZE
        assert stats.purges == 0
        assert stats.resident_bytes == SIZE
        assert stats.nonvolatile_bytes == SIZE and stats.volatile_bytes == 0
        assert sorted(regenerator.calls) == list(range(0, SIZE, CHUNK))


def test_region_tail_chunk_is_shorter(backend: str) -> None:
    lengths = []

    def regenerate(offset: int, buf: memoryview) -> None:
        lengths.append((offset, len(buf)))
        buf[:] = pattern(offset, len(buf))

    size = CHUNK + 3 * PAGE
    with make(backend, regenerate, size=size) as region:
        assert region.mark_nonvolatile() is False
        assert sorted(lengths) == [(0, CHUNK), (CHUNK, 3 * PAGE)]
        assert_pages_match(region, pattern(0, size))


def test_gil_held_access_after_discard(backend: str, regenerator: CountingRegenerator,
                                      discard: Callable[[vrange.Region], None]) -> None:
    with make(backend, regenerator) as region:
        discard(region)
        before = region.stats()
        assert_pages_match(region, pattern(0, SIZE))  # (a) Python code holding the GIL
        after = region.stats()
        assert after.faults_on_faulting_thread > before.faults_on_faulting_thread
        assert after.faults_on_worker_thread == before.faults_on_worker_thread
        assert region.mark_nonvolatile() is True


def test_explicit_purge_then_gil_held_access(backend: str, regenerator: CountingRegenerator) -> None:
    with make(backend, regenerator) as region:
        region.mark_nonvolatile()
        region.mark_volatile()
        assert region.purge() == SIZE
        stats = region.stats()
        assert stats.purges == 16 and stats.resident_bytes == 0 and stats.purged_bytes == SIZE
        assert stats.purges_by_reason == {"explicit": 16, "pressure": 0, "budget": 0, "kernel": 0}
        assert stats.bytes_purged_by_reason["explicit"] == SIZE
        assert stats.volatile_bytes == SIZE
        # (a) Python code holding the GIL reads the purged pages.
        assert_pages_match(region, pattern(0, SIZE))
        assert regenerator.calls[0] == 2
        assert region.mark_nonvolatile() is True
        assert region.mark_nonvolatile() is False  # nothing purged since


@pytest.mark.requires("kernel_reclaims", "(it makes the kernel discard pages)")
def test_kernel_discard_is_reported_and_refilled(backend: str, regenerator: CountingRegenerator) -> None:
    with make(backend, regenerator) as region:
        region.mark_nonvolatile()
        region.mark_volatile()
        page_out(region)  # the kernel reclaims the lazy-free pages, as under memory pressure
        assert region.stats().purged_bytes > SIZE // 2
        purged = region.mark_nonvolatile(report=True)
        assert purged, "MADV_PAGEOUT discarded nothing"
        assert all(offset % CHUNK == 0 and length % CHUNK == 0 for offset, length in purged)
        assert_pages_match(region, pattern(0, SIZE))
        assert region.stats().purges >= len(purged)


@pytest.mark.requires("kernel_reclaims", "(it makes the kernel discard pages)")
def test_refilled_chunks_stay_reclaimable_while_volatile(
        backend: str, regenerator: CountingRegenerator) -> None:
    """Marked volatile once: every refill is lazy-free again, so the kernel can take it back again."""
    with make(backend, regenerator) as region:
        region.mark_volatile()
        chunks = SIZE // CHUNK
        expected_refills = expected_purges = 0
        discarded = chunks  # the first round fills every chunk
        for round_number in range(3):
            assert_pages_match(region, pattern(0, SIZE))  # first touch, then refills
            stats = region.stats()
            assert stats.resident_bytes == SIZE
            # Every chunk the last page_out took came back through the regenerator, and was made
            # lazy-free again (counted): the kernel may keep a few pages of a page_out (a page
            # still in another CPU's LRU batch when it was marked), never most of them.
            expected_refills += discarded
            assert stats.volatile_refills >= expected_refills, f"round {round_number}"
            if round_number:
                expected_purges += discarded
            page_out(region)  # as memory pressure would
            assert region.stats().resident_bytes <= SIZE // 4, f"round {round_number}: kept"
            resident = resident_pages(region)
            discarded = sum(not any(resident[chunk * (CHUNK // PAGE):(chunk + 1) * (CHUNK // PAGE)])
                            for chunk in range(chunks))
        stats = region.stats()
        assert stats.purges >= expected_purges >= 3 * chunks // 2  # each discard found counts
        assert stats.purges_by_reason["kernel"] == stats.purges
        assert stats.purges_by_reason["explicit"] == stats.bytes_purged_by_reason["explicit"] == 0
        # Pinned: refilled and dirty, so the kernel keeps it whatever the pressure.
        assert region.mark_nonvolatile() is True
        refills = region.stats().volatile_refills
        page_out(region)
        assert region.stats().resident_bytes == SIZE
        assert region.stats().volatile_refills == refills
        assert_pages_match(region, pattern(0, SIZE))


@pytest.mark.requires("kernel_reclaims", "(it makes the kernel discard pages)")
def test_a_pin_racing_a_refill_is_never_left_reclaimable(backend: str) -> None:
    """mark_nonvolatile while a refill of the same volatile chunk is in flight: the refill must not
    make the chunk lazy-free after the pin made it present (a pinned chunk the kernel could take)."""
    holder: list[vrange.Region] = []
    refilling = threading.Event()

    def pinned_meanwhile(offset: int, buf: memoryview) -> None:
        refilling.set()
        # Fill only once the pin has begun on this chunk (it clears VOLATILE first). The chunk
        # states are not public, and this regenerator cannot call its own region's stats().
        core = holder[0]._core
        deadline = time.monotonic() + 10
        while core.chunk_states()[offset // CHUNK] & lib.VR_CHUNK_VOLATILE:
            assert time.monotonic() < deadline, "the pin never began"
            time.sleep(0.001)
        buf[:] = pattern(offset, len(buf))

    with make(backend, pinned_meanwhile, size=4 * CHUNK) as region:
        holder.append(region)
        region.mark_volatile()
        reader = threading.Thread(target=lambda: bytes(region[CHUNK:CHUNK + 8]))
        reader.start()  # faults: the refill waits for the pin
        assert refilling.wait(10), "the reader's fault never reached the regenerator"
        region.mark_nonvolatile(CHUNK, CHUNK)
        reader.join(timeout=30)
        page_out(region, CHUNK, CHUNK)
        assert all(resident_pages(region, CHUNK, CHUNK)), "a pinned chunk was left lazy-free"
        assert bytes(region[CHUNK:2 * CHUNK]) == pattern(CHUNK, CHUNK)
        holder.clear()


def test_a_failed_pin_leaves_the_range_volatile(backend: str) -> None:
    flaky = Flaky(2 * CHUNK)
    with make(backend, flaky) as region:
        region.mark_volatile()
        with pytest.raises(vrange.RegenerationError):
            region.mark_nonvolatile()
        stats = region.stats()
        assert stats.volatile_bytes == SIZE  # nothing changed but the failed chunk, left missing
        assert stats.resident_bytes >= 2 * CHUNK
        assert region.purge() == stats.resident_bytes  # whatever was filled is purgeable
        flaky.fail = False
        region.mark_nonvolatile()
        assert region.stats().nonvolatile_bytes == SIZE


@pytest.mark.requires("kernel_reclaims", "(it makes the kernel discard pages)")
def test_partly_discarded_chunk_is_refilled_and_reported_on_the_uffd_trap(
        backend: str, regenerator: CountingRegenerator) -> None:
    """The kernel discards single pages: the chunk is regenerated whole, only the missing pages are
    filled, and the chunk counts as purged."""
    with make(backend, regenerator) as region:
        region.mark_nonvolatile()
        region.mark_volatile()
        region[CHUNK:CHUNK + 4] = b"mine"   # a write to volatile memory, on the page that stays
        # Region.madvise refuses MADV_DONTNEED; mmap's own method stands in for the kernel here.
        mmap.mmap.madvise(region, mmap.MADV_DONTNEED, CHUNK + 2 * PAGE, 3 * PAGE)  # three pages
        assert region.stats().purged_bytes == 3 * PAGE
        assert bytes(region[CHUNK + 3 * PAGE:CHUNK + 4 * PAGE]) == pattern(CHUNK + 3 * PAGE, PAGE)
        assert bytes(region[CHUNK:CHUNK + 4]) == b"mine"  # present pages are never overwritten
        assert regenerator.calls[CHUNK] == 2
        assert region.mark_nonvolatile(report=True) == [(CHUNK, CHUNK)]


def test_report_lists_merged_purged_ranges(backend: str, regenerator: CountingRegenerator) -> None:
    with make(backend, regenerator) as region:
        region.mark_nonvolatile()
        region.mark_volatile()
        region.purge(0, 2 * CHUNK)
        region.purge(5 * CHUNK, CHUNK)
        region.purge(15 * CHUNK, CHUNK)
        assert region.mark_nonvolatile(report=True) == [(0, 2 * CHUNK), (5 * CHUNK, CHUNK),
                                                        (15 * CHUNK, CHUNK)]
        assert region.mark_nonvolatile(report=True) == []
        assert_pages_match(region, pattern(0, SIZE))


def test_writes_are_kept_while_nonvolatile(backend: str, regenerator: CountingRegenerator) -> None:
    with make(backend, regenerator) as region:
        data = os.urandom(3 * CHUNK)
        region[CHUNK:4 * CHUNK] = data
        assert region.purge() == 0  # nothing is volatile: purge skips pinned chunks
        if kernel_reclaims(backend):
            page_out(region)
        assert bytes(region[CHUNK:4 * CHUNK]) == data
        # Volatile elsewhere, pinned here: purge touches only the volatile chunks.
        region.mark_nonvolatile(8 * CHUNK, 8 * CHUNK)  # materialize them first
        region.mark_volatile(8 * CHUNK, 8 * CHUNK)
        assert region.purge() == 8 * CHUNK
        assert bytes(region[CHUNK:4 * CHUNK]) == data
        assert region.mark_nonvolatile(0, 4 * CHUNK) is False


def test_mark_volatile_rounds_inward_to_whole_chunks(backend: str, regenerator: CountingRegenerator) -> None:
    with make(backend, regenerator) as region:
        region.mark_nonvolatile()
        region.mark_volatile(PAGE, 2 * CHUNK)  # covers chunk 1 whole, chunks 0 and 2 in part
        assert region.stats().volatile_bytes == CHUNK
        assert region.purge() == CHUNK
        assert region.mark_nonvolatile(report=True) == [(CHUNK, CHUNK)]


def test_writes_to_volatile_pages_are_lost_on_purge(backend: str, regenerator: CountingRegenerator) -> None:
    with make(backend, regenerator) as region:
        region.mark_volatile()
        region[0:4] = b"mine"
        region.purge()
        assert bytes(region[0:4]) == pattern(0, 4)


def test_gil_released_numpy_access(backend: str, regenerator: CountingRegenerator,
                                  discard: Callable[[vrange.Region], None]) -> None:
    with make(backend, regenerator) as region:
        discard(region)
        source = np.frombuffer(region, dtype=np.uint8)
        destination = np.empty_like(source)
        np.copyto(destination, source)  # a large contiguous copy runs without the GIL
        assert destination.tobytes() == pattern(0, SIZE)
        total = int(np.add(source, 1, dtype=np.uint16).sum())  # inside a ufunc
        assert total == int(np.frombuffer(pattern(0, SIZE), dtype=np.uint8).astype(np.uint64).sum()) + SIZE
        del source


def test_syscalls_on_purged_pages_succeed(backend: str, regenerator: CountingRegenerator,
                                         discard: Callable[[vrange.Region], None]) -> None:
    with make(backend, regenerator) as region:
        discard(region)
        if not syscalls_are_served(backend):
            # The documented difference: the kernel's own copy cannot be served by a signal.
            read_end, write_end = os.pipe()
            view = memoryview(region)
            with pytest.raises(OSError) as caught:
                os.write(write_end, view[0:PAGE])
            view.release()
            os.close(read_end), os.close(write_end)
            assert caught.value.errno == errno.EFAULT
            assert region.stats().resident_bytes == 0  # nothing was served behind our back
            return
        # os.write from the region into a pipe, drained by a thread.
        read_end, write_end = os.pipe()
        received: list[bytes] = []
        drainer = threading.Thread(target=lambda: received.append(
            b"".join(iter(lambda: os.read(read_end, 1 << 16), b""))))
        drainer.start()
        view = memoryview(region)
        written = 0
        while written < 3 * CHUNK:
            written += os.write(write_end, view[written:3 * CHUNK])
        os.close(write_end)
        drainer.join(timeout=30)
        os.close(read_end)
        assert received[0] == pattern(0, 3 * CHUNK)
        # socket.send from the region.
        left, right = socket.socketpair()
        with left, right:
            sent = left.send(view[4 * CHUNK:4 * CHUNK + 8192])
            assert right.recv(65536) == pattern(4 * CHUNK, sent)
        # os.readv and file.readinto *into* purged pages: the kernel's copy lands on them.
        incoming = os.urandom(CHUNK)
        read_end, write_end = os.pipe()
        os.write(write_end, incoming)
        assert os.readv(read_end, [view[6 * CHUNK:7 * CHUNK]]) == CHUNK
        os.close(read_end), os.close(write_end)
        assert bytes(view[6 * CHUNK:7 * CHUNK]) == incoming
        with tempfile.TemporaryFile() as file:
            file.write(incoming[::-1])
            file.seek(0)
            assert file.readinto(view[8 * CHUNK:9 * CHUNK]) == CHUNK
        assert bytes(view[8 * CHUNK:9 * CHUNK]) == incoming[::-1]
        view.release()
        assert region.stats().faults_on_worker_thread >= 4


def test_another_python_thread(backend: str, regenerator: CountingRegenerator,
                               discard: Callable[[vrange.Region], None]) -> None:
    with make(backend, regenerator) as region:
        discard(region)
        results: list[bytes] = []
        thread = threading.Thread(target=lambda: results.append(bytes(region[CHUNK:5 * CHUNK])))
        thread.start()
        thread.join(timeout=30)
        assert results == [pattern(CHUNK, 4 * CHUNK)]


@pytest.mark.requires("syscalls_served", "(its readers fault inside pwrite(2))")
def test_many_threads_faulting_one_chunk_regenerate_it_once(backend: str) -> None:
    regenerator = CountingRegenerator()
    started = threading.Event()

    def slow(offset: int, buf: memoryview) -> None:
        started.wait(10)  # let every thread reach the fault before the first one is served
        regenerator(offset, buf)

    with make(backend, slow) as region, tempfile.TemporaryDirectory() as directory:
        view = memoryview(region)
        barrier = threading.Barrier(8)
        outputs: list[bytes] = []

        def reader(index: int) -> None:
            path = os.path.join(directory, str(index))
            fd = os.open(path, os.O_RDWR | os.O_CREAT)
            barrier.wait()
            os.pwrite(fd, view[2 * CHUNK:3 * CHUNK], 0)  # faults inside the syscall
            outputs.append(os.pread(fd, CHUNK, 0))
            os.close(fd)

        threads = [threading.Thread(target=reader, args=(i,)) for i in range(8)]
        for thread in threads:
            thread.start()
        # Every reader waits in the kernel for the chunk before the first one is served.
        wait_until(lambda: threads_waiting_in_userfault() >= 8, "8 readers wait in the fault")
        started.set()
        for thread in threads:
            thread.join(timeout=30)
        view.release()
        assert len(outputs) == 8
        assert all(output == pattern(2 * CHUNK, CHUNK) for output in outputs)
        assert regenerator.calls == {2 * CHUNK: 1}


@pytest.mark.requires("kernel_reclaims", "(it makes the kernel discard pages)")
def test_partly_present_chunk_keeps_present_pages(backend: str, regenerator: CountingRegenerator) -> None:
    # Page 0 holds the program's write; page 1 alone is dropped. Refilling the chunk must skip
    # page 0 (UFFDIO_COPY answers EEXIST there, which does not wake waiters) and never hang.
    with make(backend, regenerator) as region:
        region[0:PAGE] = b"\xaa" * PAGE
        mmap.mmap.madvise(region, mmap.MADV_DONTNEED, PAGE, PAGE)  # (Region.madvise refuses it)
        assert bytes(region[PAGE:2 * PAGE]) == pattern(PAGE, PAGE)
        assert bytes(region[0:PAGE]) == b"\xaa" * PAGE
        assert bytes(region[2 * PAGE:CHUNK]) == pattern(2 * PAGE, CHUNK - 2 * PAGE)


# --- native sources -----------------------------------------------------------------------------------


def test_zeros_source(backend: str) -> None:
    with make(backend, sources.Zeros()) as region:
        region[0:5] = b"hello"
        region.mark_volatile()
        region.purge()
        assert bytes(region[:]) == bytes(SIZE)
        stats = region.stats()
        # Native sources never need the GIL: uffd serves them on its handler thread, sigbus in
        # the signal handler of the faulting thread; never on a GIL-taking worker.
        served_here = {"uffd": stats.faults_on_handler_thread,
                       "sigbus": stats.faults_on_faulting_thread}[backend_name(backend)]
        assert served_here == stats.faults_served >= 16
        assert stats.faults_on_worker_thread == 0


def test_file_source_from_path_and_fd(backend: str, tmp_path: "os.PathLike[str]") -> None:
    content = os.urandom(SIZE + 5000)
    path = os.path.join(tmp_path, "backing")
    with open(path, "wb") as file:
        file.write(content)
    with make(backend, sources.File(path, offset=5000)) as region:
        assert bytes(region[:]) == content[5000:]
        region.mark_volatile()
        region.purge()
        assert_pages_match(region, content[5000:])
    fd = os.open(path, os.O_RDONLY)
    source = sources.File(fd)
    os.close(fd)  # the source holds its own duplicate
    with make(backend, source, size=SIZE + 2 * PAGE) as region:
        # Past the end of the file, the region reads zeros.
        assert bytes(region[:]) == content + bytes(SIZE + 2 * PAGE - len(content))


def test_file_source_bad_input(tmp_path: "os.PathLike[str]") -> None:
    with pytest.raises(ValueError, match="offset"):
        sources.File(0, offset=-1)
    with pytest.raises(TypeError, match="path_or_fd"):
        sources.File(3.5)  # type: ignore[arg-type]
    with pytest.raises(FileNotFoundError):
        sources.File(os.path.join(tmp_path, "missing"))


# --- regenerator failures ----------------------------------------------------------------------------


class Flaky:
    def __init__(self, failing_offset: int) -> None:
        self.failing_offset = failing_offset
        self.fail = True

    def __call__(self, offset: int, buf: memoryview) -> None:
        if self.fail and offset == self.failing_offset:
            raise KeyError("regenerator lost its source")
        buf[:] = pattern(offset, len(buf))


def test_mark_nonvolatile_raises_and_leaves_failed_chunks_missing(backend: str) -> None:
    flaky = Flaky(3 * CHUNK)
    with make(backend, flaky) as region:
        with pytest.raises(vrange.RegenerationError, match="offset 196608") as caught:
            region.mark_nonvolatile()
        assert isinstance(caught.value.__cause__, KeyError)
        assert not any(resident_pages(region, 3 * CHUNK, CHUNK)), "failed chunk not missing"
        assert region.stats().regeneration_errors >= 1
        assert region.regeneration_failures[-1][0] == 3 * CHUNK
        flaky.fail = False
        assert region.mark_nonvolatile() is False
        assert_pages_match(region, pattern(0, SIZE))


def test_syscall_over_a_failing_chunk_gets_efault(backend: str) -> None:
    flaky = Flaky(0)
    with make(backend, flaky) as region:
        read_end, write_end = os.pipe()
        view = memoryview(region)
        with pytest.raises(OSError) as caught:
            os.write(write_end, view[0:PAGE])
        view.release()
        os.close(read_end), os.close(write_end)
        assert caught.value.errno == errno.EFAULT
        read_end, write_end = os.pipe()
        with pytest.raises(vrange.RegenerationError) as failed:
            vrange.io.write(write_end, memoryview(region)[0:PAGE])
        os.close(read_end), os.close(write_end)
        assert isinstance(failed.value.__cause__, KeyError)
        assert "regenerator lost its source" in str(failed.value)  # the regenerator's traceback
        del failed  # the exception's traceback holds io.write's frame, which holds the view
        flaky.fail = False
        assert region.mark_nonvolatile() is False  # poison cleared and chunk regenerated
        assert bytes(region[0:PAGE]) == pattern(0, PAGE)


def run_python(script: str, backend: str) -> subprocess.CompletedProcess[str]:
    """``script`` in a fresh interpreter, with ``BACKEND`` and ``CHUNK`` defined."""
    return run_python_in(script, backend=backend)


def test_raw_access_to_a_failing_chunk_raises_sigbus_by_default(backend: str) -> None:
    result = run_python("""
        import logging
        logging.basicConfig()  # vrange's logger shows the failure (it has only a NullHandler)
        def broken(offset, buf):
            raise RuntimeError("no source")
        region = vrange.Region(4 * CHUNK, broken, backend=BACKEND)
        print("before", flush=True)
        region[5]
        print("after", flush=True)
    """, backend)
    if raw_failure_signal(vrange.features(), backend) == signal.SIGABRT:  # no UFFDIO_POISON
        assert result.returncode == -signal.SIGABRT
    else:
        assert result.returncode == -signal.SIGBUS, result.stderr
    assert "before" in result.stdout and "after" not in result.stdout
    assert "RuntimeError('no source')" in result.stderr


def test_on_error_abort(backend: str) -> None:
    result = run_python("""
        def broken(offset, buf):
            raise RuntimeError("no source")
        region = vrange.Region(4 * CHUNK, broken, backend=BACKEND, on_error="abort")
        region[5]
    """, backend)
    assert result.returncode == -signal.SIGABRT
    assert "error policy is 'abort'" in result.stderr


def test_on_error_zeros_is_explicit(backend: str) -> None:
    flaky = Flaky(0)
    with make(backend, flaky, on_error="zeros") as region:
        assert bytes(region[0:16]) == bytes(16)
        assert region.stats().regeneration_errors == 1
        assert bytes(region[CHUNK:CHUNK + 16]) == pattern(CHUNK, 16)


def test_interrupts_in_a_regenerator_finish_the_call_and_reach_the_program(backend: str) -> None:
    """KeyboardInterrupt and SystemExit are not regenerator failures: the regeneration is retried,
    nothing is poisoned, and the interrupt is raised at the next safe point after the call."""
    raised = iter([SystemExit(3), KeyboardInterrupt()])

    def regenerate(offset: int, buf: memoryview) -> None:
        error = next(raised, None)
        if error is not None:
            raise error
        buf[:] = pattern(offset, len(buf))

    with make(backend, regenerate) as region:
        with pytest.raises(SystemExit) as caught:
            region.prefault(0, CHUNK)
            sum(range(1000))  # a safe point, should the call itself have had none
        assert caught.value.code == 3
        stats = region.stats()
        assert stats.regeneration_errors == 0 and region.regeneration_failures == []
        assert stats.resident_bytes >= CHUNK  # the chunk was filled, not left missing or poisoned
        assert_pages_match(region, pattern(0, SIZE))
        assert region.mark_nonvolatile() is False


INTERRUPTED_READ = """
    import signal, time
    calls = []
    def regenerate(offset, buf):
        calls.append(offset)
        if len(calls) == 1:                  # the first run is interrupted by the timer
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline:
                pass                         # pure Python, holding the GIL
            raise AssertionError("the timer never fired")
        buf[:] = bytes([offset // CHUNK + 1]) * len(buf)
    region = vrange.Region(4 * CHUNK, regenerate, backend=BACKEND)
    signal.signal(signal.SIGALRM, HANDLER)
    signal.setitimer(signal.ITIMER_REAL, 0.05)
    try:
        view = bytes(region[CHUNK:CHUNK + 8])    # faults while holding the GIL
        deadline = time.monotonic() + 0.5        # safe points: the interrupt must arrive by now
        while time.monotonic() < deadline:
            pass
        print("not interrupted", flush=True)
    except EXPECTED as interrupt:
        print("interrupted", repr(interrupt), flush=True)
    print("bytes", bytes(region[CHUNK:CHUNK + 8]) == bytes([2]) * 8, "calls", len(calls),
          "errors", region.stats().regeneration_errors, flush=True)
"""


@pytest.mark.parametrize("handler, expected, shown", [
    ("signal.default_int_handler", "KeyboardInterrupt", "KeyboardInterrupt()"),
    ("lambda *_: sys.exit(7)", "SystemExit", "SystemExit(7)"),
], ids=["ctrl-c", "sys.exit-in-a-signal-handler"])
def test_an_interrupt_during_a_fault_surfaces_in_the_program(backend: str, handler: str,
                                                           expected: str, shown: str) -> None:
    result = run_python(f"import signal\nHANDLER = {handler}\nEXPECTED = {expected}\n"
                        + textwrap.dedent(INTERRUPTED_READ), backend)
    assert result.returncode == 0, result.stderr
    assert f"interrupted {shown}" in result.stdout, result.stdout + result.stderr
    assert "bytes True calls 2 errors 0" in result.stdout, result.stdout + result.stderr


# --- nested faults --------------------------------------------------------------------------------------


def test_regenerator_reading_other_volatile_memory(backend: str) -> None:
    with make(backend, CountingRegenerator()) as inner:
        inner.mark_volatile()
        inner.purge()

        def from_inner(offset: int, buf: memoryview) -> None:
            buf[:] = inner[offset:offset + len(buf)]  # faults on another region, GIL held

        with make(backend, from_inner) as outer:
            assert_pages_match(outer, pattern(0, SIZE))
            outer.mark_volatile()
            inner.purge()
            outer.purge()
            assert outer.mark_nonvolatile() is True  # populate: from a syscall, then nested
            assert_pages_match(outer, pattern(0, SIZE))


def test_regenerator_reading_its_own_region_elsewhere(backend: str) -> None:
    holder: list[vrange.Region] = []

    def chained(offset: int, buf: memoryview) -> None:
        if offset == 0:
            buf[:] = pattern(0, len(buf))
        else:  # built from the previous chunk of the same region
            previous = bytes(holder[0][offset - CHUNK:offset])
            buf[:] = bytes((byte + 1) % 256 for byte in previous[:len(buf)])

    with make(backend, chained, size=4 * CHUNK) as region:
        holder.append(region)
        expected = bytes((b + 3) % 256 for b in pattern(0, CHUNK))
        assert bytes(region[3 * CHUNK:4 * CHUNK]) == expected
        holder.clear()


@pytest.mark.requires("syscalls_served", "(its regenerator writes another purged region to a pipe)")
def test_regenerator_making_syscalls_on_another_region(backend: str) -> None:
    with make(backend, CountingRegenerator()) as inner:
        inner.mark_volatile()
        inner.purge()

        def through_a_pipe(offset: int, buf: memoryview) -> None:
            read_end, write_end = os.pipe()
            try:
                view = memoryview(inner)
                os.write(write_end, view[offset:offset + PAGE])  # a second worker serves this
                view.release()
                buf[:PAGE] = os.read(read_end, PAGE)
                buf[PAGE:] = pattern(offset + PAGE, len(buf) - PAGE)
            finally:
                os.close(read_end), os.close(write_end)

        with make(backend, through_a_pipe) as outer:
            destination = np.empty(SIZE, dtype=np.uint8)
            np.copyto(destination, np.frombuffer(outer, dtype=np.uint8))  # worker path
            assert destination.tobytes() == pattern(0, SIZE)
            assert bytes(outer[0:CHUNK]) == pattern(0, CHUNK)


def test_regenerator_that_allocates_heavily(backend: str) -> None:
    def hungry(offset: int, buf: memoryview) -> None:
        junk = [bytes(1000) for _ in range(2000)] + [list(range(1000))]
        buf[:] = pattern(offset, len(buf))
        del junk

    with make(backend, hungry) as region:
        assert_pages_match(region, pattern(0, SIZE))


def test_regenerator_purging_from_inside_a_fault(backend: str) -> None:
    with make(backend, CountingRegenerator()) as other:
        other.mark_nonvolatile()
        other.mark_volatile()

        def purging(offset: int, buf: memoryview) -> None:
            other.purge()  # madvise from the fault path: must not wait on the handler
            buf[:] = pattern(offset, len(buf))

        with make(backend, purging) as region:
            assert_pages_match(region, pattern(0, SIZE))


# --- lifetime --------------------------------------------------------------------------------------------


def test_close_semantics(backend: str) -> None:
    region = make(backend, sources.Zeros())
    view = memoryview(region)
    with pytest.raises(BufferError):
        region.close()
    assert region[0] == 0 and not region.closed  # still works
    view.release()
    region.close()
    region.close()  # twice is fine
    assert region.closed
    for call in (region.mark_volatile, region.mark_nonvolatile, region.purge, region.stats):
        with pytest.raises(ValueError, match="closed"):
            call()
    with pytest.raises(ValueError):
        region[0]
    with pytest.raises(ValueError, match="closed"):
        region.__enter__()
    assert "closed" in repr(region)


def test_close_from_the_regions_own_regenerator_is_refused_at_once(backend: str) -> None:
    """close() inside the regenerator would wait for that regenerator to return: it raises at once
    instead, the refill completes, and the region closes normally afterwards."""
    errors: list[BaseException] = []
    seconds: list[float] = []

    def regenerate(offset: int, buf: memoryview) -> None:
        started = time.monotonic()
        try:
            region.close()
        except vrange.VRangeError as error:
            errors.append(error)
        seconds.append(time.monotonic() - started)
        buf[:] = pattern(offset, len(buf))

    region = make(backend, regenerate)
    assert bytes(region[CHUNK:CHUNK + 16]) == pattern(CHUNK, 16)
    assert len(errors) == 1 and "own regenerator" in str(errors[0])
    assert seconds[0] < 1.0  # refused, not a 5 s wait that gives up
    assert not region.closed and region.stats().bytes_regenerated == CHUNK
    region.close()
    assert region.closed


@pytest.mark.parametrize("kept", ["view", "slice", "numpy", "obj"])
def test_a_buffer_kept_by_a_regenerator_is_invalid_or_harmless_after_it_returns(
        backend: str, kept: str) -> None:
    """A regenerator that keeps ``buf`` finds it released (ValueError on use); one that keeps a
    view derived from it (slice, numpy array, ``buf.obj``) writes through it into memory nobody
    else uses: no region, no later regeneration and no allocator is touched (this corrupted the heap
    or crashed before)."""
    result = run_python(f"""
        import numpy as np
        KEPT = {kept!r}
        kept = []
        def regenerate(offset, buf):
            buf[:] = bytes([offset // CHUNK + 1]) * len(buf)
            kept.append({{"view": lambda: buf, "slice": lambda: buf[:4096],
                          "numpy": lambda: np.frombuffer(buf, dtype=np.uint8),
                          "obj": lambda: buf.obj}}[KEPT]())
        region = vrange.Region(8 * CHUNK, regenerate, backend=BACKEND)
        for rounds in range(3):
            for chunk in range(8):
                assert region[chunk * CHUNK] == chunk + 1
            for index, survivor in enumerate(kept):
                if KEPT == "view":
                    try:
                        survivor[0:16] = bytes(16)
                        raise AssertionError("a released memoryview was usable")
                    except ValueError as error:
                        assert "released" in str(error)
                elif KEPT == "numpy":
                    survivor[:] = 0xEE
                else:
                    survivor[0:4096] = bytes([0xEE]) * 4096
            region.mark_volatile()
            region.purge()
        for chunk in range(8):
            assert bytes(region[chunk * CHUNK:(chunk + 1) * CHUNK]) == bytes([chunk + 1]) * CHUNK
        print("ok", len(kept), flush=True)
    """, backend)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "ok 32" in result.stdout  # 4 fills of 8 chunks


@pytest.mark.parametrize("source", ["zeros", "python"])
def test_purge_right_after_the_access_that_refilled_a_volatile_chunk_discards_it(
        backend: str, source: str) -> None:
    """The access has completed, the chunk is volatile, resident and not held: purge() gives it
    back (on uffd the refill still held the chunk for a few microseconds after waking the thread,
    and purge() skipped it about once in ten)."""
    for _ in range(100):
        with make(backend, sources.Zeros() if source == "zeros" else CountingRegenerator(),
                  size=4 * CHUNK) as region:
            region.mark_volatile()
            region[CHUNK]
            assert region.purge() == CHUNK


def test_regions_created_and_closed_from_many_threads_at_once(backend: str) -> None:
    """Closed uffd regions are released by whichever thread creates the next one; two threads doing
    that at once released the same one twice (SIGSEGV within seconds)."""
    result = run_python("""
        import time
        def regenerate(offset, buf):
            buf[:] = bytes([offset // CHUNK % 251]) * len(buf)
        failures = []
        def churn():
            try:
                deadline = time.monotonic() + 3
                while time.monotonic() < deadline:
                    with vrange.Region(4 * CHUNK, regenerate, backend=BACKEND) as region:
                        assert region[2 * CHUNK] == 2
            except BaseException as error:
                failures.append(error)
        threads = [threading.Thread(target=churn) for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        print("ok", failures, flush=True)
    """, backend)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "ok []" in result.stdout


def test_a_chained_regenerator_exception_does_not_keep_the_region_exported(backend: str) -> None:
    """``raise X from cause`` in a regenerator: the cause's frames (which hold the caller's
    memoryview of the region) are dropped with the traceback text kept, so close() works."""
    def regenerate(offset: int, buf: memoryview) -> None:
        try:
            raise KeyError(offset)
        except KeyError as cause:
            raise RuntimeError("cannot regenerate") from cause

    region = make(backend, regenerate, on_error="zeros")

    def read_through_a_view() -> None:
        with memoryview(region) as view:
            bytes(view[0:8])

    read_through_a_view()
    region.close()
    assert region.closed
    _, error = region.regeneration_failures[0]
    assert isinstance(error.__cause__, KeyError) and error.__cause__.__traceback__ is None
    assert "KeyError" in error.vrange_traceback  # type: ignore[attr-defined]


def test_closing_a_region_from_another_regions_regenerator_frees_it(
        backend: str, caplog: pytest.LogCaptureFixture) -> None:
    """Allowed (only a region's own regenerator is refused); on sigbus it runs inside a SIGBUS
    handler, so the region is freed by a later close() or creation, without a false warning."""
    others = [make(backend, sources.Zeros(), size=CHUNK) for _ in range(5)]

    def regenerate(offset: int, buf: memoryview) -> None:
        if others:
            others.pop().close()
        buf[:] = pattern(offset, len(buf))

    with make(backend, regenerate) as region:
        for chunk in range(5):
            assert region[chunk * CHUNK] == pattern(chunk * CHUNK, 1)[0]
    assert not others
    make(backend, sources.Zeros(), size=CHUNK).close()  # frees what could not be freed then
    assert "still running" not in caplog.text
    from vrange._backends import sigbus
    assert not sigbus._detached and not sigbus._leaked


def test_numpy_export_blocks_close(backend: str) -> None:
    region = make(backend, CountingRegenerator())
    array = np.frombuffer(region, dtype=np.uint8)
    assert array[CHUNK] == pattern(CHUNK, 1)[0]
    with pytest.raises(BufferError):
        region.close()
    del array
    region.close()


def test_many_regions_open_and_close(backend: str) -> None:
    for index in range(50):
        with make(backend, CountingRegenerator(), size=2 * CHUNK) as region:
            assert region[index] == pattern(index, 1)[0]


def test_interpreter_exit_with_a_fault_in_flight_does_not_hang(backend: str) -> None:
    result = run_python("""
        never = threading.Event()
        def stuck(offset, buf):
            never.wait()
        region = vrange.Region(4 * CHUNK, stuck, backend=BACKEND)
        read_end, write_end = os.pipe()
        threading.Thread(target=lambda: os.write(write_end, memoryview(region)[:4096]),
                         daemon=True).start()
        threading.Timer(0.5, lambda: None).start()
        print("exiting", flush=True)
    """, backend)
    assert result.returncode == 0, result.stderr
    assert "exiting" in result.stdout


@pytest.mark.forked
def test_forked_child_regenerates_instead_of_reading_zeros(backend: str) -> None:
    with make(backend, CountingRegenerator()) as region, make(backend, sources.Zeros()) as zeros:
        region[0:5] = b"kept!"
        region.mark_volatile(CHUNK)
        region.purge()
        zeros[0:3] = b"abc"
        pid = os.fork()
        if pid == 0:  # child: must see regenerated bytes for purged pages, and kept writes
            try:
                ok = (bytes(region[0:5]) == b"kept!"
                      and bytes(region[CHUNK:SIZE]) == pattern(CHUNK, SIZE - CHUNK)
                      and bytes(zeros[0:3]) == b"abc" and bytes(zeros[CHUNK:CHUNK + 4]) == bytes(4))
                os._exit(0 if ok else 1)
            except BaseException:
                os._exit(2)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert bytes(region[CHUNK:2 * CHUNK]) == pattern(CHUNK, CHUNK)  # the parent still works


@pytest.mark.requires("uffd_handler", "(a forked child needs a userfaultfd handler of its own)")
@pytest.mark.requires("root", "(to install a seccomp filter in the child)")
def test_a_forked_child_without_userfaultfd_never_reads_zeros_on_the_uffd_backend(
        backend: str) -> None:
    """The child's copy of the mapping is not registered and its inherited descriptor serves the
    parent: if the child cannot open a userfaultfd, its calls on the region raise a clear error and
    a raw access faults (SIGSEGV) instead of reading zeros for purged pages."""
    result = run_python("""
        import ctypes, signal, time
        from vrange.testing import deny_userfaultfd
        refilling, release = threading.Event(), threading.Event()
        def regenerate(offset, buf):
            if offset == 2 * CHUNK:
                refilling.set()
                release.wait(10)
            buf[:] = bytes([offset // CHUNK + 1]) * len(buf)
        region = vrange.Region(4 * CHUNK, regenerate, backend=BACKEND)
        assert region[CHUNK] == 2
        region.mark_volatile()
        region.purge()
        address = region.address
        slow = threading.Thread(target=lambda: region[2 * CHUNK])
        slow.start()
        assert refilling.wait(10)  # its refill is in flight at fork()
        deny_userfaultfd(include_dev=True)
        pid = os.fork()
        if pid == 0:
            try:
                region.mark_nonvolatile()
                os._exit(3)
            except vrange.VRangeError as error:
                print("refused:", "forked child" in str(error), flush=True)
            started = time.monotonic()
            region.close()  # unusable, not busy: at once, even with a refill in flight at fork
            print("closed", region.closed, time.monotonic() - started < 1, flush=True)
            raw = (ctypes.c_char * 1).from_address(address + CHUNK)
            raw.value  # a raw read of a purged page: SIGSEGV, never zero
            os._exit(4)
        _, status = os.waitpid(pid, 0)
        print("child", os.waitstatus_to_exitcode(status), flush=True)
        release.set()
        slow.join()
        assert region[CHUNK] == 2  # the parent still works
        region.close()
    """, backend)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "refused: True" in result.stdout and f"child {-signal.SIGSEGV}" in result.stdout, \
        result.stdout + result.stderr[-2000:]
    assert "closed True True" in result.stdout, result.stdout


@pytest.mark.hang_timeout(120)
def test_fork_while_close_drains_leaves_the_child_a_working_region(backend: str) -> None:
    """fork() while another thread's close() waits for a regeneration in flight: the child's copy of
    the region is open and works, also for faults taken without the GIL (before, the child kept the
    region 'closing' for ever and such faults waited for an unmap that never came)."""
    result = run_python("""
        import hashlib, signal, time
        started = threading.Event()
        def regenerate(offset, buf):
            if offset == 0:
                started.set()
                time.sleep(0.5)  # in flight: close() drains meanwhile
            buf[:] = bytes([offset // CHUNK + 1]) * len(buf)
        for variant in ("mark_nonvolatile", "hashlib"):
            region = vrange.Region(8 * CHUNK, regenerate, backend=BACKEND)
            started.clear()
            reader = threading.Thread(target=lambda: region[0])
            reader.start()
            started.wait()
            closer = threading.Thread(target=region.close)
            closer.start()
            time.sleep(0.1)
            pid = os.fork()
            if pid == 0:
                signal.alarm(10)  # a hang dies with SIGALRM
                if variant == "mark_nonvolatile":
                    region.mark_nonvolatile(CHUNK, CHUNK)
                    ok = region[CHUNK] == 2
                else:  # hashlib lets the GIL go over large buffers: faults without the GIL
                    ok = hashlib.sha256(memoryview(region)[CHUNK:3 * CHUNK]).digest() == \
                        hashlib.sha256(bytes([2]) * CHUNK + bytes([3]) * CHUNK).digest()
                os._exit(0 if ok else 1)
            _, status = os.waitpid(pid, 0)
            reader.join()
            closer.join()
            print(variant, os.waitstatus_to_exitcode(status), region.closed, flush=True)
    """, backend)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "mark_nonvolatile 0 True" in result.stdout and "hashlib 0 True" in result.stdout, \
        result.stdout


@pytest.mark.hang_timeout(120)
def test_a_child_forked_while_another_thread_closes_a_region_leaves_its_address_alone(
        backend: str) -> None:
    """close() unmaps before the region leaves the registry of live regions (a managed region lets
    the GIL go in between, detaching from the pressure monitor). A fork in that window, after
    another mapping took the address: the child must not register, fence or trap that mapping as
    the region (it read the closed region's regenerator's bytes in its own fresh mapping)."""
    result = run_python("""
        import mmap
        SIZE = 16 * CHUNK
        def regenerate(offset, buf):
            buf[:] = b"\\xaa" * len(buf)
        stop = threading.Event()
        def churn():
            while not stop.is_set():
                region = vrange.Region(SIZE, regenerate, backend=BACKEND, managed=True)
                region[0]
                region.close()
        thread = threading.Thread(target=churn)
        thread.start()
        codes = {}
        for attempt in range(150):
            foreign = mmap.mmap(-1, SIZE)  # often at the address of the region just unmapped
            foreign[:SIZE // 2] = b"\\x55" * (SIZE // 2)  # the second half never touched
            pid = os.fork()
            if pid == 0:
                try:
                    ok = foreign[:SIZE // 2] == b"\\x55" * (SIZE // 2) and \\
                        foreign[SIZE // 2:] == bytes(SIZE // 2)
                    os._exit(0 if ok else 1)
                except BaseException:
                    os._exit(2)
            code = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
            codes[code] = codes.get(code, 0) + 1
            foreign.close()
        stop.set()
        thread.join()
        print("codes", sorted(codes), flush=True)
    """, backend)
    assert "codes [0]" in result.stdout, result.stdout + result.stderr[-2000:]


@pytest.mark.hang_timeout(120)
def test_close_waits_for_a_gil_holder_that_waits_for_another_threads_refill(backend: str) -> None:
    """A thread slicing (GIL held) a chunk another thread is regenerating lets the GIL go while it
    waits; close() must not unmap under its statement meanwhile (SIGSEGV within dozens of rounds)."""
    result = run_python("""
        import hashlib, time
        regenerating = threading.Event()
        def regenerate(offset, buf):
            regenerating.set()
            time.sleep(0.02)  # runs without the faulting thread's GIL: allowed
            buf[:] = bytes([offset // CHUNK + 1]) * len(buf)
        for round_number in range(60):
            region = vrange.Region(4 * CHUNK, regenerate, backend=BACKEND)
            regenerating.clear()
            hashed = threading.Event()
            def hasher():
                with memoryview(region) as view:
                    hashlib.sha256(view[0:CHUNK])  # lets the GIL go: served without it
                hashed.set()
            def slicer():
                regenerating.wait(10)  # while chunk 0 is being regenerated
                try:
                    assert bytes(region[0:8]) == bytes([1]) * 8
                except ValueError:
                    pass  # closed first: fine
            threads = [threading.Thread(target=hasher), threading.Thread(target=slicer)]
            for thread in threads:
                thread.start()
            hashed.wait()
            region.close()
            for thread in threads:
                thread.join()
        print("ok", flush=True)
    """, backend)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "ok" in result.stdout


def test_a_regenerator_run_again_after_an_interrupt_gets_a_zeroed_buffer(backend: str) -> None:
    """The interrupted attempt's bytes do not stay behind: the retry gets a zeroed buffer, and the
    interrupt is raised afterwards."""
    result = run_python("""
        attempts = []
        def regenerate(offset, buf):
            attempts.append(bytes(buf[:4]))
            if len(attempts) == 1:
                buf[:4] = b"junk"
                raise KeyboardInterrupt
            buf[8:12] = b"good"
        region = vrange.Region(2 * CHUNK, regenerate, backend=BACKEND)
        try:
            data = bytes(region[:12])
            for _ in range(1000):  # the interrupt comes at a safe point after the access
                pass
        except KeyboardInterrupt:
            print("interrupted", flush=True)
        print(bytes(region[:12]) == bytes(8) + b"good", attempts == [bytes(4)] * 2, flush=True)
    """, backend)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "interrupted\nTrue True" in result.stdout, result.stdout


@pytest.mark.hang_timeout(180)
def test_ctrl_c_at_any_moment_of_a_refill_is_raised_not_fatal(backend: str) -> None:
    """SIGINT at a random moment while a loop reads purged chunks: the program gets its
    KeyboardInterrupt and every access completed with the right bytes. Ctrl-C hits whatever bytecode
    runs next, also vrange's own code around the regenerator: that used to fail the chunk (SIGBUS,
    the interrupt swallowed) in about half of the trials."""
    child = textwrap.dedent(f"""
        import vrange
        CHUNK = vrange.DEFAULT_CHUNK_SIZE
        def regenerate(offset, buf):
            buf[:8] = offset.to_bytes(8, "little")
        region = vrange.Region(64 * CHUNK, regenerate, backend={backend!r})
        print("ready", flush=True)
        try:
            while True:
                region.mark_volatile()
                region.purge()
                for chunk in range(64):
                    assert region[chunk * CHUNK:chunk * CHUNK + 8] == \
                        (chunk * CHUNK).to_bytes(8, "little")
        except KeyboardInterrupt:
            print("interrupted", flush=True)
    """)
    rng = np.random.default_rng(10)
    for _ in range(12):
        process = subprocess.Popen(python_command(child), stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, text=True)
        assert process.stdout is not None and process.stdout.readline().strip() == "ready"
        time.sleep(0.05 + float(rng.random()) * 0.25)
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=30)
        assert process.returncode == 0 and "interrupted" in out, (process.returncode, err[-2000:])


def test_regenerator_reading_its_own_chunk_fails_instead_of_hanging(backend: str) -> None:
    result = run_python("""
        holder = []
        def recursive(offset, buf):
            buf[:] = holder[0][offset:offset + len(buf)]   # the chunk being regenerated
        region = vrange.Region(4 * CHUNK, recursive, backend=BACKEND)
        holder.append(region)
        print("before", flush=True)
        region[CHUNK]
        print("after", flush=True)
    """, backend)
    assert "before" in result.stdout and "after" not in result.stdout
    expected = raw_failure_signal(vrange.features(), backend)
    assert result.returncode == -expected, result.stderr


def test_empty_ranges_touch_nothing(backend: str, regenerator: CountingRegenerator) -> None:
    with make(backend, regenerator, size=SIZE + 3 * PAGE) as region:
        region.mark_nonvolatile()
        region.mark_volatile()
        end = len(region)
        assert region.purge(PAGE, 0) == 0
        assert region.purge(end, 0) == 0
        assert region.mark_nonvolatile(end, 0) is False
        assert region.mark_nonvolatile(PAGE, 0, report=True) == []
        region.prefault(end, 0)
        assert region.stats().volatile_bytes == len(region)  # nothing was pinned
        assert region.purge() == len(region)


def test_a_regenerator_cannot_use_its_own_region(backend: str) -> None:
    holder: list[vrange.Region] = []

    def meddling(offset: int, buf: memoryview) -> None:
        holder[0].stats()
        buf[:] = pattern(offset, len(buf))

    with make(backend, meddling, size=2 * CHUNK) as region:
        holder.append(region)
        with pytest.raises(vrange.RegenerationError) as caught:
            region.mark_nonvolatile()
        assert isinstance(caught.value.__cause__, vrange.VRangeError)
        assert "its own region" in str(caught.value.__cause__)
        holder.clear()


def test_file_source_refuses_what_pread_cannot_read(tmp_path: "os.PathLike[str]") -> None:
    with pytest.raises(IsADirectoryError):
        sources.File(tmp_path)
    read_end, write_end = os.pipe()
    with pytest.raises(OSError) as caught:
        sources.File(read_end)
    assert caught.value.errno == errno.ESPIPE
    os.close(read_end), os.close(write_end)
    path = os.path.join(tmp_path, "data")
    with open(path, "wb") as file:
        file.write(b"x" * PAGE)
    for flags, refusal in ((os.O_WRONLY, "writing only"), (os.O_PATH, "O_PATH")):
        fd = os.open(path, flags)
        with pytest.raises(PermissionError, match=refusal):
            sources.File(fd)
        os.close(fd)
    fifo = os.path.join(tmp_path, "fifo")
    os.mkfifo(fifo)
    with pytest.raises(OSError) as caught:
        sources.File(fifo)  # opening it used to wait for a writer for ever
    assert caught.value.errno == errno.ESPIPE


def test_close_waits_for_a_regeneration_in_flight(backend: str) -> None:
    inside = threading.Event()

    def slow_old(offset: int, buf: memoryview) -> None:
        inside.set()
        time.sleep(0.3)  # close() is called meanwhile
        buf[:] = b"O" * len(buf)

    old = make(backend, slow_old, size=4 * CHUNK)
    got: list[bytes] = []
    reader = threading.Thread(target=lambda: got.append(bytes(old[0:4])))
    reader.start()
    assert inside.wait(10)  # the reader is inside the regenerator now
    old.close()      # must wait for it: afterwards the address may belong to another mapping
    with make(backend, lambda offset, buf: buf.__setitem__(slice(None), b"N" * len(buf)),
              size=4 * CHUNK) as new:
        # The old regeneration's copy ends before its reader returns: any late write is done.
        reader.join(timeout=30)
        assert not reader.is_alive()
        assert bytes(new[0:4]) == b"NNNN" and bytes(new[CHUNK:CHUNK + 4]) == b"NNNN"
    assert got == [b"OOOO"]


@pytest.mark.forked  # a close() that goes wrong here may leave a refill writing into freed memory
@pytest.mark.hang_timeout(60)
def test_close_that_times_out_raises_and_leaves_the_region_open_and_working(
        backend: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A regenerator that does not return within close()'s limit (5 s; 0.3 s here): close() raises
    VRangeError instead of unmapping under it, the region stays open, the refill completes with the
    right bytes once the regenerator returns, and every call works afterwards, close() included."""
    import vrange.region

    monkeypatch.setattr(vrange.region, "CLOSE_TIMEOUT_MS", 300)
    inside, release = threading.Event(), threading.Event()

    def stuck_once(offset: int, buf: memoryview) -> None:
        if offset == 0 and not release.is_set():
            inside.set()
            release.wait(30)
        buf[:] = pattern(offset, len(buf))

    region = make(backend, stuck_once, size=4 * CHUNK)
    got: list[bytes] = []
    reader = threading.Thread(target=lambda: got.append(bytes(region[0:8])))
    reader.start()
    assert inside.wait(10), "the reader's fault never reached the regenerator"
    started = time.monotonic()
    with pytest.raises(vrange.VRangeError, match="the region stays open"):
        region.close()
    assert time.monotonic() - started >= 0.3  # it waited for the regenerator first
    assert not region.closed
    assert reader.is_alive()  # still inside the regenerator: nothing was unmapped under it
    release.set()
    reader.join(timeout=30)
    assert got == [pattern(0, 8)]
    # Open and usable: a new fault, every call, the bytes.
    assert bytes(region[CHUNK:CHUNK + 8]) == pattern(CHUNK, 8)
    region.mark_volatile()
    assert region.purge() == 2 * CHUNK
    assert_pages_match(region, pattern(0, 4 * CHUNK))
    assert region.mark_nonvolatile() is True
    assert region.stats().regeneration_errors == 0 and region.regeneration_failures == []
    region.close()
    assert region.closed


def test_concurrent_close_is_safe(backend: str) -> None:
    for _ in range(20):
        region = make(backend, CountingRegenerator(), size=2 * CHUNK)
        region[0]
        closers = [threading.Thread(target=region.close) for _ in range(4)]
        for closer in closers:
            closer.start()
        for closer in closers:
            closer.join(timeout=30)
        assert region.closed
    with make(backend, CountingRegenerator()) as region:  # and the library still works
        assert region[0] == pattern(0, 1)[0]


def test_threads_holding_the_gil_fault_on_one_chunk(backend: str) -> None:
    calls: list[int] = []

    def slow(offset: int, buf: memoryview) -> None:
        calls.append(offset)
        time.sleep(0.2)  # releases the GIL: the other threads fault on the chunk meanwhile
        buf[:] = pattern(offset, len(buf))

    with make(backend, slow, size=2 * CHUNK) as region:
        results: list[bytes] = []
        threads = [threading.Thread(target=lambda: results.append(bytes(region[0:64])))
                   for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=30)
        assert results == [pattern(0, 64)] * 4
        assert calls == [0]


# --- the fault signal: replaced, blocked ------------------------------------------------------------


@pytest.mark.requires("fault_signal", "(other code takes the fault signal first)")
def test_a_fault_signal_taken_before_vrange_starts_is_refused_and_left_to_its_owner(
        backend: str) -> None:
    """Other code handles SIGRTMIN+6 before the first uffd region: creating one raises a clear
    VRangeError (EBUSY, naming the signal) and leaves nothing open; the other code keeps its
    handler and its signals. Once it lets the signal go, regions work (faults served by it)."""
    result = run_python("""
        import errno, signal
        SIGNAL = signal.SIGRTMIN + 6
        got = []
        def theirs(number, frame):
            got.append(number)
        signal.signal(SIGNAL, theirs)                    # other code takes the signal first
        def descriptors():
            return len(os.listdir("/proc/self/fd"))
        def regenerate(offset, buf):
            buf[:] = bytes([offset // CHUNK + 1]) * len(buf)
        before = descriptors()
        for attempt in range(2):                         # refused every time, not half-started
            try:
                vrange.Region(4 * CHUNK, regenerate, backend=BACKEND)
                print("created", flush=True)
            except vrange.VRangeError as error:
                print("refused", isinstance(error, vrange.VRangeOSError),
                      getattr(error, "errno", None) == errno.EBUSY, "SIGRTMIN+6" in str(error),
                      "used by other code" in str(error), flush=True)
        print("descriptors left", descriptors() - before, flush=True)
        print("still theirs", signal.getsignal(SIGNAL) is theirs, flush=True)
        os.kill(os.getpid(), SIGNAL)
        for _ in range(1000):                            # safe points: their handler runs
            if got:
                break
        print("theirs delivered", got == [SIGNAL], flush=True)
        signal.signal(SIGNAL, signal.SIG_DFL)            # the other code lets it go
        region = vrange.Region(4 * CHUNK, regenerate, backend=BACKEND)
        ok = bytes(region[CHUNK:CHUNK + 4]) == bytes([2]) * 4   # GIL held: served by the signal
        print("works", ok, region.stats().faults_on_faulting_thread > 0, flush=True)
    """, backend)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.count("refused True True True True") == 2, result.stdout + result.stderr
    assert "created" not in result.stdout
    assert "descriptors left 0" in result.stdout, result.stdout
    assert "still theirs True" in result.stdout and "theirs delivered True" in result.stdout
    assert "works True True" in result.stdout, result.stdout + result.stderr[-2000:]


@pytest.mark.requires("fault_signal", "(other code replaces the fault signal's handler)")
@pytest.mark.parametrize("noticed_at", ["fault", "creation"])
@pytest.mark.parametrize("replacement", ["handler", "SIG_IGN", "SIG_DFL"])
def test_a_fault_signal_replaced_after_start_is_taken_back_where_vrange_notices(
        backend: str, replacement: str, noticed_at: str) -> None:
    """Other code replaces the fault signal's disposition after vrange started (a handler of its
    own, SIG_IGN, SIG_DFL). vrange takes it back at the next region creation (a logged warning)
    or, with no vrange call in between, where the next fault is routed (a line on stderr): a
    GIL-holding thread's fault is still served by the signal (an ignored signal would leave it
    stuck, a default one would kill the process), and the other code's own signals still reach
    its handler (or stay ignored)."""
    result = run_python(f"""
        import logging, signal
        logging.basicConfig(format="%(message)s")
        KIND, WHERE = {replacement!r}, {noticed_at!r}
        SIGNAL = signal.SIGRTMIN + 6
        got = []
        def regenerate(offset, buf):
            buf[:] = bytes([offset // CHUNK + 1]) * len(buf)
        region = vrange.Region(4 * CHUNK, regenerate, backend=BACKEND)
        assert region[0] == 1
        region.mark_volatile()
        region.purge()
        signal.signal(SIGNAL, {{"handler": lambda number, frame: got.append(number),
                               "SIG_IGN": signal.SIG_IGN, "SIG_DFL": signal.SIG_DFL}}[KIND])
        if WHERE == "creation":
            other = vrange.Region(4 * CHUNK, regenerate, backend=BACKEND)
        before = region.stats().faults_on_faulting_thread
        ok = bytes(region[CHUNK:CHUNK + 4]) == bytes([2]) * 4   # GIL held: the signal path
        print("served", ok, region.stats().faults_on_faulting_thread > before, flush=True)
        if KIND != "SIG_DFL":
            os.kill(os.getpid(), SIGNAL)                        # the other code's own signal
            for _ in range(1000):
                if got:
                    break
            print("theirs", got == ([SIGNAL] if KIND == "handler" else []), flush=True)
    """, backend)
    assert result.returncode == 0, result.stdout + result.stderr[-2000:]
    assert "served True True" in result.stdout, result.stdout + result.stderr[-2000:]
    if replacement != "SIG_DFL":
        assert "theirs True" in result.stdout, result.stdout
    if noticed_at == "creation":
        assert "(SIGRTMIN+6) was replaced; re-installing vrange's" in result.stderr, result.stderr
    else:
        assert "replaced the handler of vrange's fault signal" in result.stderr, result.stderr


@pytest.mark.requires("fault_signal", "(it replaces the fault signal's handler)")
def test_a_fault_signal_handler_replaced_later_is_taken_back_and_chained(backend: str) -> None:
    result = run_python("""
        import signal
        got = []
        def regenerate(offset, buf):
            buf[:] = bytes([offset // CHUNK + 1]) * len(buf)
        region = vrange.Region(4 * CHUNK, regenerate, backend=BACKEND)
        assert region[0] == 1
        signal.signal(signal.SIGRTMIN + 6, lambda number, frame: got.append(number))
        region.mark_volatile(); region.purge()
        assert bytes(region[CHUNK:CHUNK + 4]) == bytes([2]) * 4   # GIL held: the signal path
        os.kill(os.getpid(), signal.SIGRTMIN + 6)                 # the other code's own signal
        for _ in range(100):
            if got:
                break
        print("served, chained", got == [signal.SIGRTMIN + 6], flush=True)
    """, backend)
    assert result.returncode == 0, result.stderr
    assert "served, chained True" in result.stdout
    assert "replaced the handler of vrange's fault signal" in result.stderr


@pytest.mark.requires("fault_signal", "(its thread blocks the fault signal)")
@pytest.mark.hang_timeout(90)
@pytest.mark.parametrize("policy, outcome", [("zeros", 0), ("poison", -signal.SIGBUS)])
def test_a_thread_blocking_the_fault_signal_never_deadlocks(
        backend: str, policy: str, outcome: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """It holds the GIL, the signal cannot reach it, and a worker needs that GIL: after a while
    (10 s by default, 2 s here) the fault fails by the region's policy, with a clear message,
    instead of hanging."""
    monkeypatch.setenv("VRANGE_GIL_WAIT_LIMIT_MS", "2000")
    result = run_python(f"""
        import signal
        def regenerate(offset, buf):
            buf[:] = bytes([7]) * len(buf)
        region = vrange.Region(4 * CHUNK, regenerate, backend=BACKEND, on_error={policy!r})
        signal.pthread_sigmask(signal.SIG_BLOCK, {{signal.SIGRTMIN + 6}})
        print("reading", flush=True)
        print("read", bytes(region[0:4]), flush=True)
    """, backend)
    assert result.returncode == outcome, result.stdout + result.stderr
    assert "blocks vrange's fault signal" in result.stderr
    if policy == "zeros":
        assert "read b'\\x00\\x00\\x00\\x00'" in result.stdout


@pytest.mark.requires("sigbus_handler", "(its thread blocks SIGBUS)")
def test_a_thread_blocking_sigbus_fails_instead_of_hanging(backend: str) -> None:
    result = run_python("""
        import signal
        region = vrange.Region(4 * CHUNK, lambda offset, buf: None, backend=BACKEND)
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGBUS})
        region[0]
    """, backend)
    assert result.returncode == -signal.SIGBUS  # the kernel's rule for a blocked synchronous fault


def test_a_dropped_region_is_freed_by_reference_counting(backend: str) -> None:
    """No cycle through the native handle: ``del region`` unmaps it at once, with the cyclic GC
    off (128 MiB regions made and dropped in a loop grew RSS by 384 MiB when it did)."""
    import gc
    import weakref

    def resident_mib() -> int:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * PAGE >> 20

    gc.collect()
    gc.disable()
    try:
        before = resident_mib()
        for _ in range(6):
            region = make(backend, lambda offset, buf: buf.__setitem__(slice(None), b"x" * len(buf)),
                          size=64 << 20)
            region[:]  # every page resident
            alive = weakref.ref(region)
            with dropped_open():
                del region
            assert alive() is None
        assert resident_mib() - before < 64
    finally:
        gc.enable()


@pytest.mark.parametrize("handler", ["signal.default_int_handler"], ids=["ctrl-c"])
def test_an_interrupt_during_a_statement_that_faults_twice_arrives_once(backend: str,
                                                                       handler: str) -> None:
    """The pending interrupt must not be raised at the entry of the second chunk's regenerator
    (cffi would swallow it there and the chunk would fail): once, after the statement."""
    result = run_python(f"""
        import signal, time
        calls = []
        def regenerate(offset, buf):
            calls.append(offset)
            if len(calls) == 1:
                deadline = time.monotonic() + 5
                while time.monotonic() < deadline:
                    pass
                raise AssertionError("the timer never fired")
            buf[:] = bytes([offset // CHUNK + 1]) * len(buf)
        region = vrange.Region(4 * CHUNK, regenerate, backend=BACKEND)
        signal.signal(signal.SIGALRM, {handler})
        signal.setitimer(signal.ITIMER_REAL, 0.05)
        interrupts = 0
        try:
            data = bytes(region[0:2 * CHUNK])       # two chunks, one statement
            deadline = time.monotonic() + 0.5       # safe points: the interrupt arrives by now
            while time.monotonic() < deadline:
                pass
        except KeyboardInterrupt:
            interrupts += 1
        time.sleep(0.2)
        print("interrupts", interrupts, "bytes", bytes(region[0:2 * CHUNK]) ==
              bytes([1]) * CHUNK + bytes([2]) * CHUNK, "errors", region.stats().regeneration_errors,
              flush=True)
    """, backend)
    assert result.returncode == 0, result.stderr
    assert "interrupts 1 bytes True errors 0" in result.stdout, result.stdout + result.stderr


@pytest.mark.requires("fault_signal", "(faulthandler chains the fault signal back to vrange)")
def test_a_replacement_that_chains_back_to_vrange_does_not_loop(backend: str) -> None:
    result = run_python("""
        import faulthandler, signal
        region = vrange.Region(4 * CHUNK, lambda o, b: b.__setitem__(slice(None), b"\x05" * len(b)),
                               backend=BACKEND)
        assert region[0] == 5
        faulthandler.register(signal.SIGRTMIN + 6, chain=True)   # chains to vrange's handler
        region.mark_volatile(); region.purge()
        assert region[CHUNK] == 5                                # vrange takes the signal back
        os.kill(os.getpid(), signal.SIGRTMIN + 6)                # faulthandler, once, no loop
        print("survived", flush=True)
    """, backend)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "survived" in result.stdout
    assert result.stderr.count("Current thread") <= 2


ATOMIC_STATEMENT = """
    import time
    spans, steps = [], []
    def regenerate(offset, buf):            # pure Python, 30 ms, never lets the GIL go itself
        start = time.monotonic_ns()
        deadline = time.monotonic() + 0.03
        while time.monotonic() < deadline:
            pass
        buf[:] = bytes([offset // CHUNK % 251]) * len(buf)
        spans.append((start, time.monotonic_ns()))
    region = vrange.Region(16 * CHUNK, regenerate, backend=BACKEND)
    region.mark_volatile()
    data = bytearray()
    stop = threading.Event()
    def other_thread():
        while not stop.is_set():
            steps.append(time.monotonic_ns())
            data.clear()                      # frees the buffer the faulting extend writes into
            data.extend(bytes(CHUNK))
    other = threading.Thread(target=other_thread)
    other.start()
    view = memoryview(region)
    for round_number in range(3):
        region.purge()
        for chunk in range(16):
            data.extend(view[chunk * CHUNK:(chunk + 1) * CHUNK])   # faults holding the GIL
    stop.set()
    other.join()
    inside = sum(1 for step in steps for start, end in spans if start < step < end)
    print("regenerations", len(spans), "other thread steps", len(steps), "inside", inside,
          flush=True)
"""


@pytest.mark.requires("gil_switch_holding", "(nothing else keeps the statement atomic)")
def test_a_pure_python_regenerator_keeps_the_faulting_statement_atomic(backend: str) -> None:
    """The interleaving that aborted with heap corruption: thread A extends a bytearray from purged
    memory (the regenerator runs inside that extend), thread B clears and refills the same bytearray.
    No forced GIL switch may hand B the GIL while the regenerator runs."""
    result = run_python(ATOMIC_STATEMENT, backend)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "regenerations 48" in result.stdout and " inside 0" in result.stdout, result.stdout
    assert "another Python thread ran" not in result.stderr



def test_a_file_that_shrank_fails_the_regeneration_instead_of_reading_zeros(
        backend: str, tmp_path: "os.PathLike[str]") -> None:
    content = os.urandom(SIZE)
    path = os.path.join(tmp_path, "backing")
    with open(path, "wb") as file:
        file.write(content)
    with make(backend, sources.File(path)) as region:
        assert bytes(region[:]) == content
        region.mark_volatile()
        region.purge()
        os.truncate(path, SIZE // 2)  # the second half of the data is gone
        with pytest.raises(vrange.RegenerationError, match="ENODATA"):
            region.mark_nonvolatile()
        assert_pages_match(region, content[:SIZE // 2])  # what is still there comes back
        os.truncate(path, 0)
        with open(path, "r+b") as file:
            file.write(content)
        assert region.mark_nonvolatile() is True
        assert_pages_match(region, content)


@pytest.mark.hang_timeout(120)
@pytest.mark.parametrize("source", ["python", "zeros"])
@pytest.mark.parametrize("exported", [False, True], ids=["plain", "exported"])
def test_close_while_other_threads_slice_never_crashes_or_hangs(backend: str, source: str,
                                                                exported: bool) -> None:
    """Two threads slice chunks (holding the GIL, so each slice is served inside the fault; the
    Python regenerator sleeps, which lets close() start meanwhile) while the main thread closes the
    region: a slice gives bytes or ValueError, never SIGSEGV, and close() never deadlocks, also
    when it only ends in BufferError because a slicer holds a memoryview of the region."""
    result = run_python(f"""
        import time
        SOURCE, EXPORTED = {source!r}, {exported!r}
        def regenerate(offset, buf):
            if EXPORTED:  # holds the GIL throughout: sleeping here while the other slicer spins
                deadline = time.perf_counter() + 0.001  # would wait out held GIL switches (1 s)
                while time.perf_counter() < deadline:
                    pass
            else:
                time.sleep(0.002)
            buf[:] = bytes([offset // CHUNK % 251]) * len(buf)
        def expected(chunk):
            return bytes([chunk]) * 8 if SOURCE == "python" else bytes(8)
        outcomes = {{"bytes": 0, "closed": 0, "refused": 0}}
        for round_number in range(12 if EXPORTED else 40 if SOURCE == "python" else 60):
            region = vrange.Region(32 * CHUNK, regenerate if SOURCE == "python"
                                   else vrange.sources.Zeros(), backend=BACKEND)
            stop = threading.Event()
            def slicer(first):
                try:
                    if not EXPORTED:
                        for chunk in range(first, 32, 2):
                            assert bytes(region[chunk * CHUNK:chunk * CHUNK + 8]) == expected(chunk)
                    else:  # slice through a memoryview until close() has been refused enough
                        with memoryview(region) as view:
                            while not stop.is_set():
                                for chunk in range(first, 32, 2):
                                    assert bytes(view[chunk * CHUNK:chunk * CHUNK + 8]) == \
                                        expected(chunk)
                    outcomes["bytes"] += 1
                except ValueError:
                    outcomes["closed"] += 1
            # Daemons: a failure in the main thread must end the process, not leave them spinning.
            slicers = [threading.Thread(target=slicer, args=(first,), daemon=True)
                       for first in (0, 1)]
            for thread in slicers:
                thread.start()
            time.sleep(0.01 + round_number * 0.0005)
            while True:
                try:
                    region.close()
                    break
                except BufferError:
                    outcomes["refused"] += 1
                    if outcomes["refused"] % 5 == 0:
                        stop.set()
                    if not stop.is_set():  # the slicers fault again while the next close() drains
                        region.mark_volatile()
                        region.purge()
                    continue
            for thread in slicers:
                thread.join(timeout=30)
                assert not thread.is_alive()
        print("ok", outcomes, flush=True)
        assert not EXPORTED or outcomes["refused"] > 0, outcomes
    """, backend)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "ok" in result.stdout
