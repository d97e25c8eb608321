"""Every page vrange marks volatile is one the kernel can take back, however recently it was filled.

A page a fill installs waits in its CPU's LRU batch before it joins an LRU list; MADV_FREE skips a
page that is not on a list yet, and with no swap such a page is never reclaimed. The uffd backend's
fills run on other threads (the handler thread, workers) than the one that marks the range volatile:
they must put their pages on the lists first (docs/design.md#lazy-free-and-the-lru-batches).

Each scenario is repeated: one round failed about 1 time in 20 before the fix (a page left resident
after ``page_out``), so 60 rounds fail with a probability near 95% if the fix is undone.
"""

from __future__ import annotations

import threading

import pytest
from conftest import CHUNK, pattern, resident_pages

import vrange
from vrange.sources import Zeros
from vrange.testing import page_out

ROUNDS = 60
SIZE = 2 * CHUNK


def python_pattern(offset: int, buf: memoryview) -> None:
    buf[:] = pattern(offset, len(buf))


def assert_all_paged_out(region: vrange.Region, round_number: int) -> None:
    page_out(region)
    kept = [index for index, resident in enumerate(resident_pages(region)) if resident]
    assert kept == [], f"round {round_number}: pages {kept} stayed after page_out"


@pytest.mark.requires("kernel_reclaims", "(it makes the kernel discard pages)")
def test_native_fills_are_reclaimable_when_marked_volatile_at_once(backend: str) -> None:
    """A native source: the uffd handler thread fills each faulting chunk."""
    for round_number in range(ROUNDS):
        with vrange.Region(SIZE, Zeros(), backend=backend) as region:  # type: ignore[arg-type]
            region.mark_nonvolatile(populate=False)
            assert bytes(region[:]) == bytes(SIZE)          # faults: filled by the backend
            region.mark_volatile()
            assert_all_paged_out(region, round_number)
            assert bytes(region[:]) == bytes(SIZE)          # and refilled


@pytest.mark.requires("kernel_reclaims", "(it makes the kernel discard pages)")
def test_pinned_fills_are_reclaimable_when_unpinned_at_once(backend: str) -> None:
    """A Python regenerator: mark_nonvolatile fills the range, mark_volatile follows at once."""
    for round_number in range(ROUNDS):
        with vrange.Region(SIZE, python_pattern, backend=backend) as region:  # type: ignore[arg-type]
            region.mark_nonvolatile()
            region.mark_volatile()
            assert_all_paged_out(region, round_number)
            assert bytes(region[:]) == pattern(0, SIZE)


@pytest.mark.requires("kernel_reclaims", "(it makes the kernel discard pages)")
def test_fills_for_another_thread_are_reclaimable(backend: str) -> None:
    """Another thread faults the chunks in (its fills may run on any CPU); this one marks them."""
    for round_number in range(ROUNDS // 3):
        with vrange.Region(SIZE, python_pattern, backend=backend) as region:  # type: ignore[arg-type]
            region.mark_nonvolatile(populate=False)
            reader = threading.Thread(target=lambda: region[:])
            reader.start()
            reader.join()
            region.mark_volatile()
            assert_all_paged_out(region, round_number)
            assert bytes(region[:]) == pattern(0, SIZE)
