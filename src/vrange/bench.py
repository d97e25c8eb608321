"""``python -m vrange bench``: per-page fault cost of each backend and regenerator kind.

Every figure is reported next to a baseline measured in the same run (an anonymous first-touch
fault over the same number of pages, touched the same way), because the machines are shared and
noisy: compare ratios, not microseconds across runs.
"""

from __future__ import annotations

import mmap
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

from ._backends import buffer_address, features
from ._backends._memory import touch_pages
from .region import Region
from .sources import Zeros

PAGE = mmap.PAGESIZE


@dataclass(frozen=True)
class BenchResult:
    name: str
    backend: str
    chunk_size: int
    context: str
    pages: int
    microseconds_per_page: float
    baseline_microseconds_per_page: float

    @property
    def ratio(self) -> float:
        return self.microseconds_per_page / self.baseline_microseconds_per_page


def _touch_native(address: int, length: int) -> float:
    """Seconds to write one byte of every page, from C, with the GIL released."""
    return touch_pages(address, length, PAGE, write=True) / 1e9


def _touch_python(buffer: mmap.mmap, length: int) -> float:
    """Seconds to write one byte of every page from Python (the GIL held during each fault)."""
    started = time.perf_counter()
    for offset in range(0, length, PAGE):
        buffer[offset] = 1
    return time.perf_counter() - started


def _anonymous_baseline(length: int, python_loop: bool) -> float:
    anonymous = mmap.mmap(-1, length, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        if python_loop:
            return _touch_python(anonymous, length)
        return _touch_native(buffer_address(anonymous), length)
    finally:
        anonymous.close()


def _spec(region: Region) -> str:
    return f"{region.backend}:{region.trap}" if region.trap else region.backend


def _measure(name: str, make: Callable[[int, int], Region], chunk_size: int, length: int,
             python_loop: bool, context: str, repeats: int) -> BenchResult:
    timings, baselines = [], []
    backend = "?"
    for _ in range(repeats):
        baselines.append(_anonymous_baseline(length, python_loop))
        with make(length, chunk_size) as region:
            backend, chunk_size = _spec(region), region.chunk_size
            if python_loop:
                timings.append(_touch_python(region, length))
            else:
                timings.append(_touch_native(region.address, length))
    pages = length // PAGE
    return BenchResult(name, backend, chunk_size, context, pages,
                       statistics.median(timings) / pages * 1e6,
                       statistics.median(baselines) / pages * 1e6)


def _python_regenerator(chunk_size: int) -> Callable[[int, memoryview], None]:
    fill = b"\x01" * chunk_size

    def regenerate(offset: int, buffer: memoryview) -> None:
        buffer[:] = fill[:len(buffer)]

    return regenerate


def _native_context(backend: str) -> str:
    return "handler thread" if backend == "uffd" else "faulting thread"


def _python_context(backend: str) -> str:
    return "worker thread" if backend == "uffd" else "faulting thread"


def run(quick: bool = False) -> tuple[list[BenchResult], float]:
    """Run every case; returns the results and the median feature-probe time in seconds."""
    repeats = 1 if quick else 3
    native_length = (8 if quick else 32) << 20  # 8192 pages: the memfd trap keeps 4 KiB chunks
    python_length = (2 if quick else 16) << 20
    results = []
    report = features()
    backends = [spec for spec in ("uffd", "sigbus:uffd", "sigbus:memfd")
                if report.backend(spec.partition(":")[0]).usable
                and (":" not in spec or report.trap(spec.partition(":")[2]).usable)]
    for chunk_size in (PAGE, 64 * 1024):
        for backend in backends:
            def native(size: int, chunk: int, name: str = backend) -> Region:
                return Region(size, Zeros(), backend=name, chunk_size=chunk)

            def python(size: int, chunk: int, name: str = backend) -> Region:
                return Region(size, _python_regenerator(chunk), backend=name, chunk_size=chunk)

            results += [
                _measure("native Zeros", native, chunk_size, native_length, False,
                         "no GIL, " + _native_context(backend), repeats),
                _measure("Python regenerator", python, chunk_size, python_length, False,
                         "no GIL, " + _python_context(backend), repeats),
                _measure("Python regenerator", python, chunk_size, python_length, True,
                         "GIL held, faulting thread", repeats),
            ]
    probe_times = []
    for _ in range(5):
        started = time.perf_counter()
        features(refresh=True)
        probe_times.append(time.perf_counter() - started)
    return results, statistics.median(probe_times)


def format_results(results: list[BenchResult], probe_seconds: float) -> str:
    lines = [
        "Per-page cost of serving a fault (median of runs; baseline = anonymous first-touch write",
        "fault over the same pages, touched the same way (C loop or Python loop), in the same run)",
        "",
        f"{'regenerator':<20}{'backend':<14}{'chunk':>7}  {'context':<27}{'pages':>7}"
        f"{'us/page':>10}{'baseline':>10}{'ratio':>8}",
    ]
    for result in results:
        lines.append(
            f"{result.name:<20}{result.backend:<14}{result.chunk_size // 1024:>5}Ki  "
            f"{result.context:<27}{result.pages:>7}{result.microseconds_per_page:>10.2f}"
            f"{result.baseline_microseconds_per_page:>10.2f}{result.ratio:>8.1f}")
    lines += ["", f"vrange.features() full probe: {probe_seconds * 1000:.1f} ms (median of 5)"]
    return "\n".join(lines)
