"""The rows of ``python -m vrange bench``, as data: each names what it measures, its baseline from
the same run, its unit, its target (if the project set one) and how to set both up.

A row's ``setup(scale, resources)`` is a context manager yielding ``(measure, baseline)``: two
callables returning one cost each, in the row's unit. Whatever it makes (regions, mappings, files)
is released when the context exits, also on Ctrl-C.
"""

from __future__ import annotations

import contextlib
import dataclasses
import mmap
import os
import random
import tempfile
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, cast

from .. import io as vrange_io
from .._backends import buffer_address, usable_specs
from .._backends._memory import touch_pages, touch_pages_each, touch_pages_in_order, uffd_floor
from ..errors import VRangeError
from ..region import BackendName, Region
from ..sources import File, Zeros

PAGE = mmap.PAGESIZE
KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
DEFAULT_CHUNK = 64 * KiB
MADV_POPULATE_WRITE = 23  # Linux 5.14; not in every Python's mmap module
IO_STEP = 1 * MiB  # one os.write per MiB, to a memfd at offset 0

Pair = tuple[Callable[[], float], Callable[[], float]]


@dataclass(frozen=True)
class Scale:
    """How big each kind of row is: --quick shrinks everything."""

    fault_bytes: int = 8 * MiB
    hit_bytes: int = 64 * MiB
    pin_bytes: int = 1 * GiB
    purge_bytes: int = 256 * MiB
    write_bytes: int = 64 * MiB
    throughput_bytes: int = 32 * MiB
    latency_faults: int = 512
    alternative_chunks: int = 256
    chunks: tuple[int, ...] = (4 * KiB, 64 * KiB, 2 * MiB)


FULL = Scale()
QUICK = Scale(fault_bytes=4 * MiB, hit_bytes=16 * MiB, pin_bytes=64 * MiB, purge_bytes=32 * MiB,
              write_bytes=8 * MiB, throughput_bytes=8 * MiB, latency_faults=128,
              alternative_chunks=64)


@dataclass(frozen=True)
class Target:
    """The ratio the project aims for: ``ratio <= limit`` (ratios are costs: lower is faster)."""

    limit: float
    text: str

    def met(self, ratio: float) -> bool:
        return ratio <= self.limit


HIT_TARGET = Target(1 / 0.97, "≥ 0.97× plain memory's speed")
NATIVE_64K_TARGET = Target(0.8, "≤ 0.8× anonymous first touch")
NATIVE_4K_TARGET = Target(3.0, "≤ 3× anonymous first touch")
PYTHON_TARGET = Target(1.5, "≤ 1.5× the native source")
PIN_TARGET = Target(1.2, "≤ 1.2× the raw madvise calls")


class Resources:
    """What rows share in one run (the source file), released at the end."""

    def __init__(self) -> None:
        self._stack = contextlib.ExitStack()
        self._file: str | None = None

    def source_file(self, size: int) -> str:
        """A file of at least ``size`` bytes of 0x01, for the File source."""
        if self._file is None or os.path.getsize(self._file) < size:
            handle, path = tempfile.mkstemp(prefix="vrange-bench-")
            with os.fdopen(handle, "wb") as out:
                block = b"\x01" * MiB
                for _ in range(-(-size // MiB)):
                    out.write(block)
            self._stack.callback(os.unlink, path)
            self._file = path
        return self._file

    def close(self) -> None:
        self._stack.close()


@dataclass(frozen=True)
class Row:
    name: str  # unique, slash-separated: group/backend/...; what --rows matches
    group: str
    what: str
    baseline: str
    unit: str
    setup: Callable[[Scale, Resources], contextlib.AbstractContextManager[Pair]]
    target: Target | None = None
    quick: bool = False  # part of --quick's selection
    skip: str | None = None  # why this row cannot run here
    params: dict[str, Any] = field(default_factory=dict)


# --- plain memory ----------------------------------------------------------------------------------

def _anonymous(size: int, huge_pages: bool = False) -> mmap.mmap:
    """Fresh anonymous memory; without ``huge_pages`` it opts out of THP, as a region does."""
    memory = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if not huge_pages and hasattr(mmap, "MADV_NOHUGEPAGE"):
        with contextlib.suppress(OSError):
            memory.madvise(mmap.MADV_NOHUGEPAGE)
    return memory


def _populate(memory: mmap.mmap) -> None:
    try:
        memory.madvise(MADV_POPULATE_WRITE)
    except OSError:  # before 5.14
        touch_pages(buffer_address(memory), len(memory), PAGE, write=True)


def _run_in_threads(targets: list[Callable[[], None]]) -> None:
    """Run each target in a thread of its own and wait until every one has returned, also when a
    Ctrl-C interrupts the wait (the threads touch memory the caller unmaps next), then re-raise it.

    The wait is on an Event each thread sets last, not on Thread.join: a KeyboardInterrupt inside
    join can leave a running thread marked as stopped (CPython 3.11 releases its state lock)."""
    finished = [threading.Event() for _ in targets]

    def run(target: Callable[[], None], done: threading.Event) -> None:
        try:
            target()
        finally:
            done.set()

    threads = [threading.Thread(target=run, args=(target, done), name="vrange-bench-toucher",
                                daemon=True) for target, done in zip(targets, finished)]
    started = []
    interrupted = None
    try:
        for thread in threads:
            thread.start()
            started.append(thread)
    finally:
        for thread, done in zip(started, finished):
            while not done.is_set():
                try:
                    done.wait()
                except KeyboardInterrupt as error:
                    interrupted = error
    if interrupted is not None:
        raise interrupted


# --- fault contexts: each returns the seconds it took to touch every page once ----------------------

def _touch_gil_held(buffer: Any, length: int, backend: str) -> float:
    started = time.perf_counter()
    for offset in range(0, length, PAGE):
        buffer[offset] = 1
    return time.perf_counter() - started


def _touch_gil_released(buffer: Any, length: int, backend: str) -> float:
    return touch_pages(buffer_address(buffer), length, PAGE, write=True) / 1e9


def _touch_other_thread(buffer: Any, length: int, backend: str) -> float:
    address = buffer_address(buffer)
    elapsed: list[int] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            elapsed.append(touch_pages(address, length, PAGE, write=True))
        except BaseException as error:  # noqa: BLE001 - re-raised in the caller's thread
            errors.append(error)

    _run_in_threads([run])
    if errors:
        raise errors[0]
    return elapsed[0] / 1e9


def _touch_random(buffer: Any, length: int, backend: str) -> float:
    """Every page once, in a random order (the same order each time): no forward walk, so no
    fill-ahead; a chunk's first touch faults, its other pages are hits."""
    pages = list(range(length // PAGE))
    random.Random(length).shuffle(pages)
    return touch_pages_in_order(buffer_address(buffer), pages, PAGE) / 1e9


def _touch_syscall(buffer: Any, length: int, backend: str) -> float:
    """os.write of every MiB to a memfd (vrange.io.write on the sigbus backend, where a raw
    syscall on a missing page gets EFAULT)."""
    write = vrange_io.write if backend.startswith("sigbus") and isinstance(buffer, Region) \
        else os.write
    view = memoryview(buffer)
    fd = os.memfd_create("vrange-bench", os.MFD_CLOEXEC)
    try:
        started = time.perf_counter()
        for offset in range(0, length, IO_STEP):
            os.lseek(fd, 0, os.SEEK_SET)
            piece = view[offset:offset + IO_STEP]
            while piece:
                piece = piece[write(fd, piece):]
        return time.perf_counter() - started
    finally:
        view.release()
        os.close(fd)


CONTEXTS: dict[str, tuple[Callable[[Any, int, str], float], str]] = {
    "gil-held": (_touch_gil_held, "a Python loop writes each page (GIL held)"),
    "gil-released": (_touch_gil_released, "a C loop writes each page (GIL released)"),
    "other-thread": (_touch_other_thread, "a C loop in another thread writes each page"),
    "syscall": (_touch_syscall, "os.write from the range (vrange.io.write on sigbus)"),
    "random": (_touch_random, "a C loop writes each page in a random order (no fill-ahead)"),
}
# Contexts measured for native Zeros only (the cost of the mechanism, not of a regenerator).
ZEROS_ONLY_CONTEXTS = {"random"}


# --- regenerators --------------------------------------------------------------------------------

def _python_regenerator(chunk_size: int) -> Callable[[int, memoryview], None]:
    fill = memoryview(b"\x01" * max(chunk_size, DEFAULT_CHUNK))

    def regenerate(offset: int, buffer: memoryview) -> None:
        buffer[:] = fill[:len(buffer)]

    return regenerate


def _regenerator(kind: str, chunk_size: int, size: int, resources: Resources) -> Any:
    if kind == "zeros":
        return Zeros()
    if kind == "file":
        return File(resources.source_file(size))
    return _python_regenerator(chunk_size)


REGENERATORS = {"zeros": "native Zeros", "file": "native File", "python": "Python regenerator"}


# --- fault rows ------------------------------------------------------------------------------------

def _fault_cost(spec: str, kind: str, chunk: int, context: str, size: int,
                resources: Resources, fill_ahead: bool = True) -> Callable[[], float]:
    touch = CONTEXTS[context][0]

    def measure() -> float:
        with Region(size, _regenerator(kind, chunk, size, resources), backend=_backend(spec),
                    chunk_size=chunk, fill_ahead=fill_ahead) as region:
            return touch(region, size, spec) / (size // PAGE) * 1e6

    return measure


def _anonymous_cost(context: str, size: int) -> Callable[[], float]:
    touch = CONTEXTS[context][0]

    def baseline() -> float:
        with _anonymous(size) as memory:
            return touch(memory, size, "anonymous") / (size // PAGE) * 1e6

    return baseline


def _fault_rows(specs: list[str]) -> list[Row]:
    rows = []
    for spec in specs:
        for kind, label in REGENERATORS.items():
            for chunk in FULL.chunks:
                for context, (_, how) in CONTEXTS.items():
                    if context in ZEROS_ONLY_CONTEXTS and kind != "zeros":
                        continue
                    versus_native = kind == "python" and chunk == DEFAULT_CHUNK

                    def setup(scale: Scale, resources: Resources, spec: str = spec,
                              kind: str = kind, chunk: int = chunk, context: str = context,
                              versus_native: bool = versus_native) -> Iterator[Pair]:
                        size = max(scale.fault_bytes, 2 * chunk)
                        measure = _fault_cost(spec, kind, chunk, context, size, resources)
                        base = (_fault_cost(spec, "zeros", chunk, context, size, resources)
                                if versus_native else _anonymous_cost(context, size))
                        yield measure, base

                    target = None
                    if kind == "python" and chunk == DEFAULT_CHUNK:
                        target = PYTHON_TARGET
                    elif kind != "python" and context == "gil-released":
                        target = {DEFAULT_CHUNK: NATIVE_64K_TARGET,
                                  4 * KiB: NATIVE_4K_TARGET}.get(chunk)
                    rows.append(Row(
                        name=f"fault/{spec}/{kind}/{_size(chunk)}/{context}",
                        group="fault",
                        what=f"{label}, {_size(chunk)} chunks on {spec}: {how}",
                        baseline=("native Zeros, same backend, chunk and context" if versus_native
                                  else "anonymous first-touch fault (THP off), same touches"),
                        unit="µs/page",
                        setup=contextlib.contextmanager(setup),
                        target=target,
                        quick=chunk == DEFAULT_CHUNK and (
                            (kind == "zeros" and context == "gil-released")
                            or (kind == "python" and context == "gil-held")),
                        params={"backend": spec, "regenerator": kind, "chunk": chunk,
                                "context": context}))
    return rows


def _floor_rows() -> list[Row]:
    rows = []
    for chunk in FULL.chunks:
        @contextlib.contextmanager
        def setup(scale: Scale, resources: Resources, chunk: int = chunk) -> Iterator[Pair]:
            size = max(scale.fault_bytes, 2 * chunk)
            yield (lambda: uffd_floor(size, chunk) / 1e3 / (size // PAGE),
                   _anonymous_cost("gil-released", size))

        rows.append(Row(
            name=f"floor/{_size(chunk)}", group="floor",
            what=f"minimal C userfaultfd handler (read + UFFDIO_COPY of {_size(chunk)} zeros per "
                 "fault), a C loop writes each page",
            baseline="anonymous first-touch fault (THP off), same touches", unit="µs/page",
            setup=setup, quick=chunk == DEFAULT_CHUNK, params={"chunk": chunk}))
    return rows


def _versus_floor_rows(specs: list[str]) -> list[Row]:
    rows = []
    for spec in specs:
        for chunk in FULL.chunks:
            @contextlib.contextmanager
            def setup(scale: Scale, resources: Resources, spec: str = spec,
                      chunk: int = chunk) -> Iterator[Pair]:
                size = max(scale.fault_bytes, 2 * chunk)
                # One fault per chunk on both sides (no fill-ahead): what the library adds.
                yield (_fault_cost(spec, "zeros", chunk, "gil-released", size, resources,
                                   fill_ahead=False),
                       lambda: uffd_floor(size, chunk) / 1e3 / (size // PAGE))

            rows.append(Row(
                name=f"floor/{spec}/zeros/{_size(chunk)}", group="floor",
                what=f"native Zeros, {_size(chunk)} chunks on {spec}: a C loop writes each page",
                baseline=f"the minimal C userfaultfd handler, {_size(chunk)} per fault",
                unit="µs/page", setup=setup, quick=chunk == DEFAULT_CHUNK and spec == specs[0],
                params={"backend": spec, "regenerator": "zeros", "chunk": chunk,
                        "context": "gil-released"}))
    return rows


def _latency_rows(specs: list[str]) -> list[Row]:
    rows = []
    for spec in specs:
        for chunk in (4 * KiB, 64 * KiB):
            for fraction, statistic in ((0.5, "p50"), (0.99, "p99")):
                @contextlib.contextmanager
                def setup(scale: Scale, resources: Resources, spec: str = spec, chunk: int = chunk,
                          fraction: float = fraction) -> Iterator[Pair]:
                    from ._stats import percentile

                    count = scale.latency_faults
                    size = count * chunk

                    def measure() -> float:
                        with Region(size, Zeros(), backend=_backend(spec),
                                    chunk_size=chunk, fill_ahead=False) as region:  # all faults
                            each = touch_pages_each(region.address, size, chunk, count)
                        return percentile(each, fraction) / 1e3

                    def baseline() -> float:
                        with _anonymous(size) as memory:
                            each = touch_pages_each(buffer_address(memory), size, chunk, count)
                        return percentile(each, fraction) / 1e3

                    yield measure, baseline

                rows.append(Row(
                    name=f"latency/{spec}/{_size(chunk)}/{statistic}", group="latency",
                    what=f"{statistic} latency of one fault, native Zeros, {_size(chunk)} chunks on "
                         f"{spec} (a C loop, one write per chunk)",
                    baseline=f"{statistic} latency of one anonymous first-touch fault",
                    unit="µs", setup=setup,
                    quick=chunk == 4 * KiB and statistic == "p50" and spec == specs[0],
                    params={"backend": spec, "chunk": chunk, "statistic": statistic}))
    return rows


# --- volatility calls ------------------------------------------------------------------------------

def _backend(spec: str) -> BackendName:
    """A backend spec of the run (from ``usable_specs()``; Region checks it), typed for Region."""
    return cast(BackendName, spec)


def _resident_region(spec: str, size: int) -> Region:
    region = Region(size, Zeros(), backend=_backend(spec))
    region.mark_nonvolatile()  # every page present (populated through the regenerator)
    return region


def _pin_rows(specs: list[str]) -> list[Row]:
    rows = []
    for spec in specs:
        @contextlib.contextmanager
        def setup(scale: Scale, resources: Resources, spec: str = spec) -> Iterator[Pair]:
            with _resident_region(spec, scale.pin_bytes) as region, \
                    _anonymous(scale.pin_bytes) as memory:
                _populate(memory)

                def measure() -> float:
                    started = time.perf_counter()
                    region.mark_volatile()
                    region.mark_nonvolatile()
                    return (time.perf_counter() - started) * 1e3

                def baseline() -> float:
                    started = time.perf_counter()
                    memory.madvise(mmap.MADV_FREE)
                    memory.madvise(MADV_POPULATE_WRITE)
                    return (time.perf_counter() - started) * 1e3

                yield measure, baseline

        rows.append(Row(
            name=f"pin/{spec}", group="volatility",
            what=f"mark_volatile() + mark_nonvolatile() of a resident region on {spec}",
            baseline="madvise(MADV_FREE) + madvise(MADV_POPULATE_WRITE) on resident anonymous memory",
            unit="ms", setup=setup, target=PIN_TARGET, quick=spec == specs[0],
            params={"backend": spec}))

        @contextlib.contextmanager
        def purge_setup(scale: Scale, resources: Resources, spec: str = spec) -> Iterator[Pair]:
            with _resident_region(spec, scale.purge_bytes) as region, \
                    _anonymous(scale.purge_bytes) as memory:
                _populate(memory)

                def measure() -> float:
                    region.mark_volatile()
                    started = time.perf_counter()
                    region.purge()
                    elapsed = time.perf_counter() - started
                    region.mark_nonvolatile()  # resident again, for the next repeat
                    return elapsed * 1e3

                def baseline() -> float:
                    started = time.perf_counter()
                    memory.madvise(mmap.MADV_DONTNEED)
                    elapsed = time.perf_counter() - started
                    _populate(memory)
                    return elapsed * 1e3

                yield measure, baseline

        rows.append(Row(
            name=f"purge/{spec}", group="volatility",
            what=f"purge() of a resident volatile region on {spec}",
            baseline="madvise(MADV_DONTNEED) on resident anonymous memory",
            unit="ms", setup=purge_setup, quick=spec == specs[0], params={"backend": spec}))
    return rows


def _write_rows(specs: list[str]) -> list[Row]:
    rows = []
    for spec in specs:
        @contextlib.contextmanager
        def setup(scale: Scale, resources: Resources, spec: str = spec) -> Iterator[Pair]:
            size = scale.write_bytes
            with _resident_region(spec, size) as region:
                def measure() -> float:
                    region.mark_volatile()
                    region.purge()
                    elapsed = _touch_syscall(region, size, spec)
                    region.mark_nonvolatile()
                    return elapsed / (size // PAGE) * 1e6

                def baseline() -> float:
                    return _touch_syscall(region, size, spec) / (size // PAGE) * 1e6

                yield measure, baseline

        call = "vrange.io.write" if spec.startswith("sigbus") else "os.write"
        rows.append(Row(
            name=f"write/{spec}", group="write",
            what=f"{call} of a fully purged region (native Zeros) on {spec}, 1 MiB per call",
            baseline=f"{call} of the same region resident", unit="µs/page", setup=setup,
            quick=spec == specs[0], params={"backend": spec, "call": call}))
    return rows


def _throughput_rows(specs: list[str]) -> list[Row]:
    def touch_in_threads(buffer: Any, size: int, threads: int) -> float:
        """Wall time from the first thread's start to the last one's end."""
        address = buffer_address(buffer)
        part = size // threads
        ends: list[float] = []

        def toucher(index: int) -> Callable[[], None]:
            def run() -> None:
                touch_pages(address + index * part, part, PAGE, write=True)
                ends.append(time.perf_counter())
            return run

        started = time.perf_counter()
        _run_in_threads([toucher(index) for index in range(threads)])
        return max(ends) - started

    rows = []
    for spec in specs:
        for threads in (1, 2):
            @contextlib.contextmanager
            def setup(scale: Scale, resources: Resources, spec: str = spec,
                      threads: int = threads) -> Iterator[Pair]:
                size = scale.throughput_bytes

                def measure() -> float:
                    with Region(size, Zeros(), backend=_backend(spec)) as region:
                        return touch_in_threads(region, size, threads) / (size // PAGE) * 1e6

                def baseline() -> float:
                    with _anonymous(size) as memory:
                        return touch_in_threads(memory, size, threads) / (size // PAGE) * 1e6

                yield measure, baseline

            rows.append(Row(
                name=f"throughput/{spec}/{threads}-thread{'s' if threads > 1 else ''}",
                group="throughput",
                what=f"{threads} thread(s) fault in one region (native Zeros, 64 KiB chunks) on "
                     f"{spec}; wall time per page",
                baseline=f"{threads} thread(s) first-touching anonymous memory", unit="µs/page",
                setup=setup, quick=threads == 2 and spec == specs[0],
                params={"backend": spec, "threads": threads}))
    return rows


# --- hit path --------------------------------------------------------------------------------------

def _numpy() -> Any:
    try:
        import numpy
    except ImportError:
        return None
    return numpy


HIT_SUMS_PER_SAMPLE = 11


def _hit_rows(specs: list[str]) -> list[Row]:
    numpy_missing = None if _numpy() is not None else "skipped: numpy not installed"

    def filled_region(spec: str, size: int) -> Region:
        region = Region(size, _python_regenerator(DEFAULT_CHUNK), backend=_backend(spec))
        region.mark_nonvolatile()  # real pages, every one present
        region.mark_volatile()  # hits on volatile memory: the case that matters
        return region

    @contextlib.contextmanager
    def numpy_sum(buffer: Any) -> Iterator[Callable[[], float]]:
        numpy = _numpy()
        arrays = [numpy.frombuffer(buffer, dtype=numpy.uint64)]

        def run() -> float:
            # One sum takes about 2 ms: a sample is the median of several, so that one timer
            # interrupt or one neighbour's burst does not decide it.
            times = []
            for _ in range(HIT_SUMS_PER_SAMPLE):
                started = time.perf_counter()
                arrays[0].sum()
                times.append(time.perf_counter() - started)
            return sorted(times)[len(times) // 2] * 1e3

        try:
            yield run
        finally:
            arrays.clear()  # the array's buffer export must end before the region closes

    @contextlib.contextmanager
    def memoryview_copy(buffer: Any, size: int) -> Iterator[Callable[[], float]]:
        source = memoryview(buffer)
        target = bytearray(size)

        def run() -> float:
            started = time.perf_counter()
            target[:] = source
            return (time.perf_counter() - started) * 1e3

        try:
            yield run
        finally:
            source.release()

    def numpy_array(size: int) -> Any:
        numpy = _numpy()
        return numpy.ones(size // 8, dtype=numpy.uint64)

    rows = []
    for spec in specs:
        @contextlib.contextmanager
        def sum_setup(scale: Scale, resources: Resources, spec: str = spec) -> Iterator[Pair]:
            with filled_region(spec, scale.hit_bytes) as region, numpy_sum(region) as measure, \
                    numpy_sum(numpy_array(scale.hit_bytes)) as baseline:
                yield measure, baseline

        @contextlib.contextmanager
        def copy_setup(scale: Scale, resources: Resources, spec: str = spec) -> Iterator[Pair]:
            plain = bytearray(b"\x01" * scale.hit_bytes)
            with filled_region(spec, scale.hit_bytes) as region, \
                    memoryview_copy(region, scale.hit_bytes) as measure, \
                    memoryview_copy(plain, scale.hit_bytes) as baseline:
                yield measure, baseline

        rows.append(Row(
            name=f"hit/{spec}/numpy-sum", group="hit",
            what=f"numpy sum (uint64) over a resident volatile region on {spec}",
            baseline="the same sum over a numpy array (numpy asks for huge pages)", unit="ms",
            setup=sum_setup, target=HIT_TARGET, skip=numpy_missing, params={"backend": spec}))
        rows.append(Row(
            name=f"hit/{spec}/memoryview-copy", group="hit",
            what=f"memoryview copy of a resident volatile region on {spec} into a bytearray",
            baseline="the same copy from a bytearray", unit="ms", setup=copy_setup,
            target=HIT_TARGET, quick=spec == specs[0], params={"backend": spec}))

    @contextlib.contextmanager
    def thp_sum_setup(scale: Scale, resources: Resources) -> Iterator[Pair]:
        with _anonymous(scale.hit_bytes) as memory:
            memory.write(b"\x01" * scale.hit_bytes)
            with numpy_sum(memory) as measure, numpy_sum(numpy_array(scale.hit_bytes)) as baseline:
                yield measure, baseline

    @contextlib.contextmanager
    def thp_copy_setup(scale: Scale, resources: Resources) -> Iterator[Pair]:
        with _anonymous(scale.hit_bytes) as memory, \
                _anonymous(scale.hit_bytes, huge_pages=True) as huge:
            if hasattr(mmap, "MADV_HUGEPAGE"):
                with contextlib.suppress(OSError):
                    huge.madvise(mmap.MADV_HUGEPAGE)
            memory.write(b"\x01" * scale.hit_bytes)
            huge.write(b"\x01" * scale.hit_bytes)
            with memoryview_copy(memory, scale.hit_bytes) as measure, \
                    memoryview_copy(huge, scale.hit_bytes) as baseline:
                yield measure, baseline

    rows.append(Row(
        name="hit/no-thp/numpy-sum", group="hit",
        what="numpy sum over plain anonymous memory with MADV_NOHUGEPAGE (as a region has)",
        baseline="the same sum over a numpy array (numpy asks for huge pages)", unit="ms",
        setup=thp_sum_setup, skip=numpy_missing, params={"backend": "none"}))
    rows.append(Row(
        name="hit/no-thp/memoryview-copy", group="hit",
        what="memoryview copy from anonymous memory with MADV_NOHUGEPAGE (as a region has)",
        baseline="the same copy from anonymous memory with MADV_HUGEPAGE", unit="ms",
        setup=thp_copy_setup, params={"backend": "none"}))
    return rows


# --- the alternatives ------------------------------------------------------------------------------

def _alternative_rows(specs: list[str]) -> list[Row]:
    chunk = DEFAULT_CHUNK
    regenerate = _python_regenerator(chunk)

    def read_all(get: Callable[[int], Any], count: int) -> float:
        """Copy every chunk once into an output buffer, in order; seconds."""
        out = bytearray(chunk)
        started = time.perf_counter()
        for index in range(count):
            out[:] = get(index)
        return time.perf_counter() - started

    def region_reader(region: Region) -> Callable[[int], Any]:
        view = memoryview(region)
        return lambda index: view[index * chunk:(index + 1) * chunk]

    class LRU:
        """A dict of bytes with least-recently-used eviction, what a program would write."""

        def __init__(self, capacity: int) -> None:
            self.capacity = capacity
            self.entries: OrderedDict[int, bytes] = OrderedDict()

        def get(self, index: int) -> bytes:
            value = self.entries.get(index)
            if value is not None:
                self.entries.move_to_end(index)
                return value
            buffer = bytearray(chunk)
            regenerate(index * chunk, memoryview(buffer))
            value = bytes(buffer)
            self.entries[index] = value
            if len(self.entries) > self.capacity:
                self.entries.popitem(last=False)
            return value

    def recompute(index: int) -> bytearray:
        buffer = bytearray(chunk)
        regenerate(index * chunk, memoryview(buffer))
        return buffer

    spec = specs[0]
    rows = []

    @contextlib.contextmanager
    def hit_setup(scale: Scale, resources: Resources) -> Iterator[Pair]:
        count = scale.alternative_chunks
        with Region(count * chunk, regenerate, backend=_backend(spec)) as region:
            region.mark_nonvolatile()
            region.mark_volatile()
            cache = LRU(count)
            read_all(cache.get, count)  # every entry present
            per = 1e6 / count
            yield (lambda: read_all(region_reader(region), count) * per,
                   lambda: read_all(cache.get, count) * per)

    @contextlib.contextmanager
    def miss_setup(scale: Scale, resources: Resources) -> Iterator[Pair]:
        count = scale.alternative_chunks
        per = 1e6 / count

        def measure() -> float:
            with Region(count * chunk, regenerate, backend=_backend(spec)) as region:
                return read_all(region_reader(region), count) * per

        def baseline() -> float:
            return read_all(LRU(count).get, count) * per

        yield measure, baseline

    @contextlib.contextmanager
    def recompute_setup(scale: Scale, resources: Resources) -> Iterator[Pair]:
        count = scale.alternative_chunks
        with Region(count * chunk, regenerate, backend=_backend(spec)) as region:
            region.mark_nonvolatile()
            region.mark_volatile()
            per = 1e6 / count
            yield (lambda: read_all(region_reader(region), count) * per,
                   lambda: read_all(recompute, count) * per)

    common = f"copy each 64 KiB chunk of a region on {spec} (Python regenerator) into a bytearray"
    rows.append(Row(
        name="alternatives/lru-hit", group="alternatives", what=f"{common}, every chunk resident",
        baseline="the same from a dict/LRU of bytes holding every chunk", unit="µs/chunk",
        setup=hit_setup, quick=True, params={"backend": spec, "chunk": chunk}))
    rows.append(Row(
        name="alternatives/lru-miss", group="alternatives",
        what=f"{common}, every chunk missing (a fresh region)",
        baseline="the same from an empty dict/LRU of bytes (regenerate, store, evict)",
        unit="µs/chunk", setup=miss_setup, params={"backend": spec, "chunk": chunk}))
    rows.append(Row(
        name="alternatives/recompute", group="alternatives", what=f"{common}, every chunk resident",
        baseline="recompute the chunk on every access", unit="µs/chunk", setup=recompute_setup,
        params={"backend": spec, "chunk": chunk}))
    return rows


def _size(nbytes: int) -> str:
    return f"{nbytes // MiB}M" if nbytes >= MiB else f"{nbytes // KiB}K"


GROUPS = {
    "hit": "Hit path: resident volatile memory vs plain memory",
    "fault": "Fault cost per 4 KiB page",
    "floor": "The \"no library\" floor: a minimal C userfaultfd handler",
    "latency": "Single-fault latency",
    "volatility": "Volatility calls vs the raw madvise calls",
    "write": "System calls on a purged range",
    "throughput": "Fault throughput with 1 and 2 faulting threads",
    "alternatives": "The alternatives: a dict/LRU of bytes, recomputing",
}


def all_rows() -> list[Row]:
    """Every row this machine knows, in report order; rows that cannot run carry ``skip``."""
    specs = usable_specs()
    if not specs:
        return []
    rows = (_hit_rows(specs) + _fault_rows(specs) + _floor_rows() + _versus_floor_rows(specs)
            + _latency_rows(specs)
            + _pin_rows(specs) + _write_rows(specs) + _throughput_rows(specs)
            + _alternative_rows(specs))
    try:
        uffd_floor(2 * DEFAULT_CHUNK, DEFAULT_CHUNK)
    except VRangeError as error:
        rows = [dataclasses.replace(row, skip=f"skipped: {error}") if row.group == "floor" else row
                for row in rows]
    return rows


__all__ = ["FULL", "QUICK", "GROUPS", "Resources", "Row", "Scale", "Target", "all_rows"]
