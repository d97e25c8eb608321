"""Fault injection against today's changes: lazy-free after fills, parking at exit, the uffd
self-fault recheck. Each test failed before the fix next to it (see the commit that added it)."""

from __future__ import annotations

import os
import threading

import pytest
from conftest import CHUNK, pattern, resident_pages

import vrange
import vrange.io
from vrange._backends._memory import touch_pages
from vrange.sources import Zeros
from vrange.testing import page_out

ROUNDS = 60
SIZE = 2 * CHUNK


def python_pattern(offset: int, buf: memoryview) -> None:
    buf[:] = pattern(offset, len(buf))


def kept_after_page_out(region: vrange.Region) -> list[int]:
    page_out(region)
    return [index for index, resident in enumerate(resident_pages(region)) if resident]


# --- lazy-free: a page_out right after an access that refilled a volatile chunk ------------------
#
# On the uffd backend a refill of a volatile chunk wakes the faulting thread first and makes the
# chunk lazy-free (MADV_FREE) after. The woken thread may call page_out before that MADV_FREE (or
# while the MADV_FREE'd pages still sit in the refilling CPU's lazy-free batch): the kernel's
# isolation for MADV_PAGEOUT then makes MADV_FREE skip the pages (it skips a locked or isolated
# folio), and they stay resident for good though vrange counts them volatile. It happened in 5% to
# 20% of rounds (native source: read, fill-ahead walk, prefault).


def _read(region: vrange.Region) -> None:
    assert bytes(region[:]) == bytes(SIZE)


def _walk(region: vrange.Region) -> None:
    touch_pages(region.address, SIZE, 4096, False)


def _prefault(region: vrange.Region) -> None:
    region.prefault()


@pytest.mark.requires("kernel_reclaims", "(it makes the kernel discard pages)")
@pytest.mark.parametrize("access", [_read, _walk, _prefault], ids=["read", "walk", "prefault"])
def test_page_out_right_after_a_volatile_refill_reclaims_it(backend: str, access) -> None:
    for round_number in range(ROUNDS):
        with vrange.Region(SIZE, Zeros(), backend=backend) as region:  # type: ignore[arg-type]
            region.mark_volatile()
            region.purge()
            access(region)
            assert kept_after_page_out(region) == [], f"round {round_number}"
            assert bytes(region[:]) == bytes(SIZE)


@pytest.mark.requires("kernel_reclaims", "(it makes the kernel discard pages)")
def test_page_out_right_after_a_syscall_refill_reclaims_it(backend: str) -> None:
    """A Python regenerator on a worker (uffd: a syscall reads the purged chunks)."""
    for round_number in range(ROUNDS // 2):
        with vrange.Region(SIZE, python_pattern, backend=backend) as region:  # type: ignore[arg-type]
            region.mark_volatile()
            region.purge()
            read_end, write_end = os.pipe()
            got = bytearray()

            def drain() -> None:
                while chunk := os.read(read_end, 1 << 20):
                    got.extend(chunk)

            reader = threading.Thread(target=drain)
            reader.start()
            try:
                vrange.io.write(write_end, region)
            finally:
                os.close(write_end)
                reader.join()
                os.close(read_end)
            assert bytes(got) == pattern(0, SIZE)
            assert kept_after_page_out(region) == [], f"round {round_number}"



# --- parking at exit (sigbus): an atexit handler that runs after vrange's joins a faulting thread --
#
# atexit handlers run last-registered first: one registered before vrange was imported runs after
# vrange's own, with the interpreter still whole. A common one stops a daemon worker and joins it.
# If the worker faults on a purged chunk with a Python regenerator in between, it must be served (the
# sigbus backend parked it for good once vrange's atexit had run, and the join never returned).

JOIN_IN_LATE_ATEXIT = """
    import atexit, threading, time
    stop = threading.Event()
    def stop_worker():                  # registered before vrange: runs after vrange's atexit
        time.sleep(0.2)                 # the worker keeps faulting meanwhile
        stop.set()
        worker.join()
        print("joined", flush=True)
    atexit.register(stop_worker)
    import vrange
    from vrange._backends._memory import touch_pages
    def regenerate(offset, buf):
        buf[:] = bytes([offset // 65536 % 251 + 1]) * len(buf)
    region = vrange.Region(64 * 65536, regenerate, backend={backend!r})
    region.mark_volatile()
    def walk():
        while not stop.is_set():
            region.purge()
            touch_pages(region.address, 64 * 65536, 4096, False)   # the GIL released
    worker = threading.Thread(target=walk, daemon=True)
    worker.start()
    time.sleep(0.1)
    print("exiting", flush=True)
"""


@pytest.mark.hang_timeout(90)
def test_a_late_atexit_handler_can_join_a_thread_that_faults(backend: str) -> None:
    import subprocess

    from conftest import run_python
    try:
        result = run_python(JOIN_IN_LATE_ATEXIT.format(backend=backend), timeout=20)
    except subprocess.TimeoutExpired:
        pytest.fail("the process hung at exit")
    assert (result.returncode, result.stdout) == (0, "exiting\njoined\n"), result.stderr[-3000:]
