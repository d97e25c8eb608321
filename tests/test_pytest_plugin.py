"""The pytest plugin (vrange.pytest_plugin): its options on pytest runs of their own, its fixtures
here, and part of this suite run under it."""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from pathlib import Path

import pytest

import vrange
import vrange.testing
from conftest import CHUNK, CountingRegenerator, assert_pages_match, pattern, run_python

pytest_plugins = ["pytester"]

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "test_forgetful_cache.py"
SUMMARY = re.compile(r"vrange: (\d+) injected purges, (\d+) bytes, at (\d+) points in (\d+) tests")


@pytest.fixture
def example(pytester: pytest.Pytester) -> pytest.Pytester:
    pytester.makepyfile(test_forgetful_cache=EXAMPLE.read_text())
    return pytester


def summary(result: pytest.RunResult) -> tuple[int, ...]:
    match = SUMMARY.search(result.stdout.str())
    assert match, result.stdout.str()
    return tuple(int(group) for group in match.groups())


def test_the_example_passes_without_purges_and_fails_with_them(example: pytest.Pytester) -> None:
    plain = example.runpytest_subprocess()
    plain.assert_outcomes(passed=2)
    assert not [line for line in plain.stdout.lines if line.startswith("vrange:")]  # no header,
    # no summary: off unless asked

    purged = example.runpytest_subprocess("--vrange-purge=every:1")
    purged.assert_outcomes(passed=1, failed=1)
    purged.stdout.fnmatch_lines([
        "*--vrange-purge=every:1 (replay with this exact option)*",
        "*AssertionError: assert 90 == 450*",
        "*Captured vrange call*",
        "*injected purges*replay: pytest 'test_forgetful_cache.py::test_forgetful_index' "
        "--vrange-purge=every:1",
        "FAILED test_forgetful_cache.py::test_forgetful_index*",
    ])
    injections, discarded, points, tests = summary(purged)
    assert injections > 0 and discarded >= CHUNK and points > injections
    assert tests == 2


def test_the_replay_command_runs_from_where_pytest_was_run(pytester: pytest.Pytester,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """Run from a directory below the rootdir, the replay line names the test as pytest's own
    summary does (relative to the working directory), so that it can be pasted as it is."""
    pytester.makeini("[pytest]\n")
    tests = pytester.mkdir("tests")
    (tests / "test_forgetful_cache.py").write_text(EXAMPLE.read_text())
    monkeypatch.chdir(tests)
    purged = pytester.runpytest_subprocess("test_forgetful_cache.py", "--vrange-purge=every:1")
    purged.assert_outcomes(passed=1, failed=1)
    replay = re.search(r"replay: pytest '([^']+)' (--vrange-purge=\S+)", purged.stdout.str())
    assert replay, purged.stdout.str()
    assert replay.group(1) == "test_forgetful_cache.py::test_forgetful_index"
    again = pytester.runpytest_subprocess(replay.group(1), replay.group(2))
    again.assert_outcomes(failed=1)


def test_random_purges_replay_with_the_seed(example: pytest.Pytester) -> None:
    first = example.runpytest_subprocess("--vrange-purge=random:0.3")
    seed = re.search(r"--vrange-purge=random:0.3,seed=(\d+) \(replay", first.stdout.str())
    assert seed, first.stdout.str()  # the header shows the seed that was drawn
    again = example.runpytest_subprocess(f"--vrange-purge=random:0.3,seed={seed.group(1)}")
    assert summary(again) == summary(first)
    assert again.parseoutcomes() == first.parseoutcomes()
    other = [example.runpytest_subprocess(f"--vrange-purge=random:0.3,seed={seed}")
             for seed in (1, 2)]
    assert summary(other[0]) != summary(other[1])  # a 30 % draw over ~1,000 points


@pytest.mark.requires("sigbus_memfd_trap", "(the option forces it)")
def test_backend_option_applies_to_regions_without_a_backend(pytester: pytest.Pytester) -> None:
    pytester.makepyfile("""
        import os
        import vrange
        from vrange.sources import Zeros

        def test_backend(vrange_backend):
            assert vrange_backend == "sigbus:memfd"
            assert os.environ["VRANGE_BACKEND"] == "sigbus:memfd"
            with vrange.Region(4096, Zeros()) as region:
                assert (region.backend, region.trap) == ("sigbus", "memfd")
            with vrange.Region(4096, Zeros(), backend="uffd") as region:
                assert region.backend == "uffd"  # an explicit backend= still wins
    """)
    saved = os.environ.get("VRANGE_BACKEND")
    result = pytester.runpytest_inprocess("--vrange-backend=sigbus:memfd",
                                          "-p", "no:cacheprovider")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(["vrange: --vrange-backend=sigbus:memfd: regions without "
                                 "backend= use sigbus (memfd trap)"])
    assert os.environ.get("VRANGE_BACKEND") == saved  # restored after the session


def test_a_bad_option_is_a_usage_error(example: pytest.Pytester) -> None:
    for option, message in [
        ("--vrange-backend=bogus", "*--vrange-backend=bogus: unknown backend; choose one of auto, "
                                   "uffd, sigbus, sigbus:uffd, sigbus:memfd*"),
        ("--vrange-purge=every:0", "*--vrange-purge=every:0: every:N needs a whole number N >= 1*"),
        ("--vrange-purge=random:0.5,sead=1", "*expected seed=S*"),
        ("--vrange-profile=bogus", "*--vrange-profile=bogus: unknown profile; choose one of "
                                   "*seccomp-enosys, seccomp-eperm*"),
    ]:
        result = example.runpytest_subprocess(option)
        assert result.ret == pytest.ExitCode.USAGE_ERROR, option
        result.stderr.fnmatch_lines([message])


def test_a_backend_that_cannot_run_is_a_usage_error_naming_why(example: pytest.Pytester) -> None:
    # The profile denies userfaultfd (a seccomp filter, in the pytest subprocess only).
    result = example.runpytest_subprocess("--vrange-profile=seccomp-eperm",
                                          "--vrange-backend=uffd")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*--vrange-backend=uffd cannot run here under "
                                 "--vrange-profile=seccomp-eperm: backend 'uffd' cannot run here: "
                                 "*EPERM*"])


@pytest.mark.requires("sigbus_memfd_trap", "(what is left under the profile)")
def test_the_profile_option_restricts_the_session(example: pytest.Pytester) -> None:
    example.makepyfile(test_profile="""
        import vrange

        def test_userfaultfd_is_denied():
            report = vrange.features()
            assert not report.userfaultfd.full
            assert report.auto_backend == "sigbus"
            assert not report.trap("uffd").usable and report.trap("memfd").usable
    """)
    result = example.runpytest_subprocess("--vrange-profile=seccomp-enosys",
                                          "--vrange-purge=every:1")
    result.stdout.fnmatch_lines(["vrange: --vrange-profile=seccomp-enosys: userfaultfd denied "
                                 "with ENOSYS*"])
    # The forgetful program fails on the memfd trap too; the fixed one and the check pass.
    result.assert_outcomes(passed=2, failed=1)


def test_the_profiles_include_the_simulated_kernels_where_vrange_has_them() -> None:
    from vrange.pytest_plugin import SECCOMP_PROFILES, profiles

    kernels = getattr(vrange.testing, "KERNEL_PROFILES", {})
    assert profiles() == {**SECCOMP_PROFILES, **kernels}


def test_without_options_the_plugin_changes_nothing(pytester: pytest.Pytester) -> None:
    pytester.makepyfile("""
        import os, sys, threading

        def test_untouched(request):
            assert request.config.pluginmanager.has_plugin("vrange")  # loaded by its entry point
            assert request.config.pluginmanager.get_plugin("vrange-session") is None
            assert sys.getprofile() is None and threading.getprofile() is None
            assert "VRANGE_BACKEND" not in os.environ
            assert threading.active_count() == 1
    """)
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv("VRANGE_BACKEND", raising=False)
        result = pytester.runpytest_subprocess("-v")
    result.assert_outcomes(passed=1)
    assert not [line for line in result.stdout.lines if line.startswith("vrange")]  # no header


# --- the fixtures, used by this suite ------------------------------------------------------------


def test_vrange_purge_discards_volatile_chunks_and_keeps_pinned_ones(
        vrange_region: Callable[..., vrange.Region], vrange_purge: Callable[..., int],
        vrange_backend: str) -> None:
    regenerator = CountingRegenerator()
    region = vrange_region(8 * CHUNK, regenerator)
    assert vrange_backend == (os.environ.get("VRANGE_BACKEND") or "auto")
    assert_pages_match(region, pattern(0, 8 * CHUNK))
    region.mark_volatile(0, 4 * CHUNK)
    assert vrange_purge(region) == 4 * CHUNK  # the pinned half is never touched
    vrange_purge()  # every open region: nothing of this one is volatile and resident any more
    assert region.stats().purged_bytes == 4 * CHUNK
    assert region.mark_nonvolatile(report=True) == [(0, 4 * CHUNK)]
    assert_pages_match(region, pattern(0, 8 * CHUNK))
    assert regenerator.total == 8 + 4


def test_vrange_purge_does_nothing_inside_a_regenerator(
        vrange_region: Callable[..., vrange.Region], vrange_purge: Callable[..., int]) -> None:
    purged_inside: list[int] = []

    def regenerate(offset: int, buf: memoryview) -> None:
        purged_inside.append(vrange_purge())  # would raise VRangeError as region.purge()
        buf[:] = pattern(offset, len(buf))

    region = vrange_region(2 * CHUNK, regenerate)
    other = vrange_region(CHUNK, CountingRegenerator())
    bytes(other), other.mark_volatile()
    assert_pages_match(region, pattern(0, 2 * CHUNK))
    assert purged_inside == [0, 0]
    assert other.stats().purged_bytes == 0


def test_vrange_region_closes_its_regions_and_reports_one_left_open(
        pytester: pytest.Pytester) -> None:
    pytester.makepyfile("""
        import vrange.testing
        from vrange.sources import Zeros

        def test_closed(vrange_region):
            vrange_region(4096, Zeros())

        def test_after():
            assert vrange.testing.live_regions() == []

        def test_left_open(vrange_region):
            global VIEW
            VIEW = memoryview(vrange_region(4096, Zeros()))
    """)
    result = pytester.runpytest_subprocess()
    result.assert_outcomes(passed=3, errors=1)
    result.stdout.fnmatch_lines(["*vrange_region: left open (still exported when the test "
                                 "ended):*", "*<vrange.Region 4096 bytes*"])


# --- this suite under the plugin -----------------------------------------------------------------


@pytest.mark.hang_timeout(120)
def test_vrange_io_survives_purges_at_every_point(pytester: pytest.Pytester) -> None:
    """tests/test_io.py run with a purge at every point. Left out: the tests that count exact
    purges (an injected purge changes the count) and the one that reads back bytes it wrote into
    volatile memory (a purge may lose them, by design)."""
    result = run_python(module="pytest", args=[
        "-q", "-p", "no:cacheprovider", "tests/test_io.py",
        "-k", "not purge_skips_chunks_held_for_io and not readinto_purged_memory",
        "--vrange-purge=every:1"], cwd=ROOT, timeout=110)
    assert result.returncode == 0, result.stdout + result.stderr
    match = SUMMARY.search(result.stdout)
    assert match, result.stdout
    injections, discarded, _, tests = (int(group) for group in match.groups())
    assert injections > 1000 and discarded > 0 and tests > 20
