"""Scenarios: the things users rely on, each checked by behaviour on one backend spec.

A scenario is a function ``run(spec) -> note``: it raises (an ``AssertionError`` naming what went
wrong, or whatever the library raised) when the behaviour is wrong, raises :class:`NotApplicable`
when it cannot apply here (no root, no writable memory cgroup, advice the kernel refuses), and
otherwise returns a short note of what it saw. ``applies(spec)`` says in advance why a scenario
does not apply to a backend spec by design (None: it applies). The runner calls each in a forked
child with an alarm; code that is meant to kill a process runs in a forked grandchild here.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import json
import mmap
import os
import signal
import tempfile
import threading
import time
from array import array
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, cast

import vrange

from .. import testing
from .._tool import process_gone, remove_cgroup

__all__ = ["SCENARIOS", "NotApplicable", "Scenario", "scenario_names"]

CHUNK = vrange.DEFAULT_CHUNK_SIZE
SIZE = 16 * CHUNK
PAGE = mmap.PAGESIZE
GRANDCHILD_TIMEOUT_S = 30
CELL_TIMEOUT_S = 60.0
"""The alarm of the cell running a scenario (the runner sets it from ``--timeout``): the alarms of a
scenario's own children scale with it, so a slower machine (software emulation) that is given more
time per cell gives them more too."""


def _child_timeout(seconds: int) -> int:
    """``seconds`` at the default cell timeout, scaled to the cell's timeout, and inside it."""
    scaled = int(seconds * max(1.0, CELL_TIMEOUT_S / 60.0))
    return max(1, min(scaled, int(CELL_TIMEOUT_S) - 5) if CELL_TIMEOUT_S > 10 else scaled)
PRESSURE_LIMIT = 96 << 20
PRESSURE_CACHE = 256 << 20
PRESSURE_PART = 16 * CHUNK


class NotApplicable(Exception):
    """The scenario cannot apply here; the message says why (the cell is ``n/a``)."""


@dataclass(frozen=True)
class Scenario:
    """One behaviour users rely on, checked on one backend spec at a time."""

    name: str
    description: str
    run: Callable[[str], str]
    applies: Callable[[str], str | None] = lambda spec: None
    """Why the scenario does not apply to a backend spec by design, or None."""


# --- helpers -------------------------------------------------------------------------------------------

_PERIOD = 251  # a prime: a page (4096 bytes) or chunk moved elsewhere never matches its new place
_BASE = bytes((position * 7 + 3) % _PERIOD for position in range(_PERIOD))


def pattern(offset: int, length: int) -> bytes:
    """The bytes the scenarios' regenerators define at ``offset``."""
    start = offset % _PERIOD
    repeats = (start + length) // _PERIOD + 1
    return (_BASE * repeats)[start:start + length]


def regenerate(offset: int, buffer: memoryview) -> None:
    """A Python regenerator filling :func:`pattern`."""
    buffer[:] = pattern(offset, len(buffer))


def _backend(spec: str) -> vrange.BackendName:
    """A backend spec of the matrix (from ``usable_specs()`` or the command line; Region checks
    it), typed for Region."""
    return cast(vrange.BackendName, spec)


def _purged(spec: str, size: int = SIZE) -> vrange.Region:
    """A region whose every chunk was materialized, marked volatile and purged."""
    region = vrange.Region(size, regenerate, backend=_backend(spec))
    region.mark_nonvolatile()
    region.mark_volatile()
    region.purge()
    return region


def _backend_parts(spec: str) -> tuple[str, str | None]:
    name, _, trap = spec.partition(":")
    return name, trap or None


def _in_grandchild(body: Callable[[], None], timeout: int = GRANDCHILD_TIMEOUT_S) -> tuple[int, str]:
    """Run ``body`` in a forked grandchild (code that may kill its process); returns its wait status
    and what it wrote to its standard error. The grandchild exits 0 when ``body`` returns, 3 when it
    raises."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the grandchild
        os.close(read_end)
        os.dup2(write_end, 2)
        signal.alarm(_child_timeout(timeout))
        code = 0
        try:
            body()
        except BaseException as error:  # noqa: BLE001 - reported to the parent
            os.write(2, f"\n{type(error).__name__}: {error}\n".encode())
            code = 3
        os._exit(code)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as output:
        text = output.read().decode(errors="replace")
    _, status = os.waitpid(pid, 0)
    return status, text


def _describe_status(status: int) -> str:
    if os.WIFSIGNALED(status):
        return f"killed by {signal.Signals(os.WTERMSIG(status)).name}"
    return f"exited {os.waitstatus_to_exitcode(status)}"


def _say(text: str) -> None:
    """A marker for the parent, from a grandchild (its standard error goes to the parent)."""
    os.write(2, f"{text}\n".encode())


# --- the basics ----------------------------------------------------------------------------------------


def first_touch(spec: str) -> str:
    with vrange.Region(SIZE, regenerate, backend=_backend(spec)) as region:
        assert bytes(region[:]) == pattern(0, SIZE), "bytes differ"
        assert region.mark_nonvolatile() is False, "a first touch was reported as a purge"
        regenerated = region.stats().bytes_regenerated
        assert regenerated >= SIZE, f"only {regenerated} bytes were regenerated"
    return f"{SIZE // CHUNK} chunks regenerated on first access"


def purge_and_refill(spec: str) -> str:
    with _purged(spec) as region:
        assert region.stats().resident_bytes == 0, "purge left pages resident"
        assert bytes(region[:]) == pattern(0, SIZE), "bytes differ after refill"
        assert region.mark_nonvolatile() is True, "the purge was not reported"
    return "purge() emptied it; every byte refilled; mark_nonvolatile() reported it"


def _kernel_discard_applies(spec: str) -> str | None:
    if spec == "sigbus:memfd":
        return "the kernel cannot discard the memfd trap's pages (only vrange purges them)"
    return None


def kernel_discard(spec: str) -> str:
    advice = {entry.name: entry.outcome for entry in vrange.features().madvise}
    if "PAGEOUT" in advice and not advice["PAGEOUT"].ok:
        raise NotApplicable(f"the kernel refuses MADV_PAGEOUT (needs Linux 5.4+): "
                            f"{advice['PAGEOUT'].error}")
    with vrange.Region(SIZE, regenerate, backend=_backend(spec)) as region:
        region.mark_nonvolatile()
        region.mark_volatile()
        testing.page_out(region)
        assert region.mark_nonvolatile(), "MADV_PAGEOUT discarded nothing"
        assert bytes(region[:]) == pattern(0, SIZE), "bytes differ after refill"
        reclaimed = region.stats().purges_by_reason.get("kernel", 0)
    return f"MADV_PAGEOUT discarded volatile pages ({reclaimed} kernel purges counted); refilled"


def raw_syscall(spec: str) -> str:
    with _purged(spec) as region:
        read_end, write_end = os.pipe()
        outcome: object
        try:
            with memoryview(region) as view:
                try:
                    written = os.write(write_end, view[:PAGE])
                    outcome = written == PAGE and os.read(read_end, PAGE) == pattern(0, PAGE)
                except OSError as error:
                    outcome = errno.errorcode.get(error.errno or 0, error.errno)
        finally:
            os.close(read_end)
            os.close(write_end)
    expected = True if spec == "uffd" else "EFAULT"  # the documented behaviour of each backend
    assert outcome == expected, f"os.write gave {outcome!r}, documented: {expected!r}"
    return "os.write blocked and wrote the refilled page" if outcome is True \
        else "os.write failed with EFAULT, as documented"


def io_write(spec: str) -> str:
    with _purged(spec) as region:
        read_end, write_end = os.pipe()
        received: list[bytes] = []
        reader = threading.Thread(target=lambda: received.append(
            b"".join(iter(lambda: os.read(read_end, 65536), b""))))
        reader.start()
        try:
            with memoryview(region) as view:
                vrange.io.write(write_end, view)
        finally:
            os.close(write_end)
            reader.join()
            os.close(read_end)
        assert received[0] == pattern(0, SIZE), "bytes differ"
    return f"{SIZE} bytes written from purged memory, all right"


def native_file_source(spec: str) -> str:
    content = os.urandom(SIZE)
    with tempfile.TemporaryFile() as file:
        file.write(content)
        file.flush()
        with vrange.Region(SIZE, vrange.sources.File(file.fileno()),
                           backend=_backend(spec)) as region:
            region.mark_nonvolatile()
            region.mark_volatile()
            region.purge()
            assert bytes(region[:]) == content, "bytes differ"
    return "refilled from the file by the native source"


def gil_released_access(spec: str) -> str:
    with _purged(spec) as region:
        # hashlib reads buffers larger than 2 KiB with the GIL released: the faults come from C
        # code that does not hold it.
        with memoryview(region) as view:
            digest = hashlib.sha256(view).hexdigest()
    assert digest == hashlib.sha256(pattern(0, SIZE)).hexdigest(), "bytes differ"
    return "hashlib.sha256 read the purged region with the GIL released"


def fork_child(spec: str) -> str:
    with _purged(spec) as region:
        pid = os.fork()
        if pid == 0:  # pragma: no cover - runs in the child
            signal.alarm(_child_timeout(GRANDCHILD_TIMEOUT_S))
            os._exit(0 if bytes(region[:]) == pattern(0, SIZE) else 1)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0, f"the child {_describe_status(status)}"
    return "a forked child refilled the purged region with the right bytes"


def backend_spec(spec: str) -> str:
    name, trap = _backend_parts(spec)
    with vrange.Region(SIZE, regenerate, backend=_backend(spec)) as region:
        got = (region.backend, region.trap, region.kernel_reclaims)
        expected = (name, trap, spec != "sigbus:memfd")
        assert got == expected, f"(backend, trap, kernel_reclaims) is {got}, expected {expected}"
        assert region.stats().trap == trap, f"stats().trap is {region.stats().trap!r}"
    return f"backend {name!r}" + (f", {trap} trap" if trap else "") + \
        (", the kernel reclaims" if expected[2] else ", only vrange purges")


# --- failures ------------------------------------------------------------------------------------------

FAILURE_MESSAGE = "regenerator lost its source"


class _Flaky:
    """Fails for the first chunk while ``fail`` is set."""

    def __init__(self) -> None:
        self.fail = True

    def __call__(self, offset: int, buffer: memoryview) -> None:
        if self.fail and offset < CHUNK:
            raise RuntimeError(FAILURE_MESSAGE)
        buffer[:] = pattern(offset, len(buffer))


def regeneration_failure(spec: str) -> str:
    # A library call raises RegenerationError; the chunks that failed stay missing, not half-filled.
    flaky = _Flaky()
    with vrange.Region(4 * CHUNK, flaky, backend=_backend(spec)) as region:
        try:
            region.mark_nonvolatile()
        except vrange.RegenerationError as error:
            assert isinstance(error.__cause__, RuntimeError), f"cause {error.__cause__!r}"
        else:
            raise AssertionError("mark_nonvolatile() did not raise RegenerationError")
        assert bytes(region[CHUNK:2 * CHUNK]) == pattern(CHUNK, CHUNK), "other chunks differ"
        flaky.fail = False
        region.mark_nonvolatile()
        assert bytes(region[0:CHUNK]) == pattern(0, CHUNK), "the retried chunk differs"

    # on_error="zeros" is the explicit opt-in to zeros on a raw access.
    with vrange.Region(4 * CHUNK, _Flaky(), backend=_backend(spec), on_error="zeros") as region:
        assert bytes(region[0:16]) == bytes(16), "on_error='zeros' did not give zeros"
        errors = region.stats().regeneration_errors
        assert errors == 1, f"{errors} regeneration errors counted, expected 1"
        assert bytes(region[CHUNK:CHUNK + 16]) == pattern(CHUNK, 16), "other chunks differ"

    # Poison: a raw access to the failed chunk is killed by SIGBUS, a syscall gets EFAULT. Without
    # UFFDIO_POISON (Linux 6.6+) the uffd backend's default is to abort instead.
    has_poison = spec != "uffd" or "POISON" in vrange.features().userfaultfd.range_ioctls
    policy: Literal["poison"] | None = "poison" if has_poison else None
    expected_signal = signal.SIGBUS if has_poison else signal.SIGABRT

    def raw_access() -> None:
        region = vrange.Region(4 * CHUNK, _Flaky(), backend=_backend(spec), on_error=policy)
        _say("before")
        region[5]
        _say("survived")

    status, output = _in_grandchild(raw_access)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == expected_signal, \
        f"a raw access to a failed chunk: the process {_describe_status(status)}, expected " \
        f"{expected_signal.name}: {output[-500:]}"
    assert "before" in output and "survived" not in output, output[-500:]
    assert FAILURE_MESSAGE in output, f"the regenerator's error was not reported: {output[-500:]}"
    note = f"RegenerationError; zeros; raw access killed by {expected_signal.name}"
    if not has_poison:
        return note + " (the kernel lacks UFFDIO_POISON: default policy 'abort')"

    flaky = _Flaky()
    with vrange.Region(4 * CHUNK, flaky, backend=_backend(spec), on_error="poison") as region:
        read_end, write_end = os.pipe()
        failure = None
        try:
            with memoryview(region) as view:
                try:
                    os.write(write_end, view[0:PAGE])
                except OSError as error:
                    failure = error.errno
        finally:
            os.close(read_end)
            os.close(write_end)
        assert failure == errno.EFAULT, f"a syscall on a poisoned chunk gave errno {failure}"
        flaky.fail = False
        region.mark_nonvolatile()  # clears the poison and regenerates
        assert bytes(region[0:PAGE]) == pattern(0, PAGE), "bytes differ after the poison cleared"
    return note + "; syscall EFAULT; poison cleared by mark_nonvolatile()"


# --- signals -------------------------------------------------------------------------------------------


class _SigAction(ctypes.Structure):
    # glibc's struct sigaction (x86-64 and arm64): handler, 1024-bit mask, flags, restorer.
    _fields_ = [("handler", ctypes.c_void_p), ("mask", ctypes.c_ulong * 16),
                ("flags", ctypes.c_int), ("restorer", ctypes.c_void_p)]


def _install_exit_on_sigbus() -> None:
    """The program's own SIGBUS handler: libc's ``_exit``, called with the signal number (7). No
    Python runs in the signal handler."""
    libc = ctypes.CDLL(None, use_errno=True)
    action = _SigAction()
    action.handler = ctypes.cast(libc._exit, ctypes.c_void_p).value
    if libc.sigaction(signal.SIGBUS, ctypes.byref(action), None) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))


def _foreign_sigbus() -> None:
    """Touch a file mapping beyond the end of its file: a SIGBUS that is not vrange's."""
    with tempfile.TemporaryFile() as file:
        file.write(b"x" * 2 * PAGE)
        file.flush()
        mapping = mmap.mmap(file.fileno(), 2 * PAGE)
        file.truncate(0)
        _say("touching")
        mapping[PAGE]


def foreign_sigbus(spec: str) -> str:
    def program_handler_first() -> None:
        _install_exit_on_sigbus()
        with _purged(spec) as region:
            assert bytes(region[:]) == pattern(0, SIZE), "bytes differ"
            _say("served")
            _foreign_sigbus()

    def program_handler_after() -> None:
        with _purged(spec) as region:
            assert bytes(region[:]) == pattern(0, SIZE), "bytes differ"
            _install_exit_on_sigbus()  # replaces vrange's handler, if it has one
            region.mark_volatile()
            region.purge()  # vrange notices, goes back in front and chains to the program's
            assert bytes(region[:]) == pattern(0, SIZE), "bytes differ after the replacement"
            _say("served")
            _foreign_sigbus()

    for order, body in (("before", program_handler_first), ("after", program_handler_after)):
        status, output = _in_grandchild(body)
        assert "served" in output, \
            f"handler installed {order} vrange: vrange's faults were not served " \
            f"({_describe_status(status)}): {output[-500:]}"
        assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == signal.SIGBUS, \
            f"handler installed {order} vrange: a foreign SIGBUS did not reach it, the process " \
            f"{_describe_status(status)}: {output[-500:]}"
    return "a foreign SIGBUS reached the program's handler installed before and after vrange"


# --- regions together ----------------------------------------------------------------------------------


def nested_regions(spec: str) -> str:
    with _purged(spec) as inner:

        def from_inner(offset: int, buffer: memoryview) -> None:
            buffer[:] = inner[offset:offset + len(buffer)]  # faults on the other region

        with vrange.Region(SIZE, from_inner, backend=_backend(spec)) as outer:
            assert bytes(outer[:]) == pattern(0, SIZE), "bytes differ (first fill)"
            outer.mark_volatile()
            inner.purge()
            outer.purge()
            assert outer.mark_nonvolatile() is True, "the purge was not reported"
            assert bytes(outer[:]) == pattern(0, SIZE), "bytes differ after both were purged"
            refilled = inner.stats().bytes_regenerated
            assert refilled >= 2 * SIZE, f"the inner region regenerated only {refilled} bytes"
    return "a regenerator reading another purged region: both refilled, bytes right"


def close_in_flight(spec: str) -> str:
    def slow(offset: int, buffer: memoryview) -> None:
        time.sleep(0.002)  # lets close() start while the slice's regeneration is in flight
        buffer[:] = bytes([offset // CHUNK % 251]) * len(buffer)

    outcomes = {"bytes": 0, "closed": 0}
    rounds = 12
    for round_number in range(rounds):
        region = vrange.Region(32 * CHUNK, slow, backend=_backend(spec))
        wrong: list[int] = []

        def slicer(first: int, region: vrange.Region = region, wrong: list[int] = wrong) -> None:
            try:
                for chunk in range(first, 32, 2):
                    if bytes(region[chunk * CHUNK:chunk * CHUNK + 8]) != bytes([chunk]) * 8:
                        wrong.append(chunk)
                outcomes["bytes"] += 1
            except ValueError:  # closed meanwhile: the clean error
                outcomes["closed"] += 1

        slicers = [threading.Thread(target=slicer, args=(first,), daemon=True) for first in (0, 1)]
        for thread in slicers:
            thread.start()
        time.sleep(0.005 + round_number * 0.002)
        region.close()
        for thread in slicers:
            thread.join(timeout=20)
            assert not thread.is_alive(), f"round {round_number}: a slicing thread hangs"
        assert not wrong, f"round {round_number}: wrong bytes in chunks {wrong}"
    return f"{rounds} closes under 2 faulting threads: {outcomes['bytes']} finished reading, " \
        f"{outcomes['closed']} got ValueError; no hang, no wrong byte"


# --- memory pressure -----------------------------------------------------------------------------------


def _word_indices(offset: int, length: int) -> bytes:
    """Every 8-byte word holds its own index in the region: a misplaced page cannot pass. (Built
    word by word, as tests/test_memory_pressure.py does: a refill rate the pressure monitor is
    proven to keep up with on a loaded machine.)"""
    return array("Q", range(offset // 8, (offset + length) // 8)).tobytes()


def _regenerate_word_indices(offset: int, buffer: memoryview) -> None:
    buffer[:] = _word_indices(offset, len(buffer))


def _memory_cgroup_parent() -> tuple[str, Path]:
    if os.geteuid() != 0:
        raise NotApplicable(f"needs root to make a memory cgroup (this process runs as uid "
                            f"{os.geteuid()})")
    cgroup = vrange.features().cgroup
    if cgroup.version == "none" or cgroup.directory is None:
        raise NotApplicable("no memory cgroup controller is mounted here")
    parent = Path(cgroup.directory)
    if not os.access(parent, os.W_OK):
        raise NotApplicable(f"this process's memory cgroup {parent} is not writable")
    if cgroup.version == "v2":
        controllers = (parent / "cgroup.controllers").read_text().split()
        if "memory" not in controllers:
            raise NotApplicable(f"the cgroup v2 memory controller is not available in {parent}")
        try:
            (parent / "cgroup.subtree_control").write_text("+memory")
        except OSError as error:
            raise NotApplicable(f"cannot enable the v2 memory controller beneath {parent}: "
                                f"{error}") from None
    return cgroup.version, parent


def _oom_kills(version: str, path: Path) -> int:
    name = "memory.oom_control" if version == "v1" else "memory.events"
    for line in (path / name).read_text().splitlines():
        key, _, value = line.partition(" ")
        if key == "oom_kill":
            return int(value)
    return 0


def remove_stale_cgroups(parent: Path | None = None) -> None:
    """Remove the memory cgroups of cells whose process is gone (killed by its alarm, or with the
    whole run by Ctrl-C): ``vrange-compat-PID`` beneath ``parent`` (default: this process's memory
    cgroup), never another live run's."""
    if parent is None:
        directory = vrange.features().cgroup.directory
        if os.geteuid() != 0 or directory is None:
            return
        parent = Path(directory)
    for stale in parent.glob("vrange-compat-*"):
        owner = stale.name.rpartition("-")[2]
        if owner.isdigit() and process_gone(int(owner)):  # not another run's
            remove_cgroup(stale)


def memory_pressure(spec: str) -> str:
    version, parent = _memory_cgroup_parent()
    remove_stale_cgroups(parent)
    path = parent / f"vrange-compat-{os.getpid()}"
    path.mkdir()
    try:
        limit_file = "memory.limit_in_bytes" if version == "v1" else "memory.max"
        (path / limit_file).write_text(str(PRESSURE_LIMIT))

        def fill_cache() -> None:
            (path / "cgroup.procs").write_text(str(os.getpid()))
            vrange.features(refresh=True)  # the limit that applies now
            wrong = []
            with vrange.Region(PRESSURE_CACHE, _regenerate_word_indices,
                               backend=_backend(spec)) as cache:
                cache.mark_volatile()  # once; then only read, as a cache is
                for _ in range(2):
                    for offset in range(0, PRESSURE_CACHE, PRESSURE_PART):
                        if cache[offset:offset + PRESSURE_PART] != \
                                _word_indices(offset, PRESSURE_PART):
                            wrong.append(offset)
                stats = cache.stats()
            _say("RESULT " + json.dumps({"wrong": wrong[:5], "purges": stats.purges,
                                         "by_reason": stats.purges_by_reason,
                                         "regenerated": stats.bytes_regenerated}))

        status, output = _in_grandchild(fill_cache, timeout=60)
        oom_kills = _oom_kills(version, path)
    finally:
        remove_cgroup(path)
    assert not (os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL), \
        f"OOM-killed (oom_kill count {oom_kills}): {output[-500:]}"
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, \
        f"the cache's process {_describe_status(status)}: {output[-500:]}"
    assert oom_kills == 0, f"{oom_kills} OOM kills in the cgroup"
    line = next(line for line in output.splitlines() if line.startswith("RESULT "))
    result = json.loads(line[len("RESULT "):])
    assert result["wrong"] == [], f"wrong bytes in the parts at offsets {result['wrong']}"
    assert result["purges"] > 0 and result["regenerated"] > PRESSURE_CACHE, \
        f"nothing was taken back: {result}"
    reasons = ", ".join(f"{reason} {count}" for reason, count in result["by_reason"].items() if count)
    return f"a {PRESSURE_CACHE >> 20} MiB cache in a {PRESSURE_LIMIT >> 20} MiB cgroup {version}: " \
        f"not OOM-killed, purges ({reasons}), every byte right"


SCENARIOS: dict[str, Scenario] = {scenario.name: scenario for scenario in [
    Scenario("first-touch", "the first access fills every chunk with the regenerator's bytes; "
             "mark_nonvolatile() reports no purge", first_touch),
    Scenario("purge-refill", "purge() leaves nothing resident; reads refill every byte; "
             "mark_nonvolatile() reports the purge", purge_and_refill),
    Scenario("kernel-discard", "the kernel discards volatile pages itself (MADV_PAGEOUT via "
             "vrange.testing.page_out); they refill with the right bytes", kernel_discard,
             _kernel_discard_applies),
    Scenario("raw-syscall", "os.write from a purged page: the uffd backend blocks and writes, the "
             "sigbus backend fails with EFAULT (the documented behaviour)", raw_syscall),
    Scenario("io-write", "vrange.io.write from purged memory writes every byte right on every "
             "backend", io_write),
    Scenario("file-source", "the native vrange.sources.File source refills purged chunks from a "
             "file", native_file_source),
    Scenario("gil-released", "C code reading with the GIL released (hashlib) faults on purged "
             "pages and gets the right bytes", gil_released_access),
    Scenario("fork-child", "a forked child refills a purged region with the right bytes",
             fork_child),
    Scenario("backend-spec", "the backend spec is honoured: Region.backend, .trap and "
             ".kernel_reclaims say what was asked for", backend_spec),
    Scenario("regeneration-failure", "a failing regenerator: mark_nonvolatile() raises "
             "RegenerationError; on_error='zeros' gives zeros; a raw access is killed by SIGBUS "
             "(poison) and a syscall gets EFAULT; the next mark_nonvolatile() recovers",
             regeneration_failure),
    Scenario("foreign-sigbus", "a SIGBUS that is not vrange's (a truncated file mapping) reaches "
             "the program's handler installed before or after vrange", foreign_sigbus),
    Scenario("nested-regions", "a regenerator reading another purged region: both refill, bytes "
             "right, purge reported", nested_regions),
    Scenario("close-in-flight", "close() while two threads fault on the region: no hang, no "
             "crash, each read gives the right bytes or ValueError", close_in_flight),
    Scenario("memory-pressure", "a volatile cache 2.7x its memory cgroup's limit (root only) is "
             "reclaimed and refilled, not OOM-killed", memory_pressure),
]}
"""Every scenario, by name, in the order the matrix shows them."""


def scenario_names() -> list[str]:
    """The names of every scenario, in matrix order."""
    return list(SCENARIOS)
