"""Counted pins: mark_nonvolatile/mark_volatile, Region.pinned() blocks, cheap pins that do not
fill (populate=False), and how pins meet purge(), the kernel's purges, the pressure policy and fork
(docs/pins.md), on every backend."""

from __future__ import annotations

import os
import threading

import pytest
from conftest import (CHUNK, PAGE, CountingRegenerator, assert_pages_match, kernel_reclaims,
                      pattern, resident_pages)

import vrange
import vrange.policy
from vrange.testing import page_out

SIZE = 8 * CHUNK


def make(backend: str, regenerator: CountingRegenerator, size: int = SIZE,
         **options: object) -> vrange.Region:
    return vrange.Region(size, regenerator, backend=backend, **options)  # type: ignore[arg-type]


def discard_volatile(region: vrange.Region, how: str) -> None:
    """Discard the region's volatile chunks: vrange's purge, or the kernel (MADV_PAGEOUT)."""
    if how == "purge":
        region.purge()
    else:
        page_out(region)


def discard_kinds(backend: str) -> list[str]:
    return ["purge", "kernel"] if kernel_reclaims(backend) else ["purge"]


def chunk_volatile(region: vrange.Region, chunk: int) -> bool:
    return bool(region._core.chunk_states()[chunk] & 1)  # VR_CHUNK_VOLATILE


# --- counting ------------------------------------------------------------------------------------


def test_two_pins_and_one_unpin_leave_the_range_pinned(backend: str,
                                                       regenerator: CountingRegenerator) -> None:
    with make(backend, regenerator) as region:
        region.mark_nonvolatile()
        region.mark_nonvolatile()
        assert region.pin_count(0) == 2
        region.mark_volatile()
        assert region.pin_count(0) == 1
        assert not chunk_volatile(region, 0)
        assert region.purge() == 0                       # still pinned
        region.mark_volatile()
        assert region.pin_count(0) == 0
        assert chunk_volatile(region, 0)
        assert region.purge() == SIZE
        region.mark_volatile()                            # releasing an unpinned chunk: allowed
        assert region.pin_count(0) == 0
        assert region.mark_nonvolatile() is True          # the purge is reported once
        assert region.pin_count(0) == 1
        assert_pages_match(region, pattern(0, SIZE))


def test_a_new_region_is_unpinned_and_nonvolatile(backend: str,
                                                  regenerator: CountingRegenerator) -> None:
    with make(backend, regenerator) as region:
        assert region.pin_count(0) == 0
        assert region.stats().nonvolatile_bytes == SIZE
        region.mark_volatile()                            # one call makes it volatile
        assert region.stats().volatile_bytes == SIZE


def test_mark_volatile_releases_whole_chunks_only(backend: str,
                                                  regenerator: CountingRegenerator) -> None:
    with make(backend, regenerator) as region:
        region.mark_nonvolatile(0, PAGE)                  # widened: pins chunk 0
        assert region.pin_count(0) == 1
        region.mark_volatile(0, PAGE)                     # rounded inward: releases nothing
        assert region.pin_count(0) == 1
        region.mark_volatile(0, CHUNK)
        assert region.pin_count(0) == 0
        assert chunk_volatile(region, 0)


def test_pin_count_checks_its_argument(backend: str, regenerator: CountingRegenerator) -> None:
    with make(backend, regenerator) as region:
        with pytest.raises(ValueError):
            region.pin_count(SIZE)
        with pytest.raises(TypeError):
            region.pin_count("0")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        region.pin_count(0)


# --- pinned() ------------------------------------------------------------------------------------


def test_pinned_yields_the_exact_range_and_releases_it(backend: str,
                                                       regenerator: CountingRegenerator) -> None:
    region = make(backend, regenerator)
    with region.pinned(PAGE, 3 * PAGE) as pin:
        assert isinstance(pin, vrange.Pin)
        assert pin.active and pin.offset == PAGE and pin.length == 3 * PAGE
        assert len(pin.view) == 3 * PAGE and not pin.view.readonly
        assert bytes(pin.view) == pattern(PAGE, 3 * PAGE)
        pin.view[:4] = b"mine"
        assert region.pin_count(0) == 1
    assert not pin.active
    with pytest.raises(ValueError):
        pin.view                                          # released
    assert bytes(region[PAGE:PAGE + 4]) == b"mine"      # kept: the chunk was not volatile
    region.close()                                        # no export outlives the block
    assert region.closed


def test_pinned_releases_its_view_when_the_block_raises(backend: str,
                                                        regenerator: CountingRegenerator) -> None:
    region = make(backend, regenerator)
    region.mark_volatile()
    with pytest.raises(KeyError):
        with region.pinned() as pin:
            raise KeyError("boom")
    assert region.pin_count(0) == 0
    assert chunk_volatile(region, 0)                      # volatile again
    region.close()
    assert not pin.active


def test_an_export_kept_past_the_block_reads_right_but_keeps_the_region_open(
        backend: str, regenerator: CountingRegenerator) -> None:
    region = make(backend, regenerator)
    region.mark_volatile()
    with region.pinned(0, CHUNK) as pin:
        kept = pin.view[:PAGE]                            # a slice outlives the block
    assert region.pin_count(0) == 0
    region.purge()
    assert bytes(kept) == pattern(0, PAGE)                # refilled on access: right bytes
    with pytest.raises(BufferError):
        region.close()
    kept.release()
    region.close()


def test_pinned_restores_the_previous_volatility(backend: str,
                                                 regenerator: CountingRegenerator) -> None:
    with make(backend, regenerator) as region:
        with region.pinned(0, 2 * CHUNK):                  # over non-volatile chunks
            pass
        assert not chunk_volatile(region, 0)
        assert region.purge() == 0                         # still non-volatile: nothing to purge
        region.prefault()
        region.mark_volatile()
        with region.pinned(0, 2 * CHUNK) as pin:
            assert not pin.purged
            assert region.purge() == 6 * CHUNK             # only the unpinned ones
            assert not chunk_volatile(region, 0) and chunk_volatile(region, 2)
        assert chunk_volatile(region, 0) and chunk_volatile(region, 1)
        assert region.purge() == 2 * CHUNK


def test_nested_blocks_keep_the_range_pinned_until_the_last_ends(
        backend: str, regenerator: CountingRegenerator) -> None:
    with make(backend, regenerator) as region:
        region.prefault()
        region.mark_volatile()
        with region.pinned(0, 2 * CHUNK):
            with region.pinned(CHUNK, 2 * CHUNK):
                assert [region.pin_count(c * CHUNK) for c in range(4)] == [1, 2, 1, 0]
            assert [region.pin_count(c * CHUNK) for c in range(4)] == [1, 1, 0, 0]
            assert region.purge(0, 3 * CHUNK) == CHUNK    # chunk 2 only
            region.mark_volatile(0, 2 * CHUNK)           # cannot release a block's pin
            assert region.purge(0, 2 * CHUNK) == 0
        assert region.purge(0, 2 * CHUNK) == 2 * CHUNK
        assert_pages_match(region, pattern(0, SIZE))


def test_mark_volatile_inside_a_block_takes_effect_when_it_ends(
        backend: str, regenerator: CountingRegenerator) -> None:
    with make(backend, regenerator) as region:
        with region.pinned(0, CHUNK):
            region.mark_volatile(0, CHUNK)
            assert not chunk_volatile(region, 0)
        assert chunk_volatile(region, 0)
        region.mark_nonvolatile(0, CHUNK)
        with region.pinned(0, CHUNK):
            pass
        assert not chunk_volatile(region, 0)               # mark_nonvolatile's pin stays
        assert region.pin_count(0) == 1


def test_concurrent_blocks_on_overlapping_ranges(backend: str) -> None:
    regenerator = CountingRegenerator()
    with make(backend, regenerator) as region:
        region.prefault()
        region.mark_volatile()
        entered = threading.Barrier(3)
        leave = [threading.Event(), threading.Event()]

        def hold(index: int, offset: int) -> None:
            with region.pinned(offset, 2 * CHUNK) as pin:
                assert bytes(pin.view[:PAGE]) == pattern(offset, PAGE)
                entered.wait()
                leave[index].wait(20)

        threads = [threading.Thread(target=hold, args=(0, 0)),
                   threading.Thread(target=hold, args=(1, CHUNK))]
        for thread in threads:
            thread.start()
        entered.wait()
        assert [region.pin_count(c * CHUNK) for c in range(3)] == [1, 2, 1]
        leave[0].set()
        threads[0].join()
        assert region.purge(0, 3 * CHUNK) == CHUNK        # chunk 0 only: 1 and 2 still held
        leave[1].set()
        threads[1].join()
        assert region.purge() == 2 * CHUNK + 5 * CHUNK    # chunks 1-2, and 3-7
        assert_pages_match(region, pattern(0, SIZE))


def test_many_threads_pinning_and_unpinning(backend: str) -> None:
    """Counts stay exact under contention: every block ends, so every chunk ends unpinned and
    volatile (as before the blocks), every mark_nonvolatile is released by a mark_volatile."""
    regenerator = CountingRegenerator()
    with make(backend, regenerator) as region:
        region.mark_volatile()
        errors: list[BaseException] = []

        def work(seed: int) -> None:
            try:
                for step in range(30):
                    first = (seed + step) % 6
                    with region.pinned(first * CHUNK, 2 * CHUNK, populate=bool(step % 2)) as pin:
                        assert bytes(pin.view[-PAGE:]) == pattern((first + 2) * CHUNK - PAGE, PAGE)
                    region.mark_nonvolatile(first * CHUNK, CHUNK, populate=bool(step % 3))
                    region.purge()
                    region.mark_volatile(first * CHUNK, CHUNK)
            except BaseException as error:  # noqa: BLE001 - reported below
                errors.append(error)

        threads = [threading.Thread(target=work, args=(seed,)) for seed in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert not errors, errors
        assert all(region.pin_count(c * CHUNK) == 0 for c in range(8))
        assert all(chunk_volatile(region, c) for c in range(8))
        assert_pages_match(region, pattern(0, SIZE))


# --- what a pin reports, and what never purges a pinned chunk ------------------------------------


@pytest.mark.parametrize("populate", [True, False])
def test_pins_report_purges(backend: str, populate: bool) -> None:
    for how in discard_kinds(backend):
        regenerator = CountingRegenerator()
        with make(backend, regenerator) as region:
            region.mark_nonvolatile()
            region.mark_volatile()
            discard_volatile(region, how)
            with region.pinned(0, 2 * CHUNK, populate=populate) as pin:
                assert pin.purged, how
                assert pin.purged_ranges == [(0, 2 * CHUNK)]
                assert pin.populated is populate
                assert bytes(pin.view[CHUNK:CHUNK + PAGE]) == pattern(CHUNK, PAGE)
            report = region.mark_nonvolatile(2 * CHUNK, 2 * CHUNK, report=True, populate=populate)
            assert report == [(2 * CHUNK, 2 * CHUNK)], how
            # Reported once: pinned since, and refills of a reported chunk are no new purge.
            assert region.mark_nonvolatile(0, 4 * CHUNK, report=True) == []
            assert_pages_match(region, pattern(0, SIZE))


def test_pinned_chunks_are_never_purged(backend: str) -> None:
    regenerator = CountingRegenerator()
    with make(backend, regenerator) as region:
        region.mark_nonvolatile()
        region.mark_volatile()
        with region.pinned(0, 2 * CHUNK, populate=False):
            region.mark_nonvolatile(2 * CHUNK, CHUNK, populate=False)
            assert region.purge() == 5 * CHUNK
            vrange.testing.inject_purge(region)
            if kernel_reclaims(backend):
                page_out(region)
                vrange.testing.inject_purge(region, page_out=True)
            assert all(resident_pages(region, 0, 3 * CHUNK))
            calls = regenerator.total
            assert_pages_match(region, pattern(0, 3 * CHUNK))
            assert regenerator.total == calls             # nothing of it was regenerated
            assert region.mark_nonvolatile(0, 3 * CHUNK, report=True) == []


@pytest.mark.requires("kernel_reclaims", "(it makes the kernel discard pages)")
def test_a_cheap_pin_makes_resident_lazy_free_pages_non_discardable(backend: str) -> None:
    regenerator = CountingRegenerator()
    with make(backend, regenerator) as region:
        region.mark_nonvolatile()
        region[0:4] = b"kept"                              # a write to a pinned page
        region.mark_volatile()
        calls = regenerator.total
        assert region.mark_nonvolatile(populate=False) is False
        assert regenerator.total == calls                  # nothing regenerated
        page_out(region)
        assert all(resident_pages(region))                 # the kernel took nothing
        assert bytes(region[0:4]) == b"kept"
        assert regenerator.total == calls


def test_a_cheap_pin_regenerates_nothing(backend: str) -> None:
    regenerator = CountingRegenerator()
    with make(backend, regenerator) as region:
        assert region.mark_nonvolatile(populate=False) is False   # never touched
        assert regenerator.total == 0
        assert not any(resident_pages(region))
        assert bytes(region[CHUNK:CHUNK + PAGE]) == pattern(CHUNK, PAGE)   # filled on access
        assert regenerator.total == 1
        region.mark_volatile()
        region.purge()
        assert region.mark_nonvolatile(report=True, populate=False) == [(CHUNK, CHUNK)]
        assert regenerator.total == 1                             # left to refill on access
        assert region.stats().purges_by_reason["explicit"] == 1
        assert_pages_match(region, pattern(0, SIZE))
        # The refill on access is not a second purge: the pin reported it already.
        assert region.mark_nonvolatile(report=True) == []
        assert region.stats().purges == 1


@pytest.mark.requires("kernel_reclaims", "(it makes the kernel discard pages)")
def test_a_cheap_pin_counts_and_reports_a_kernel_purge_once(backend: str) -> None:
    regenerator = CountingRegenerator()
    with make(backend, regenerator) as region:
        region.mark_nonvolatile()
        region.mark_volatile()
        page_out(region)
        purged = region.mark_nonvolatile(report=True, populate=False)
        assert purged, "page_out discarded nothing"
        kernel = region.stats().purges_by_reason["kernel"]
        assert kernel == sum(length for _, length in purged) // CHUNK
        assert_pages_match(region, pattern(0, SIZE))
        assert region.stats().purges_by_reason["kernel"] == kernel
        assert region.mark_nonvolatile(report=True) == []


def test_populate_must_be_a_bool(backend: str, regenerator: CountingRegenerator) -> None:
    with make(backend, regenerator) as region:
        with pytest.raises(TypeError):
            region.mark_nonvolatile(populate=1)  # type: ignore[call-overload]
        with pytest.raises(TypeError):
            with region.pinned(populate="no"):  # type: ignore[arg-type]
                pass
        assert region.pin_count(0) == 0


def test_a_failed_pin_adds_no_pin(backend: str) -> None:
    def failing(offset: int, buf: memoryview) -> None:
        raise OSError("gone")

    with vrange.Region(SIZE, failing, backend=backend) as region:
        region.mark_volatile()
        with pytest.raises(vrange.RegenerationError):
            with region.pinned():
                pass
        with pytest.raises(vrange.RegenerationError):
            region.mark_nonvolatile()
        assert region.pin_count(0) == 0
        assert chunk_volatile(region, 0)
        assert region.mark_nonvolatile(populate=False) is False   # nothing to regenerate
        assert region.pin_count(0) == 1


# --- the pressure policy -------------------------------------------------------------------------


@pytest.mark.forked
def test_budgets_and_pressure_never_take_pinned_chunks(backend: str) -> None:
    regenerator = CountingRegenerator()
    with make(backend, regenerator, group="pins") as region:
        assert region.managed
        region.mark_nonvolatile()
        region.mark_volatile()
        with region.pinned(0, 2 * CHUNK, populate=False):
            region.mark_nonvolatile(2 * CHUNK, CHUNK)
            vrange.policy.set_budget(0, group="pins")
            assert region.stats().purges_by_reason["budget"] == 5
            vrange.policy.configure(monitor=False, high_water=1, low_water=0)
            vrange.policy.enforce()
            assert all(resident_pages(region, 0, 3 * CHUNK))
        # The block's chunks are volatile again: the budget takes them now.
        vrange.policy.set_budget(0, group="pins")
        vrange.policy.enforce()
        assert region.stats().purges_by_reason["budget"] + \
            region.stats().purges_by_reason["pressure"] == 7
        assert all(resident_pages(region, 2 * CHUNK, CHUNK))   # mark_nonvolatile's pin stays
        assert_pages_match(region, pattern(0, SIZE))


# --- fork ----------------------------------------------------------------------------------------


@pytest.mark.forked
def test_pins_after_fork(backend: str) -> None:
    """mark_nonvolatile's pins are the process's state and go on in a child; a pinned() block of
    another thread never ends in the child, so its pins go; the forking thread's block goes on."""
    regenerator = CountingRegenerator()
    with make(backend, regenerator) as region:
        region.mark_volatile()
        region.mark_nonvolatile(0, CHUNK)
        entered, leave = threading.Event(), threading.Event()

        def hold() -> None:
            with region.pinned(CHUNK, CHUNK):
                entered.set()
                leave.wait(20)

        other = threading.Thread(target=hold)
        other.start()
        entered.wait(10)
        with region.pinned(2 * CHUNK, CHUNK):
            pid = os.fork()
            if pid == 0:
                code = 1
                try:
                    counts = [region.pin_count(c * CHUNK) for c in range(4)]
                    assert counts == [1, 0, 1, 0], counts
                    assert chunk_volatile(region, 1) and not chunk_volatile(region, 2)
                    assert region.purge(0, 3 * CHUNK) == CHUNK       # chunk 1 only
                    assert_pages_match(region, pattern(0, SIZE))
                    code = 0
                finally:
                    os._exit(code)
            _, status = os.waitpid(pid, 0)
            assert os.waitstatus_to_exitcode(status) == 0
            assert [region.pin_count(c * CHUNK) for c in range(4)] == [1, 1, 1, 0]
        leave.set()
        other.join()
        assert [region.pin_count(c * CHUNK) for c in range(4)] == [1, 0, 0, 0]


# --- the README's example ------------------------------------------------------------------------


def test_readme_use_example_closes_cleanly(backend: str) -> None:
    def expensive_rebuild(offset: int, length: int) -> bytes:
        return pattern(offset, length)

    def regenerate(offset: int, buf: memoryview) -> None:
        buf[:] = expensive_rebuild(offset, len(buf))

    with vrange.Region(4 << 20, regenerate, backend=backend) as cache:
        with cache.pinned(0, 1 << 20) as pin:
            first = bytes(pin.view[:16])
        cache.mark_volatile()
        cache.purge()
        with cache.pinned(0, 1 << 20) as pin:
            assert pin.purged
            assert bytes(pin.view[:16]) == first
    assert cache.closed


def test_pin_repr() -> None:
    pin = vrange.Pin(0, PAGE, [], True, 0, 1)
    assert "purged=False" in repr(pin) and "active" in repr(pin)

