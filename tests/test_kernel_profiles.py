"""Older kernels, simulated in a forked child (vrange.testing.simulate_kernel): each profile makes
the advice or ioctl such a kernel lacks fail with EINVAL. vrange must report what is missing, name
what it does instead (features().fallbacks), and keep every backend that can still run working: first
touch, volatility, purge, kernel discard where there is one, and pins that hold.
"""

from __future__ import annotations

import faulthandler
import os
import signal
import threading
from collections.abc import Iterator

import pytest

import vrange
from vrange._backends import usable_specs as usable_specs_here
from vrange.testing import KERNEL_PROFILES, page_out, simulate_kernel

from conftest import BACKEND_SPECS, CHUNK, PAGE, CountingRegenerator, assert_pages_match, \
    backend_name, pattern, resident_pages

CHUNKS = 16
SIZE = CHUNKS * CHUNK

# What each profile takes away, and the backends it leaves usable (all others must stay usable).
UNUSABLE_UNDER = {"no-uffd-thread-id-sigbus": {"uffd", "sigbus:uffd"}}

pytestmark = [pytest.mark.requires("root", "(to install a seccomp filter)")]


def test_profile_names_are_the_documented_ones() -> None:
    assert list(KERNEL_PROFILES) == ["no-populate-write", "no-pageout", "no-poison",
                                     "no-uffd-thread-id-sigbus"]
    assert all(isinstance(text, str) and text for text in KERNEL_PROFILES.values())


def test_unknown_profile_is_refused_with_the_names() -> None:
    # Refused before any filter is installed: safe in the test process itself.
    with pytest.raises(ValueError, match="no-populate-write.*no-uffd-thread-id-sigbus"):
        simulate_kernel("no-such-kernel")


@pytest.mark.forked
@pytest.mark.hang_timeout(60)
def test_no_populate_write_is_reported_and_pinning_adapts() -> None:
    simulate_kernel("no-populate-write")
    report = vrange.features()
    assert not report.madvise_accepted("POPULATE_WRITE")
    assert not report.madvise_accepted("POPULATE_READ")
    assert report.madvise_accepted("FREE") and report.madvise_accepted("PAGEOUT")
    entry = report.fallback("MADV_POPULATE_WRITE")
    assert entry is not None and "EINVAL" in entry.missing
    assert "atomic no-op write" in entry.fallback and "pinning" in entry.fallback
    assert report.fallback("MADV_POPULATE_READ") is not None
    assert report.fallback("MADV_PAGEOUT") is None and report.fallback("UFFDIO_POISON") is None
    # The uffd backend no longer requires the advice.
    assert report.backend("uffd").usable, report.backend("uffd").reason
    assert "touches each page" in report.backend("uffd").reason
    assert report.auto_backend == "uffd"
    assert {"name": entry.name, "missing": entry.missing, "fallback": entry.fallback} == \
        report.as_dict()["fallbacks"]["MADV_POPULATE_WRITE"]


@pytest.mark.forked
@pytest.mark.hang_timeout(60)
def test_no_pageout_is_reported_and_page_out_says_so() -> None:
    simulate_kernel("no-pageout")
    report = vrange.features()
    assert not report.madvise_accepted("PAGEOUT") and not report.madvise_accepted("COLD")
    assert report.madvise_accepted("POPULATE_WRITE")
    entry = report.fallback("MADV_PAGEOUT")
    assert entry is not None and "page_out" in entry.fallback and "purge()" in entry.fallback
    assert report.backend("uffd").usable and report.auto_backend == "uffd"
    for spec in ("uffd", "sigbus:uffd"):
        if spec not in usable_specs_here():
            continue
        with vrange.Region(SIZE, vrange.sources.Zeros(), backend=spec) as region:
            region.mark_volatile()
            with pytest.raises(vrange.VRangeError, match="MADV_PAGEOUT.*region.purge"):
                page_out(region)


@pytest.mark.forked
@pytest.mark.hang_timeout(60)
def test_no_poison_is_reported_and_uffd_defaults_to_abort() -> None:
    simulate_kernel("no-poison")
    report = vrange.features()
    uffd = report.userfaultfd
    assert "POISON" not in uffd.range_ioctls and "POISON" not in uffd.api_features
    assert "POISON" not in uffd.api_ioctls
    assert "COPY" in uffd.range_ioctls  # the rest of the answer is the kernel's
    entry = report.fallback("UFFDIO_POISON")
    assert entry is not None and "'abort'" in entry.fallback
    assert report.backend("uffd").usable
    if "uffd" in usable_specs_here():
        with pytest.raises(ValueError, match="UFFDIO_POISON"):
            vrange.Region(SIZE, vrange.sources.Zeros(), backend="uffd", on_error="poison")
        # The default policy is 'abort': a raw access meeting a failing regenerator aborts (in a
        # grandchild), never hangs re-faulting on a poison marker the kernel cannot place.
        assert _raw_failure_signal("uffd") == signal.SIGABRT
    if "sigbus:uffd" in usable_specs_here():
        # The sigbus backend's poison needs no UFFDIO_POISON: still the default there.
        assert _raw_failure_signal("sigbus:uffd") == signal.SIGBUS


def _raw_failure_signal(spec: str) -> int:
    """Fork; in the grandchild read a chunk whose regenerator raises under the default policy;
    the signal that ended it."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the grandchild
        try:
            def broken(offset: int, buf: memoryview) -> None:
                raise RuntimeError("no bytes for you")

            region = vrange.Region(SIZE, broken, backend=spec)
            faulthandler.disable()  # the expected death needs no stack dump
            os.dup2(os.open(os.devnull, os.O_WRONLY), 2)  # nor the policy's message
            bytes(memoryview(region)[:PAGE])
        finally:
            os._exit(0)
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status), f"the grandchild on {spec} exited with {status:#x}"
    return os.WTERMSIG(status)


@pytest.mark.forked
@pytest.mark.hang_timeout(60)
def test_no_thread_id_or_sigbus_leaves_the_memfd_trap() -> None:
    simulate_kernel("no-uffd-thread-id-sigbus")
    report = vrange.features()
    uffd = report.userfaultfd
    assert "THREAD_ID" not in uffd.api_features and "SIGBUS" not in uffd.api_features
    assert uffd.full  # userfaultfd itself still works: only the features are missing
    assert not report.backend("uffd").usable
    assert "UFFD_FEATURE_THREAD_ID" in report.backend("uffd").reason
    trap = report.trap("uffd")
    assert not trap.usable and "UFFD_FEATURE_SIGBUS" in trap.reason
    sigbus = report.backend("sigbus")
    assert (sigbus.usable, sigbus.trap, sigbus.kernel_reclaims) == (True, "memfd", False)
    assert report.auto_backend == "sigbus" and "memfd trap is used" in report.auto_reason
    thread_id = report.fallback("UFFD_FEATURE_THREAD_ID")
    sigbus_feature = report.fallback("UFFD_FEATURE_SIGBUS")
    assert thread_id is not None and "auto picks sigbus" in thread_id.fallback
    assert sigbus_feature is not None and "memfd trap is used" in sigbus_feature.fallback
    with vrange.Region(SIZE, vrange.sources.Zeros()) as region:
        assert (region.backend, region.trap) == ("sigbus", "memfd")
    with pytest.raises(vrange.BackendUnavailable, match="THREAD_ID"):
        vrange.Region(SIZE, vrange.sources.Zeros(), backend="uffd")
    with pytest.raises(vrange.BackendUnavailable, match="UFFD_FEATURE_SIGBUS"):
        vrange.Region(SIZE, vrange.sources.Zeros(), backend="sigbus:uffd")


def test_cli_shows_the_fallbacks() -> None:
    from vrange.cli import format_report

    report = vrange.features()
    text = format_report(report)
    assert "Fallbacks" in text
    for entry in report.fallbacks:
        assert entry.name in text


# --- a real workload on every backend each profile leaves usable -----------------------------------


def _workload_cells() -> Iterator[object]:
    """Every (profile, backend) cell the profile leaves usable (the ones it makes unusable are
    checked by the tests above)."""
    for profile in KERNEL_PROFILES:
        for spec in BACKEND_SPECS:
            if spec not in UNUSABLE_UNDER.get(profile, set()):
                yield pytest.param(profile, spec, id=f"{profile}-{spec}")


def _enter_profile(profile: str, spec: str) -> None:
    """In the forked child: apply the profile; fail if the backend stopped running."""
    if spec not in usable_specs_here():
        pytest.skip(f"{spec} does not run in this process even before the profile")
    simulate_kernel(profile)
    usable = usable_specs_here()
    assert spec in usable, f"{spec} stopped running under {profile}: {vrange.features().backends}"


@pytest.mark.forked
@pytest.mark.hang_timeout(90)
@pytest.mark.parametrize(("profile", "spec"), list(_workload_cells()))
def test_workload_under_profile(profile: str, spec: str) -> None:
    _enter_profile(profile, spec)
    report = vrange.features()
    regenerator = CountingRegenerator()
    expected = pattern(0, SIZE)
    with vrange.Region(SIZE, regenerator, backend=spec) as region:
        assert region.backend == backend_name(spec)
        # First touch.
        assert_pages_match(region, expected)
        assert regenerator.total == CHUNKS
        assert region.mark_nonvolatile() is False
        # Volatile, purged by vrange, pinned again: reported and refilled.
        region.mark_volatile()
        assert region.purge() > 0
        assert region.mark_nonvolatile() is True
        assert all(resident_pages(region))
        assert_pages_match(region, expected)
        # prefault refills without pinning; a program's write to a pinned page is kept.
        region.mark_volatile(CHUNK * 8)
        assert region.purge(CHUNK * 8) > 0
        region.prefault()
        assert all(resident_pages(region))
        assert_pages_match(region, expected)
        assert region.mark_nonvolatile(CHUNK * 8) is True  # pins are counted: re-pin what went
        kept = expected[:5 * PAGE] + b"kept" + expected[5 * PAGE + 4:]
        memoryview(region)[5 * PAGE:5 * PAGE + 4] = b"kept"
        if not region.kernel_reclaims:
            return
        if not report.madvise_accepted("PAGEOUT"):
            region.mark_volatile()
            with pytest.raises(vrange.VRangeError, match="MADV_PAGEOUT"):
                page_out(region)
            assert region.mark_nonvolatile() is False
            assert_pages_match(region, kept)
            return
        # Pinned pages survive reclaim (under no-populate-write each page was dirtied by an atomic
        # no-op write instead of MADV_POPULATE_WRITE).
        region.mark_volatile()
        region.mark_nonvolatile()
        page_out(region)
        assert all(resident_pages(region)), "reclaim discarded pinned pages"
        assert region.mark_nonvolatile() is False
        region.mark_volatile()  # releases the pin just taken for the report (pins are counted)
        assert_pages_match(region, kept)
        # Kernel discard: volatile pages go (the write to one of them may go too: that is what
        # volatile means); the pin reports it and refills from the regenerator.
        region.mark_volatile()
        page_out(region)
        assert not all(resident_pages(region)), "MADV_PAGEOUT discarded nothing"
        assert region.mark_nonvolatile() is True
        assert all(resident_pages(region))
        page = bytes(memoryview(region)[5 * PAGE:6 * PAGE])
        assert page in (expected[5 * PAGE:6 * PAGE], kept[5 * PAGE:6 * PAGE])
        assert_pages_match(region, expected[:5 * PAGE])
        assert_pages_match(region, expected[6 * PAGE:], 6 * PAGE)


@pytest.mark.forked
@pytest.mark.hang_timeout(90)
@pytest.mark.parametrize("spec", ["uffd", "sigbus:uffd"])
def test_pin_without_populate_write_holds_against_reclaim(spec: str) -> None:
    """Under no-populate-write: pages left present but lazy-free (prefault) are discarded by
    reclaim (the control: page_out works here); pages pinned by mark_nonvolatile never are, even
    with another thread paging the region out while the pin runs."""
    _enter_profile("no-populate-write", spec)
    regenerator = CountingRegenerator()
    expected = pattern(0, SIZE)
    with vrange.Region(SIZE, regenerator, backend=spec) as region:
        assert_pages_match(region, expected)
        # Control: volatile and present (prefault keeps volatility): reclaim takes them.
        region.mark_volatile()
        region.prefault()
        assert all(resident_pages(region))
        page_out(region)
        assert not all(resident_pages(region)), "control failed: MADV_PAGEOUT discarded nothing"
        for _ in range(10):
            region.mark_volatile()
            stop = threading.Event()

            def reclaim() -> None:
                while not stop.is_set():
                    page_out(region)

            thread = threading.Thread(target=reclaim)
            thread.start()
            try:
                region.mark_nonvolatile()
            finally:
                stop.set()
                thread.join()
            page_out(region)
            assert all(resident_pages(region)), "reclaim discarded pinned pages"
            assert region.mark_nonvolatile() is False
            region.mark_volatile()  # pins are counted: release both, volatile again next round
            assert_pages_match(region, expected)


@pytest.mark.forked
@pytest.mark.hang_timeout(90)
@pytest.mark.parametrize("spec", ["uffd", "sigbus:uffd"])
def test_failing_regenerator_while_pinning_without_populate_write(spec: str) -> None:
    """The pin's fallback faults missing pages in from a system call: a refill that fails raises
    RegenerationError from mark_nonvolatile (the poison policy), never SIGBUS on the caller."""
    _enter_profile("no-populate-write", spec)
    failing = {"on": False}

    def regenerate(offset: int, buf: memoryview) -> None:
        if failing["on"] and offset == 3 * CHUNK:
            raise RuntimeError("chunk 3 is gone")
        buf[:] = pattern(offset, len(buf))

    with vrange.Region(SIZE, regenerate, backend=spec, on_error="poison") as region:
        assert_pages_match(region, pattern(0, SIZE))
        region.mark_volatile()
        region.purge()
        failing["on"] = True
        with pytest.raises(vrange.RegenerationError, match="chunk 3 is gone"):
            region.mark_nonvolatile()
        failing["on"] = False
        assert region.mark_nonvolatile() is True
        assert_pages_match(region, pattern(0, SIZE))


# --- 'abort': library calls raise, they do not abort -------------------------------------------------


@pytest.mark.forked
@pytest.mark.hang_timeout(60)
@pytest.mark.requires("uffd_backend", "(the uffd backend's 'abort' default without UFFDIO_POISON)")
@pytest.mark.parametrize("profile", [None, "no-poison"], ids=["explicit-abort", "no-poison-default"])
@pytest.mark.parametrize("source", ["python", "file"])
def test_under_abort_a_failing_regenerator_raises_from_library_calls(
        profile: str | None, source: str, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """'abort' is for raw accesses no call can raise from: mark_nonvolatile and prefault raise
    RegenerationError (the process lives), leave the chunk missing, and succeed once the source
    recovers; the other chunks keep their bytes."""
    if profile:
        simulate_kernel(profile)
    failing = {"on": False}

    def regenerate(offset: int, buffer: memoryview) -> None:
        if failing["on"] and offset == 0:
            raise RuntimeError("the source is gone")
        buffer[:] = pattern(offset, len(buffer))

    if source == "file":
        path = tmp_path / "data"
        path.write_bytes(pattern(0, SIZE))
        regenerator: object = vrange.sources.File(str(path))
    else:
        regenerator = regenerate
    region = vrange.Region(SIZE, regenerator, backend="uffd",  # type: ignore[arg-type]
                           on_error=None if profile else "abort")
    if profile:  # the default where UFFDIO_POISON is missing
        assert "'abort'" in vrange.features().fallback("UFFDIO_POISON").fallback
    with region:
        assert bytes(region[:]) == pattern(0, SIZE)
        for call in (region.mark_nonvolatile, region.prefault):
            region.mark_volatile()
            region.purge()
            if source == "file":
                os.truncate(path, CHUNK // 2)  # the file shrank: its first chunk cannot be read
            else:
                failing["on"] = True
            with pytest.raises(vrange.RegenerationError):
                call()
            assert not resident_pages(region, 0, CHUNK)[0], "the failed chunk was left present"
            if source == "file":
                path.write_bytes(pattern(0, SIZE))
            else:
                failing["on"] = False
            call()
            assert bytes(region[:]) == pattern(0, SIZE)
        assert region.stats().regeneration_errors == 2
