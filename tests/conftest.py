"""Shared fixtures: a hang guard on every test, and capability probes that skip with a reason."""

from __future__ import annotations

import faulthandler
import os
import sys
from collections.abc import Iterator

import pytest

import vrange

DEFAULT_HANG_TIMEOUT_S = 60.0


@pytest.fixture(autouse=True)
def hang_guard(request: pytest.FixtureRequest) -> Iterator[None]:
    """Kill the process running a test that hangs, after dumping every thread's stack.

    In a forked test this ends only the child (pytest-forked reports it as a crash); in the main
    process it ends the run, which beats CI hanging until its own limit.
    """
    marker = request.node.get_closest_marker("hang_timeout")
    timeout = float(marker.args[0]) if marker else DEFAULT_HANG_TIMEOUT_S
    faulthandler.dump_traceback_later(timeout, exit=True, file=sys.stderr)
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
