"""vrange.policy: budgets, priorities, the pressure monitor's lifecycle (each test in a forked child:
budgets and the monitor are process-wide)."""

from __future__ import annotations

import os
import signal
import threading

import pytest
from conftest import CHUNK, CountingRegenerator, assert_pages_match, pattern, require, usable_specs

import vrange
import vrange.policy

pytestmark = pytest.mark.forked

MIB = 1 << 20


@pytest.fixture
def memfd(report: vrange.Features) -> str:
    """The memfd trap: the regions vrange's policy manages by default (the kernel cannot reclaim
    them)."""
    require("sigbus_memfd_trap", "(the regions the policy manages by default)", report)
    return "sigbus:memfd"


def filled(spec: str, **options: object) -> vrange.Region:
    region = vrange.Region(MIB, CountingRegenerator(), backend=spec, **options)  # type: ignore[arg-type]
    region.mark_nonvolatile()
    return region


def budget_purges(region: vrange.Region) -> int:
    return region.stats().purges_by_reason["budget"]


def test_regions_the_kernel_cannot_reclaim_are_managed_by_default(report: vrange.Features,
                                                                 memfd: str) -> None:
    with filled(memfd) as region:
        assert region.managed
        assert vrange.policy.stats().managed_regions == 1
        assert vrange.policy.stats().running
    assert vrange.policy.stats().managed_regions == 0
    with filled(memfd, managed=False) as region:
        assert not region.managed
    for spec in ("uffd", "sigbus:uffd"):
        if spec not in usable_specs(report):
            continue
        with filled(spec) as region:
            assert not region.managed  # the kernel reclaims it: no policy unless asked
        with filled(spec, group="cache") as region:
            assert region.managed


def test_budget_purges_lowest_priority_then_oldest(memfd: str) -> None:
    oldest_low = filled(memfd, priority=0)
    important = filled(memfd, priority=5)
    newer_low = filled(memfd, priority=0)
    with oldest_low, important, newer_low:
        for region in (oldest_low, important, newer_low):
            region.mark_volatile()
        assert vrange.policy.stats().resident_volatile_bytes == 3 * MIB
        vrange.policy.set_budget(MIB + MIB // 2)
        assert budget_purges(oldest_low) == 16   # priority 0, marked first: all of it
        assert budget_purges(newer_low) == 8     # then the next oldest of priority 0
        assert budget_purges(important) == 0     # priority 5 last: untouched
        assert vrange.policy.stats().resident_volatile_bytes == MIB + MIB // 2
        assert vrange.policy.stats().purges_by_reason["budget"] == 24
        # Nothing is lost: purged chunks come back from the regenerator.
        for region in (oldest_low, important, newer_low):
            assert_pages_match(region, pattern(0, MIB))
        assert oldest_low.mark_nonvolatile() is True
        assert important.mark_nonvolatile() is False


def test_budget_never_takes_pinned_or_held_chunks(memfd: str) -> None:
    with filled(memfd) as region:
        region.mark_volatile(0, MIB // 2)          # chunks 0-7 volatile, 8-15 pinned
        with region.held_for_io(0, 2 * CHUNK):     # chunks 0-1 held for a system call
            vrange.policy.set_budget(0)
            assert budget_purges(region) == 6
        stats = region.stats()
        assert stats.resident_bytes == MIB - 6 * CHUNK
        vrange.policy.set_budget(0, group=None)
        assert budget_purges(region) == 8          # once no longer held
        assert region.purge() == 0
        assert_pages_match(region, pattern(0, MIB))


def test_group_budgets_apply_to_their_group_only(memfd: str) -> None:
    with filled(memfd, group="tiles") as tiles, filled(memfd, group="thumbnails") as thumbnails:
        tiles.mark_volatile()
        thumbnails.mark_volatile()
        vrange.policy.set_budget(MIB // 4, group="tiles")
        assert budget_purges(tiles) == 12
        assert budget_purges(thumbnails) == 0
        assert vrange.policy.stats().group_budgets == {"tiles": MIB // 4}
        vrange.policy.set_budget(None, group="tiles")
        assert vrange.policy.stats().group_budgets == {}


def test_budget_is_enforced_when_memory_becomes_volatile(memfd: str) -> None:
    vrange.policy.set_budget(MIB // 2)
    with filled(memfd) as region:
        assert budget_purges(region) == 0      # nothing volatile yet
        region.mark_volatile()
        assert budget_purges(region) == 8
        assert vrange.policy.stats().resident_volatile_bytes == MIB // 2


def test_pressure_purges_in_policy_order_and_counts_the_reason(memfd: str) -> None:
    with filled(memfd, priority=1) as kept, filled(memfd, priority=0) as first:
        kept.mark_volatile()
        first.mark_volatile()
        # Usage (whatever it is) is above a high-water mark of 1 byte; purge down to 0. The thread
        # is off, so this check is the one that purges.
        vrange.policy.configure(monitor=False, high_water=1, low_water=0)
        assert vrange.policy.enforce() == 2 * MIB
        assert first.stats().purges_by_reason["pressure"] == 16
        assert kept.stats().purges_by_reason["pressure"] == 16
        stats = vrange.policy.stats()
        assert stats.purges_by_reason["pressure"] == 32
        assert stats.bytes_by_reason["pressure"] == 2 * MIB
        assert stats.high_water_bytes == 1 and stats.low_water_bytes == 0
        assert_pages_match(first, pattern(0, MIB))


def test_bad_settings_are_refused() -> None:
    for bad in (-1, 1.5, True, "1M"):
        with pytest.raises(ValueError, match="budget"):
            vrange.policy.set_budget(bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="low_water"):
        vrange.policy.configure(high_water=10, low_water=20)
    with pytest.raises(TypeError, match="group"):
        vrange.policy.set_budget(1, group="")
    with pytest.raises(TypeError, match="priority"):
        vrange.Region(MIB, CountingRegenerator(), priority="high")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="managed"):
        vrange.Region(MIB, CountingRegenerator(), managed="yes")  # type: ignore[arg-type]


def _threads() -> int:
    return len(os.listdir("/proc/self/task"))


def test_the_monitor_stops_and_starts(memfd: str) -> None:
    with filled(memfd) as region:
        assert vrange.policy.stats().running
        running = _threads()
        vrange.policy.stop()
        assert not vrange.policy.stats().running and vrange.policy.stats().signal == "off"
        assert _threads() == running - 1  # the thread was joined
        region.mark_volatile()
        vrange.policy.set_budget(0)   # still enforced without the thread
        assert budget_purges(region) == 16
        vrange.policy.configure(monitor=True)
        assert vrange.policy.stats().running and vrange.policy.stats().managed_regions == 1
        assert _threads() == running


def test_a_forked_child_gets_its_own_monitor(memfd: str) -> None:
    with filled(memfd) as region:
        region.mark_volatile()
        pid = os.fork()
        if pid == 0:
            try:
                stats = vrange.policy.stats()
                vrange.policy.set_budget(0)
                ok = (stats.running and stats.managed_regions == 1
                      and budget_purges(region) == 16
                      and bytes(region[:]) == pattern(0, MIB))
                os._exit(0 if ok else 1)
            except BaseException:
                os._exit(2)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert budget_purges(region) == 0           # the parent's region was not touched
        assert region.stats().resident_bytes == MIB


@pytest.mark.hang_timeout(120)
def test_regions_closed_while_the_policy_purges_them(memfd: str) -> None:
    vrange.policy.set_budget(0)
    stop = threading.Event()
    errors: list[BaseException] = []

    def purge_all_the_time() -> None:
        while not stop.is_set():
            try:
                vrange.policy.enforce()
            except BaseException as error:  # noqa: BLE001 - reported below
                errors.append(error)
                return

    purger = threading.Thread(target=purge_all_the_time)
    purger.start()
    try:
        for round_number in range(150):
            with vrange.Region(4 * CHUNK, CountingRegenerator(), backend=memfd) as region:
                region.mark_volatile()
                assert bytes(region[CHUNK:CHUNK + 64]) == pattern(CHUNK, 64), round_number
    finally:
        stop.set()
        purger.join(timeout=30)
    assert errors == []
    assert vrange.policy.stats().managed_regions == 0


def _eventfds() -> int:
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            count += os.readlink(f"/proc/self/fd/{fd}").startswith("anon_inode:[eventfd]")
        except FileNotFoundError:
            continue  # the descriptor that listed the directory
    return count


def test_reconfiguring_leaks_nothing_and_keeps_the_regions(memfd: str) -> None:
    with filled(memfd) as region:
        vrange.policy.configure(monitor=True)
        eventfds, threads = _eventfds(), _threads()
        for _ in range(30):
            vrange.policy.configure(monitor=True)
        assert (_eventfds(), _threads()) == (eventfds, threads)
        assert vrange.policy.stats().managed_regions == 1 and region.managed


def test_water_marks_can_be_set_one_at_a_time(memfd: str) -> None:
    with filled(memfd):
        plan = vrange.features().pressure
        vrange.policy.configure(low_water=1 << 20)
        stats = vrange.policy.stats()
        assert (stats.high_water_bytes, stats.low_water_bytes) == (plan.high_water_bytes, 1 << 20)
        with pytest.raises(ValueError, match="low_water"):
            vrange.policy.configure(high_water=512 << 10)  # below the low mark set before
        stats = vrange.policy.stats()
        assert stats.running and stats.low_water_bytes == 1 << 20  # nothing was changed
        vrange.policy.configure(high_water=4 << 20)
        stats = vrange.policy.stats()
        assert (stats.high_water_bytes, stats.low_water_bytes, stats.running) == (4 << 20, 1 << 20,
                                                                                 True)
        with filled(memfd) as another:  # new regions still go under the policy
            assert another.managed and vrange.policy.stats().managed_regions == 2


@pytest.mark.hang_timeout(120)
def test_fork_while_the_policy_purges(memfd: str) -> None:
    """A child forked at any instant of a purge reads the right bytes (the trap is marked before it
    is mapped, so no child is left with a trap it does not know of)."""
    size = 32 * CHUNK
    expected = pattern(0, size)
    # The regenerator takes no lock and imports nothing: a lock another thread held at fork() (an
    # import's module lock too) stays held in the child, whatever vrange does.
    region = vrange.Region(size, lambda offset, buf: buf.__setitem__(
        slice(None), expected[offset:offset + len(buf)]), backend=memfd)
    region.mark_volatile()
    vrange.policy.set_budget(0)
    stop = threading.Event()

    def enforce() -> None:
        while not stop.is_set():
            vrange.policy.enforce()

    def read() -> None:
        while not stop.is_set():
            for offset in range(0, size, CHUNK):
                region[offset]

    helpers = [threading.Thread(target=enforce), threading.Thread(target=read)]
    for helper in helpers:
        helper.start()
    codes: dict[int, int] = {}
    try:
        for _ in range(200):
            pid = os.fork()
            if pid == 0:
                signal.alarm(10)
                os._exit(0 if region[:] == expected else 3)
            _, status = os.waitpid(pid, 0)
            code = os.waitstatus_to_exitcode(status)
            codes[code] = codes.get(code, 0) + 1
    finally:
        stop.set()
        for helper in helpers:
            helper.join(timeout=30)
        region.close()
    assert codes == {0: 200}
