"""Shared fixtures: a hang guard on every test, and capability probes that skip with a reason."""

from __future__ import annotations

import faulthandler
import os
from collections.abc import Iterator

import pytest

import vrange

DEFAULT_HANG_TIMEOUT_S = 60.0


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> Iterator[None]:
    """pytest-forked 1.6 runs a forked test's setup and teardown in the child only, leaving the
    parent's setup stack one module behind; tear down there too, as pytest-forked 1.7 does (1.7
    itself cannot be used: see pyproject.toml)."""
    yield
    if item.get_closest_marker("forked"):
        item.session._setupstate.teardown_exact(nextitem)


# pytest captures file descriptor 2 while a test runs, and a process killed by the guard never gets
# to print it: the guard writes the stacks to this file instead (.ci/run prints it on failure).
HANG_LOG_PATH = os.environ.get("VRANGE_HANG_LOG", "/tmp/vrange-test-hangs.log")


@pytest.fixture(autouse=True)
def hang_guard(request: pytest.FixtureRequest) -> Iterator[None]:
    """Kill the process running a test that hangs, after dumping every thread's stack.

    In a forked test this ends only the child (pytest-forked reports it as a crash); in the main
    process it ends the run, which beats CI hanging until its own limit.
    """
    marker = request.node.get_closest_marker("hang_timeout")
    timeout = float(marker.args[0]) if marker else DEFAULT_HANG_TIMEOUT_S
    with open(HANG_LOG_PATH, "a") as log:
        log.write(f"--- {request.node.nodeid} (pid {os.getpid()}, guard {timeout:.0f} s)\n")
        log.flush()
        faulthandler.dump_traceback_later(timeout, exit=True, file=log)
        try:
            yield
        finally:
            faulthandler.cancel_dump_traceback_later()


@pytest.fixture(scope="session")
def report() -> vrange.Features:
    return vrange.features()


@pytest.fixture
def full_userfaultfd(report: vrange.Features) -> vrange.Features:
    """Skip unless this process can open a userfaultfd that serves faults inside syscalls."""
    if not report.userfaultfd.full:
        pytest.skip(f"needs a full userfaultfd: {report.userfaultfd.reason}")
    return report


@pytest.fixture
def root_privileges() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root (to drop privileges or install filters in a forked child)")


# --- regions -------------------------------------------------------------------------------------

PAGE = 4096
CHUNK = 64 * 1024


def pattern(offset: int, length: int) -> bytes:
    """The bytes the test regenerators define: every page differs from every other."""
    import numpy as np

    positions = np.arange(offset, offset + length, dtype=np.uint64)
    return ((positions * 2654435761 >> 13) % 251).astype(np.uint8).tobytes()


class CountingRegenerator:
    """A Python regenerator that fills `pattern` and counts its calls per offset."""

    def __init__(self) -> None:
        import threading

        self.calls: dict[int, int] = {}
        self.lock = threading.Lock()

    def __call__(self, offset: int, buf: memoryview) -> None:
        with self.lock:
            self.calls[offset] = self.calls.get(offset, 0) + 1
        buf[:] = pattern(offset, len(buf))

    @property
    def total(self) -> int:
        return sum(self.calls.values())


def assert_pages_match(region: vrange.Region, expected: bytes, offset: int = 0) -> None:
    """Compare page by page, naming the first page that differs."""
    view = memoryview(region)
    try:
        for page_offset in range(0, len(expected), PAGE):
            got = bytes(view[offset + page_offset:offset + page_offset + PAGE])
            want = expected[page_offset:page_offset + PAGE]
            assert got == want, f"page at offset {offset + page_offset} differs"
    finally:
        view.release()


BACKEND_SPECS = ["uffd", "sigbus:uffd", "sigbus:memfd"]


def backend_name(spec: str) -> str:
    """``"sigbus"`` for ``"sigbus:memfd"``: what ``Region.backend`` says."""
    return spec.partition(":")[0]


def kernel_reclaims(spec: str) -> bool:
    """The kernel discards this backend's volatile pages by itself (MADV_FREE, MADV_PAGEOUT)."""
    return spec in ("uffd", "sigbus:uffd")


def syscalls_are_served(spec: str) -> bool:
    """A syscall touching a purged page blocks and succeeds (instead of failing with EFAULT)."""
    return spec == "uffd"


def skip_unless_available(report: vrange.Features, spec: str) -> None:
    name, _, trap = spec.partition(":")
    support = report.backend(name)
    if not support.usable:
        pytest.skip(f"backend {name!r} unavailable: {support.reason}")
    if trap and not report.trap(trap).usable:
        pytest.skip(f"the sigbus {trap} trap is unavailable: {report.trap(trap).reason}")


KERNEL_RECLAIMED = ("uffd", "sigbus:uffd")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Parametrize ``backend`` with every backend spec a test applies to (``@pytest.mark.backends``
    narrows it), and ``discard`` with the ways a backend's pages can be discarded: no cell is made
    for a combination that does not exist (the kernel never discards memfd-trap pages)."""
    if "backend" not in metafunc.fixturenames:
        return
    marker = metafunc.definition.get_closest_marker("backends")
    specs = [spec for spec in BACKEND_SPECS if marker is None or spec in marker.args]
    if "discard" in metafunc.fixturenames:
        pairs = [(spec, kind) for spec in specs for kind in ("purge", "kernel")
                 if kind == "purge" or kernel_reclaims(spec)]
        metafunc.parametrize(("backend", "discard"), pairs, indirect=True,
                             ids=[f"{spec}-{kind}" for spec, kind in pairs])
    else:
        metafunc.parametrize("backend", specs, indirect=True)


@pytest.fixture
def backend(request: pytest.FixtureRequest, report: vrange.Features) -> str:
    """Every backend and every trap of the sigbus backend (see pytest_generate_tests), skipped with
    the reason where it cannot run here."""
    skip_unless_available(report, request.param)
    return str(request.param)


@pytest.fixture
def regenerator() -> CountingRegenerator:
    return CountingRegenerator()
