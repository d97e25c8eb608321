"""``python -m vrange demo``: a cache the kernel may take back, refilled transparently."""

from __future__ import annotations

import errno
import hashlib
import os
import threading
import time
from collections.abc import Callable

from . import io as vrange_io
from ._features import features
from .region import Region
from .testing import page_out

CACHE_BYTES = 64 << 20


def _expensive_chunk(offset: int, buffer: memoryview) -> None:
    """Stands for real work (decompressing, decoding, rendering): a hash chain per chunk."""
    seed = hashlib.sha256(offset.to_bytes(8, "little")).digest()
    buffer[:] = (seed * (len(buffer) // len(seed) + 1))[:len(buffer)]


def _mib(value: int) -> str:
    return f"{value / (1 << 20):.1f} MiB"


def _write_from_purged_memory(cache: Region) -> str:
    """Write 4 MiB of purged memory to a pipe, raw and through vrange.io."""
    read_end, write_end = os.pipe()
    received: list[int] = []
    drain = threading.Thread(target=lambda: received.append(
        sum(len(block) for block in iter(lambda: os.read(read_end, 1 << 20), b""))))
    drain.start()
    view = memoryview(cache)
    try:
        written = os.write(write_end, view[:4 << 20])
        outcome = (f"os.write() straight from purged memory wrote {_mib(written)} (the syscall "
                   "waited for the refill instead of failing with EFAULT)")
    except OSError as error:
        written = vrange_io.write(write_end, view[:4 << 20])
        outcome = (f"os.write() from purged memory failed with {errno.errorcode[error.errno or 0]}"
                   f" (this backend's documented limit); vrange.io.write() refilled and wrote "
                   f"{_mib(written)}")
    finally:
        view.release()
        os.close(write_end)
        drain.join()
        os.close(read_end)
    return outcome


def run(say: Callable[[str], None] = print) -> bool:
    """Run the demo; True when every byte read back was right."""
    report = features()
    if report.auto_backend is None:
        say(f"No backend can run here: {report.auto_reason}")
        say("Run `python -m vrange features` for the details.")
        return False
    with Region(CACHE_BYTES, _expensive_chunk) as cache:
        chosen_by = os.environ.get("VRANGE_BACKEND")
        spec = f"{cache.backend}:{cache.trap}" if cache.trap else cache.backend
        say(f"Backend: {spec} (from $VRANGE_BACKEND)" if chosen_by
            else f"Backend: {report.auto_reason}")
        started = time.perf_counter()
        first_pass = hashlib.sha256(cache[:]).hexdigest()
        stats = cache.stats()
        say(f"1. A {_mib(len(cache))} cache, filled on first access by a Python regenerator in "
            f"{(time.perf_counter() - started) * 1000:.0f} ms ({stats.faults_served} faults, "
            f"{_mib(stats.resident_bytes)} resident)")

        cache.mark_volatile()
        who = "the kernel" if cache.kernel_reclaims else "vrange"
        say(f"2. Marked volatile: {who} may now take back {_mib(cache.stats().volatile_bytes)}")

        if cache.kernel_reclaims:
            page_out(cache)  # what memory pressure does; the kernel decides by itself
            how = "The kernel reclaimed it (MADV_PAGEOUT, as under memory pressure)"
        else:
            cache.purge()
            how = "vrange purged it (the kernel cannot reclaim the memfd trap's pages)"
        stats = cache.stats()
        say(f"3. {how}: {_mib(stats.resident_bytes)} resident, {_mib(stats.purged_bytes)} purged")

        say("4. " + _write_from_purged_memory(cache))

        started = time.perf_counter()
        second_pass = hashlib.sha256(cache[:]).hexdigest()
        stats = cache.stats()
        correct = second_pass == first_pass
        say(f"5. Read it all again: {'every byte right' if correct else 'BYTES DIFFER'} in "
            f"{(time.perf_counter() - started) * 1000:.0f} ms; {stats.purges} chunks had been "
            f"purged and were regenerated ({stats.faults_on_faulting_thread} on the faulting "
            f"thread, {stats.faults_on_worker_thread} on a worker)")

        purged = cache.mark_nonvolatile(report=True)
        say(f"6. mark_nonvolatile(report=True): {len(purged)} purged range(s) since step 2; "
            f"the cache is pinned again ({_mib(cache.stats().nonvolatile_bytes)} non-volatile)")
    return correct
