"""A derived numpy array cache: an array computed from a source array, kept in a ``vrange.Region``.

A program often keeps arrays it derived from its data (distances, norms, normalized copies) because
recomputing them costs time, though they could always be recomputed. Here the derived array (the
distance of each point of a source array of 2-D points from the origin) lives in a volatile
:class:`vrange.Region`, used through ``numpy.frombuffer``: the kernel (or vrange) may take any chunk
of it back under pressure, and the next read of the view recomputes that chunk from the source. The
example reads the view, purges the region (and has the kernel reclaim it, where it does for this
backend), reads it again and checks it against the array computed in one go; the exit status is 1
if a value differs.

numpy lets the GIL go while it computes on large arrays, and a regenerator that lets the GIL go
while it serves the fault of a thread that holds the GIL is unsound (another thread may run in the
middle of the statement that faulted). So the regenerator runs in a helper process,
``vrange.sources.Isolated("numpy_derived:derive_chunk", path)``, which maps the source array from
its ``.npy`` file (docs/design.md, "Which regenerators are sound where"). The distance is computed
with ``*``, ``+`` and ``sqrt`` only, which IEEE 754 rounds exactly, so a chunk recomputed alone
holds exactly the bytes of the array computed whole.

    python examples/numpy_derived.py            # 4 Mi points: a 32 MiB derived array
    python examples/numpy_derived.py --small    # 256 Ki points: 2 MiB
"""

from __future__ import annotations

import argparse
import functools
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

import vrange
import vrange.testing

CHUNK = 64 << 10  # the region's chunk: 8192 derived values

sys.path.insert(0, str(Path(__file__).resolve().parent))  # importable as numpy_derived (the helper)
TARGET = f"{Path(__file__).stem}:derive_chunk"


def derive(points: np.ndarray) -> np.ndarray:
    """The derived array: each point's distance from the origin (exactly rounded operations)."""
    x, y = points[:, 0], points[:, 1]
    distances: np.ndarray = np.sqrt(x * x + y * y)
    return distances


@functools.lru_cache(maxsize=4)
def _source(path: str) -> np.ndarray:
    points: np.ndarray = np.load(path, mmap_mode="r")
    return points


def derive_chunk(offset: int, buf: memoryview, path: str) -> None:
    """The regenerator (run in the helper process): the derived values of the region's bytes from
    ``offset``."""
    points = _source(path)
    first = offset // 8
    count = min(len(buf) // 8, len(points) - first)
    out = np.frombuffer(buf, dtype=np.float64)
    out[:count] = derive(points[first:first + count])


def main(argv: Sequence[str] | None = None) -> int:
    """Run the example; 0 when every value read was right, 1 otherwise."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--small", action="store_true", help="256 Ki points, in a few seconds")
    args = parser.parse_args(argv)
    count = (256 if args.small else 4096) << 10
    points = np.random.default_rng(2014).normal(scale=100.0, size=(count, 2))
    expected = derive(points)
    wrong = 0
    with tempfile.TemporaryDirectory() as temporary:
        path = str(Path(temporary) / "points.npy")
        np.save(path, points)
        source = vrange.sources.Isolated(TARGET, path)
        with vrange.Region(expected.nbytes, source, chunk_size=CHUNK) as region:
            distances = np.frombuffer(region, dtype=np.float64)  # a view: no copy
            started = time.perf_counter()
            print(f"{count} points; mean distance {distances.mean():.3f}, farthest "
                  f"{distances.max():.3f} (computed chunk by chunk on first read, "
                  f"{time.perf_counter() - started:.2f} s)")
            wrong += not np.array_equal(distances, expected)
            computed = region.stats().faults_served

            region.mark_volatile()  # from now on the kernel (or vrange) may take chunks back
            print(f"purge() gave back {region.purge() >> 10} KiB (as memory pressure would)")
            near = int(np.count_nonzero(distances < 100.0))  # the view's next read recomputes
            wrong += not np.array_equal(distances, expected)
            print(f"{near} points within 100 of the origin; "
                  f"{region.stats().faults_served - computed} chunks recomputed for that read")

            if region.kernel_reclaims:
                before = region.stats().faults_served
                vrange.testing.page_out(region)  # the kernel's own reclaim
                wrong += not np.array_equal(distances, expected)
                print(f"after the kernel reclaimed the region (page_out): "
                      f"{region.stats().faults_served - before} chunks recomputed")
            stats = region.stats()
            reclaim = "the kernel reclaims it" if region.kernel_reclaims else "vrange purges it"
            print(f"backend {region.backend} ({reclaim}): {stats.faults_served} chunks computed "
                  f"in all, {stats.purges} purged")
            del distances  # the view exports the region: release it before the region closes
    verdict = f"WRONG: {wrong} read(s) of the derived array differ" if wrong else \
        "every value read was right"
    print(verdict, file=sys.stderr if wrong else sys.stdout)
    return min(wrong, 1)


if __name__ == "__main__":
    sys.exit(main())
