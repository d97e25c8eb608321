"""Shared fixtures: a hang guard on every test, and capability probes that skip with a reason."""

from __future__ import annotations

import contextlib
import ctypes
import faulthandler
import os
import subprocess
import sys
import tempfile
import textwrap
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass

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
# One file per user: a file another user made first (root's, mode 0644) cannot be appended to, and
# every test would error in its setup.
HANG_LOG_PATH = os.environ.get("VRANGE_HANG_LOG") or os.path.join(
    tempfile.gettempdir(), f"vrange-test-hangs-{os.getuid()}.log")


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


# --- capabilities --------------------------------------------------------------------------------
#
# A test states what it needs with ``@pytest.mark.requires(feature, reason)`` (or ``require(feature,
# reason)`` from a fixture); it is skipped where that feature is missing, and the skip names the
# feature, why the test needs it and why it is missing here (from ``vrange.features()``). Two kinds:
#
# - CAPABILITIES: what this kernel and process allow (a backend, a trap, root, a memory cgroup...).
# - BACKEND_TRAITS: what a backend spec does by design (the table in docs/backends.md). On a test
#   parametrized with ``backend`` they choose the specs it runs on: no cell is made for a spec
#   without the trait (the kernel never discards memfd-trap pages: there is nothing to skip).
#   Whether a spec runs here at all is a capability, checked by the ``backend`` fixture (the
#   report's kernel_reclaims of a trap that cannot run here is False: not a design fact).


@dataclass(frozen=True)
class Capability:
    description: str
    missing: Callable[[vrange.Features], str | None]
    """None where this process has it; otherwise why not."""


def _backend_missing(spec: str) -> Callable[[vrange.Features], str | None]:
    def missing(report: vrange.Features) -> str | None:
        name, _, trap = spec.partition(":")
        support = report.backend(name)
        if not support.usable:
            return f"backend {name!r} unavailable: {support.reason}"
        if trap and not report.trap(trap).usable:
            return f"the sigbus {trap} trap is unavailable: {report.trap(trap).reason}"
        return None

    return missing


def _dev_userfaultfd_missing(report: vrange.Features) -> str | None:
    attempts = {attempt.method: attempt.outcome for attempt in report.userfaultfd.attempts}
    if attempts["dev"].ok:
        return None
    return f"/dev/userfaultfd does not open ({attempts['dev'].error}; Linux 6.1+): " \
        f"{report.userfaultfd.dev_node}"


def _cgroup_missing(version: str) -> Callable[[vrange.Features], str | None]:
    def missing(report: vrange.Features) -> str | None:
        cgroup = report.cgroup
        if cgroup.version != version or cgroup.directory is None:
            return f"the memory controller is on cgroup {cgroup.version} here"
        if not os.access(cgroup.directory, os.W_OK):
            return f"{cgroup.directory} is not writable by this process"
        return None

    return missing


def _gil_switch_holding_missing(report: vrange.Features) -> str | None:
    # No public API says this (the one private call of the capabilities).
    from vrange._native import lib

    if lib.vr_gil_switches_can_be_held():
        return None
    return ("it reads CPython 3.11's GIL internals; on this Python vrange only detects and warns "
            "(use vrange.sources.Isolated)")


CAPABILITIES: dict[str, Capability] = {
    "root": Capability(
        "root privileges",
        lambda report: None if os.geteuid() == 0 else f"this process runs as uid {os.geteuid()}"),
    "uffd_backend": Capability("the uffd backend", _backend_missing("uffd")),
    "sigbus_backend": Capability("the sigbus backend", _backend_missing("sigbus")),
    "sigbus_uffd_trap": Capability("the sigbus backend's userfaultfd trap",
                                   _backend_missing("sigbus:uffd")),
    "sigbus_memfd_trap": Capability("the sigbus backend's memfd trap",
                                    _backend_missing("sigbus:memfd")),
    "any_backend": Capability(
        "a backend that runs here",
        lambda report: None if report.auto_backend else report.auto_reason),
    "full_userfaultfd": Capability(
        "a userfaultfd that serves faults inside system calls",
        lambda report: None if report.userfaultfd.full else report.userfaultfd.reason),
    "dev_userfaultfd": Capability("/dev/userfaultfd", _dev_userfaultfd_missing),
    "no_seccomp_filter": Capability(
        "no seccomp filter on this process",
        lambda report: None if report.userfaultfd.seccomp_mode == "disabled"
        else f"seccomp mode {report.userfaultfd.seccomp_mode!r}"),
    "cgroup_v1_memory": Capability("a writable cgroup v1 memory controller", _cgroup_missing("v1")),
    "cgroup_v2_memory": Capability("a writable cgroup v2 memory controller", _cgroup_missing("v2")),
    "no_memory_limit": Capability(
        "no memory cgroup limit on this process",
        lambda report: None if report.cgroup.memory_limit_bytes is None
        else f"limited to {report.cgroup.memory_limit_bytes} bytes at {report.cgroup.limit_set_at}"),
    "gil_switch_holding": Capability("holding off forced GIL switches", _gil_switch_holding_missing),
}

BACKEND_SPECS = ["uffd", "sigbus:uffd", "sigbus:memfd"]

BACKEND_TRAITS: dict[str, tuple[str, Callable[[str], bool]]] = {
    "kernel_reclaims": (
        "the kernel discards volatile pages by itself (MADV_FREE; vrange.testing.page_out)",
        lambda spec: spec in ("uffd", "sigbus:uffd")),
    "syscalls_served": (
        "a system call touching a purged page blocks until it is refilled, then succeeds",
        lambda spec: spec == "uffd"),
    "fault_signal": (
        "faults of GIL-holding threads are carried to them by the fault signal (SIGRTMIN+6)",
        lambda spec: spec == "uffd"),
    "uffd_handler": (
        "a userfaultfd handler thread and its workers serve the faults",
        lambda spec: spec == "uffd"),
    "sigbus_handler": (
        "a SIGBUS handler on the faulting thread refills purged pages",
        lambda spec: spec.startswith("sigbus:")),
}


def has_trait(spec: str, trait: str) -> bool:
    return BACKEND_TRAITS[trait][1](spec)


def kernel_reclaims(spec: str) -> bool:
    """The kernel discards this backend's volatile pages by itself (MADV_FREE, MADV_PAGEOUT)."""
    return has_trait(spec, "kernel_reclaims")


def syscalls_are_served(spec: str) -> bool:
    """A syscall touching a purged page blocks and succeeds (instead of failing with EFAULT)."""
    return has_trait(spec, "syscalls_served")


def missing_capability(feature: str, report: vrange.Features) -> str | None:
    if feature not in CAPABILITIES:
        raise KeyError(f"unknown capability {feature!r}; known: {sorted(CAPABILITIES)}")
    return CAPABILITIES[feature].missing(report)


def require(feature: str, reason: str, report: vrange.Features | None = None) -> None:
    """Skip the running test unless this process has ``feature``, naming it and ``reason``."""
    why_not = missing_capability(feature, report or vrange.features())
    if why_not is not None:
        pytest.skip(f"needs {feature} ({CAPABILITIES[feature].description}) {reason}: "
                    f"missing here: {why_not}")


@pytest.fixture(autouse=True)
def required_capabilities(request: pytest.FixtureRequest, report: vrange.Features) -> None:
    """Skip a test marked ``requires(feature, reason)`` where ``feature`` is missing."""
    for marker in request.node.iter_markers("requires"):
        feature = marker.args[0]
        if feature in BACKEND_TRAITS:
            continue  # chose the backend cells at collection
        require(feature, marker.kwargs.get("reason") or marker.args[1], report)


def usable_specs(report: vrange.Features) -> list[str]:
    """The backend specs that run here."""
    return [spec for spec in BACKEND_SPECS if _backend_missing(spec)(report) is None]


def raw_failure_signal(report: vrange.Features, spec: str) -> int:
    """How a process ends when a raw access meets a failing regenerator under the default policy:
    SIGBUS (poison), or SIGABRT on the uffd backend where the kernel lacks UFFDIO_POISON (6.6+)."""
    import signal

    if spec == "uffd" and "POISON" not in report.userfaultfd.range_ioctls:
        return signal.SIGABRT
    return signal.SIGBUS


# --- other processes -----------------------------------------------------------------------------


def python_command(code: str | None = None, *, module: str | None = None,
                   script: str | os.PathLike[str] | None = None, args: Sequence[str] = (),
                   flags: Sequence[str] = (), backend: str | None = None,
                   prelude: str = "") -> list[str]:
    """The command line of a fresh interpreter running ``code`` (dedented), ``-m module`` or a
    ``script`` file, with ``args``. With ``backend``, the code starts with ``import os, sys,
    threading, vrange`` and defines ``BACKEND`` and ``CHUNK``; ``prelude`` (dedented) comes next."""
    if sum(thing is not None for thing in (code, module, script)) != 1:
        raise TypeError("give exactly one of code, module, script")
    command = [sys.executable, *flags]
    if code is not None:
        header = ""
        if backend is not None:
            header = (f"import os, sys, threading, vrange\nBACKEND = {backend!r}\n"
                      f"CHUNK = {CHUNK}\n")
        command += ["-c", header + textwrap.dedent(prelude) + textwrap.dedent(code)]
    elif module is not None:
        command += ["-m", module]
    else:
        command.append(os.fspath(script))  # type: ignore[arg-type]
    return command + list(args)


def run_python(code: str | None = None, *, module: str | None = None,
               script: str | os.PathLike[str] | None = None, args: Sequence[str] = (),
               flags: Sequence[str] = (), backend: str | None = None, prelude: str = "",
               env: Mapping[str, str] | None = None, timeout: float = 60,
               **options: object) -> subprocess.CompletedProcess[str]:
    """Run a fresh interpreter (see :func:`python_command`) to completion and capture its output
    as text. ``env`` adds to (or overrides) this process's environment; ``options`` go to
    ``subprocess.run`` (``check`` is False unless given)."""
    environment = None if env is None else {**os.environ, **env}
    options.setdefault("capture_output", True)
    options.setdefault("check", False)
    return subprocess.run(  # type: ignore[call-overload, no-any-return]
        python_command(code, module=module, script=script, args=args, flags=flags,
                       backend=backend, prelude=prelude),
        text=True, timeout=timeout, env=environment, **options)


def helper_processes() -> list[int]:
    """The pids of this process's children (an Isolated source's helper is one)."""
    pids = []
    for task in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{task}/children") as children:
                pids.extend(int(pid) for pid in children.read().split())
        except FileNotFoundError:  # a thread that ended meanwhile
            continue
    return pids


# --- waiting ---------------------------------------------------------------------------------------


def wait_until(condition: Callable[[], object], what: str, timeout: float = 10.0) -> None:
    """Poll ``condition`` until it holds; fail naming ``what`` after ``timeout`` seconds. For
    conditions no event can announce (another process, the kernel, a thread blocked in C)."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out after {timeout} s waiting until {what}"
        time.sleep(0.001)


def threads_waiting_in_userfault() -> int:
    """How many threads of this process wait in the kernel for a userfaultfd fault to be resolved
    (their wchan is handle_userfault)."""
    count = 0
    for task in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{task}/wchan") as wchan:
                count += wchan.read().strip() == "handle_userfault"
        except (FileNotFoundError, ProcessLookupError):
            continue
    return count


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


@contextlib.contextmanager
def dropped_open() -> Iterator[None]:
    """For a block that drops the last reference to an open region (on purpose: reference counting
    alone must free it): expect the region's ResourceWarning ("unclosed"), and let the region go
    (the recorded warning holds it as its ``source``)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ResourceWarning)
        yield
    found = [(warning.category, str(warning.message)) for warning in caught]
    caught.clear()
    assert len(found) == 1 and found[0][0] is ResourceWarning and \
        found[0][1].startswith("unclosed <vrange.Region "), found


def backend_name(spec: str) -> str:
    """``"sigbus"`` for ``"sigbus:memfd"``: what ``Region.backend`` says."""
    return spec.partition(":")[0]


def resident_pages(region: vrange.Region, offset: int = 0, length: int | None = None) -> list[bool]:
    """For each page of the range: is it resident (mincore(2) on the region's public address)?"""
    length = len(region) - offset if length is None else length
    count = (length + PAGE - 1) // PAGE
    vector = (ctypes.c_ubyte * count)()
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    if libc.mincore(region.address + offset, length, vector) != 0:
        raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))
    return [bool(byte & 1) for byte in vector]


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Parametrize ``backend`` with every backend spec a test applies to (the backend traits it
    ``requires`` narrow it), and ``discard`` with the ways a backend's pages can be discarded: no
    cell is made for a combination that does not exist (the kernel never discards memfd-trap
    pages)."""
    traits = [marker.args[0] for marker in metafunc.definition.iter_markers("requires")
              if marker.args[0] in BACKEND_TRAITS]
    if "backend" not in metafunc.fixturenames:
        if traits:
            raise pytest.UsageError(f"{metafunc.definition.nodeid}: the backend traits {traits} "
                                    "apply to tests parametrized with 'backend' only")
        return
    specs = [spec for spec in BACKEND_SPECS if all(has_trait(spec, trait) for trait in traits)]
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
    spec = str(request.param)
    why_not = _backend_missing(spec)(report)
    if why_not is not None:
        pytest.skip(f"needs the {spec} backend: {why_not}")
    return spec


@pytest.fixture
def regenerator() -> CountingRegenerator:
    return CountingRegenerator()
