"""``python -m vrange stress``: threads × regions doing everything at once, every byte checked.

Each backend runs in a child process of its own (``python -m vrange stress --child``), so a crash
(death by a signal) or a hang is counted against that backend instead of ending the tool. In the
child, worker threads share a set of regions whose regenerators are a Python pattern function of
the offset, :class:`vrange.sources.Zeros`, :class:`vrange.sources.File` over a temporary file of
known content and :class:`vrange.sources.Isolated` (the same pattern function in a helper process).
Every worker owns some regions (it alone writes them, changes their volatility, closes and re-creates
them, and forks to read them from a child) and reads, purges, pages out and copies through system
calls from every region. A model of each region says what every byte may hold, and every byte read
(directly, through a pipe, a file, ``vrange.io`` or a forked child) is checked against it.

The model. A chunk that is pinned (non-volatile) holds exactly the bytes last written to it, or the
regenerator's bytes where nothing was written. A chunk marked volatile may lose its written bytes at
any time: each of its pages reads either as the written bytes or as the regenerator's (a purge or the
memfd trap reverts whole chunks, the kernel single pages). ``mark_nonvolatile(report=True)`` then says
which chunks were purged: a chunk it does not report must read exactly as written. A read that raced a
discard (``purge``, ``page_out``) of its region may see a page change under it ("torn": every byte from
one of the two alternatives); only such reads are allowed torn pages. The stress applies no memory
pressure: run it where the kernel has no reason to reclaim (it would tear pages the model does not
expect to change).

A watchdog thread reports a hang when a worker makes no progress for ``--watchdog`` seconds (every
thread's stack goes to stderr); a C-level timer (faulthandler) backs it up when no Python thread can
run.
"""

from __future__ import annotations

import argparse
import collections
import ctypes
import dataclasses
import errno
import faulthandler
import fcntl
import functools
import itertools
import json
import logging
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Optional, cast

from ._backends import features, usable_specs
from ._tool import StatusLine, UsageError, child_process, kill_process_group, show_progress

logger = logging.getLogger("vrange.stress")

PAGE = os.sysconf("SC_PAGE_SIZE")
DEFAULT_SECONDS = 30.0
DEFAULT_THREADS = 4
DEFAULT_REGIONS = 8
DEFAULT_WATCHDOG = 20.0
MAX_SECONDS = 86400.0
MAX_THREADS = 256
MAX_REGIONS = 1024
DEFAULT_SEED = 2014
REGENERATORS = ("python", "zeros", "file", "isolated")
CHUNK_SIZES = (PAGE, 16 << 10, 64 << 10)
MAX_CHUNKS = 24
MAX_REGION = MAX_CHUNKS * max(CHUNK_SIZES)
FILE_SLACK = 1 << 20
"""The File source starts at a page-aligned offset below this, different for each region made."""
SYSCALL_MAX = 256 << 10
"""At most this much per copy through a pipe (whose capacity is raised to 1 MiB)."""
PATTERN_PERIOD = 2097169
"""The pattern is this many random bytes, repeated (a prime longer than any region): it never repeats
within a region, and regions with different salts start it at different places."""
PATTERN_SEED = 0x5EED
FORK_TIMEOUT = 10.0
"""Seconds a forked child may take to read, check and exit before it is killed as hung."""
HANG_EXIT_STATUS = 75
"""A child that the watchdog ends exits with this status (after printing its report)."""
MAX_FAILURES_KEPT = 20
NO_PROGRESS_RETRIES = 16
"""EFAULT retries without progress before a copy is given up as starved (a purger discarding the
buffer faster than the system call can use it is a documented limit, not a failure)."""
INJECT_EVERY = 7
"""With ``--inject wrong-bytes``, every 7th Python regeneration fills the chunk from the wrong
offset (one page further): a simulated library bug the checker must report."""
INJECTIONS = ("wrong-bytes", "hang", "gil-hang", "crash")
"""Simulated failures (hidden option ``--inject``), to test that the stress reports them: wrong
bytes from the Python regenerators; a worker that blocks for ever (the watchdog), one that holds the
GIL for ever (faulthandler's timer), one that dies by SIGSEGV (a crash)."""
OPERATION_WEIGHTS: dict[str, float] = {
    "read": 20,             # bytes(view[a:b]), any region
    "read_nogil": 4,        # ctypes.memmove out of the region, the GIL released, any region
    "write": 10,            # view[a:b] = data on pinned chunks, own regions
    "write_nogil": 3,       # ctypes.memmove into pinned chunks, the GIL released, own regions
    "pipe_write": 6,        # os.write(pipe, view[a:b]), read back from the pipe, any region
    "file_pwrite": 4,       # os.pwrite(file, view[a:b]), read back from the file, any region
    "pipe_readv": 4,        # os.readv(pipe, [views]) into pinned chunks, own regions
    "file_preadv": 3,       # os.preadv(file, [views]) into pinned chunks, own regions
    "io_write": 2,          # vrange.io.write from pinned chunks (EFAULT-safe), own regions
    "io_readinto": 2,       # vrange.io.readinto pinned chunks, own regions
    "mark_volatile": 8,     # own regions
    "mark_nonvolatile": 8,  # report=True, every chunk checked, own regions
    "pinned": 4,            # with region.pinned(...): purge inside takes nothing, a write is kept
    "purge": 6,             # any region
    "page_out": 5,          # MADV_PAGEOUT (vrange.testing.page_out), any region the kernel reclaims
    "prefault": 2,          # any region
    "stats": 1,             # any region
    "recreate": 0.5,        # close and make a new region (new regenerator, salt, size), own regions
    "fork": 0.3,            # a child reads and checks, own regions
}
OPERATIONS = tuple(OPERATION_WEIGHTS)
OWN_OPERATIONS = frozenset({"write", "write_nogil", "pipe_readv", "file_preadv", "io_write", "io_readinto",
                            "mark_volatile", "mark_nonvolatile", "pinned", "recreate", "fork"})
MIN_INTERVAL = {"fork": 0.5, "recreate": 0.2}
"""Seconds between two of these per worker (a fork of a process with Isolated regions starts helper
processes; re-creating one starts a helper too)."""

METRICS = ("checks", "bytes_checked", "unverified", "torn_pages", "efault_retries", "starved",
           "wrong_bytes", "wrong_checks", "violations", "errors", "close_refused",
           "fork_children", "fork_hangs", "fork_crashes", "regions_made")


# --- the pattern ---------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _pattern_table() -> bytes:
    return random.Random(PATTERN_SEED).randbytes(PATTERN_PERIOD)


def pattern_bytes(salt: int, offset: int, length: int) -> bytes:
    """The bytes ``[offset, offset + length)`` of the deterministic pattern numbered ``salt``."""
    table = _pattern_table()
    start = (offset + salt * 7919 * PAGE) % PATTERN_PERIOD
    out = table[start:start + length]
    while len(out) < length:
        out += table[:length - len(out)]
    return out


def isolated_pattern(offset: int, buf: memoryview, salt: int) -> None:
    """The Python regenerator of ``Isolated`` regions (run in the helper process)."""
    buf[:] = pattern_bytes(salt, offset, len(buf))


class PatternRegenerator:
    """The in-process Python regenerator: ``pattern_bytes(salt, offset, len(buf))``. Never lets
    the GIL go (sound at every fault point)."""

    def __init__(self, salt: int, inject_every: int = 0) -> None:
        self.salt = salt
        self.inject_every = inject_every
        self._calls = itertools.count(1)  # next() is atomic under the GIL

    def __call__(self, offset: int, buf: memoryview) -> None:
        call = next(self._calls)
        if self.inject_every and call % self.inject_every == 0:
            offset += PAGE  # the simulated bug: the chunk is filled from the wrong offset
        buf[:] = pattern_bytes(self.salt, offset, len(buf))

    @property
    def calls(self) -> int:
        return next(self._calls) - 1  # consumes one number: read once, at the end


# --- the report ----------------------------------------------------------------------------------


@dataclass
class BackendReport:
    """What one backend's stress run did and found."""

    backend: str
    seconds: float = 0.0
    operations: dict[str, int] = field(default_factory=dict)
    """Operations done, by kind (see OPERATION_WEIGHTS)."""
    faults: int = 0
    """Faults served by regenerating a chunk (``RegionStats.faults_served`` of every region made;
    in the report of a run that did not finish, of the regions closed until then). The same holds
    for the other RegionStats sums below."""
    bytes_regenerated: int = 0
    python_regenerations: int = 0
    """Calls of the in-process Python regenerators."""
    purges_by_reason: dict[str, int] = field(default_factory=dict)
    volatile_refills: int = 0
    regeneration_errors: int = 0
    checks: int = 0
    """Reads checked against the model."""
    bytes_checked: int = 0
    unverified: int = 0
    """Reads not checked: the region's owner changed the chunks meanwhile."""
    torn_pages: int = 0
    """Pages that changed while a read raced a discard of its region (each byte from one of the two
    alternatives): allowed, counted."""
    efault_retries: int = 0
    starved: int = 0
    wrong_bytes: int = 0
    wrong_checks: int = 0
    """Checks that found wrong bytes."""
    violations: int = 0
    """Broken promises other than bytes: ``purge`` discarding pinned chunks, ``mark_nonvolatile``
    reporting a pinned chunk purged."""
    errors: int = 0
    """Unexpected exceptions (RegenerationError, EFAULT on the uffd backend, ...)."""
    hangs: int = 0
    """The stress process (watchdog) or a forked child (no exit within its timeout) hung."""
    crashes: int = 0
    """The stress process or a forked child died by a signal, or exited without a report."""
    close_refused: int = 0
    fork_children: int = 0
    fork_hangs: int = 0
    fork_crashes: int = 0
    regions_made: int = 0
    failures: list[str] = field(default_factory=list)
    """The first failures, described."""
    library_warnings: list[str] = field(default_factory=list)
    """The first warnings vrange logged."""
    library_warning_count: int = 0
    detail: str = ""
    """Why the run ended early (hang, crash), with the end of its stderr."""
    complete: bool = False
    """The run finished and reported (False: the numbers are the last progress seen)."""

    @property
    def ok(self) -> bool:
        """No wrong byte, broken promise, unexpected error, hang or crash."""
        return self.complete and not (self.wrong_bytes or self.wrong_checks or self.violations
                                      or self.errors or self.hangs or self.crashes)

    @property
    def total_operations(self) -> int:
        return sum(self.operations.values())

    def as_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["ok"] = self.ok
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BackendReport:
        names = {item.name for item in dataclasses.fields(cls)}
        return cls(**{key: value for key, value in data.items() if key in names})


@dataclass
class StressOptions:
    """How long, how wide and with what to stress each backend."""

    seconds: float = DEFAULT_SECONDS
    threads: int = DEFAULT_THREADS
    regions: int = DEFAULT_REGIONS
    seed: int = DEFAULT_SEED
    watchdog: float = DEFAULT_WATCHDOG
    regenerators: tuple[str, ...] = REGENERATORS
    inject: str = ""
    """A simulated failure (INJECTIONS), for tests of the stress itself."""

    def arguments(self) -> list[str]:
        """The command-line arguments that give these options."""
        arguments = ["--seconds", repr(self.seconds), "--threads", str(self.threads),
                     "--regions", str(self.regions), "--seed", str(self.seed),
                     "--watchdog", repr(self.watchdog),
                     "--regenerators", ",".join(self.regenerators)]
        if self.inject:
            arguments += ["--inject", self.inject]
        return arguments


# --- one region and its model --------------------------------------------------------------------


class Slot:
    """One region (re-created now and then) with its model; owned by one worker."""

    def __init__(self, index: int, owner: int) -> None:
        self.index = index
        self.owner = owner
        self.lock = threading.Lock()
        self.region: Any = None  # vrange.Region, or None while re-created
        self.generation = 0
        self.kind = ""
        self.source: Any = None
        self.size = 0
        self.chunk = 0
        self.chunks = 0
        self.pattern = b""
        self.content = bytearray()
        """The bytes last written (or the regenerator's where nothing was): exact where pinned."""
        self.volatile: list[bool] = []
        self.pins: list[int] = []
        """Per chunk: mark_nonvolatile's pins not yet released by mark_volatile (counted)."""
        self.versions: list[int] = []
        """Per chunk: odd while the owner changes it, bumped at every change."""
        self.closing = False
        self.users = 0
        """Threads holding a memoryview of the region (every use holds one: close() refuses)."""
        self.discards_active = 0
        self.discards_started = 0
        from ._backends import PURGE_REASONS

        # Every key from the start: a progress report reads these while the owner adds to them.
        self.totals: collections.Counter[str] = collections.Counter(
            {key: 0 for key in ("faults_served", "bytes_regenerated", "volatile_refills",
                                "regeneration_errors",
                                *(f"purges_{reason}" for reason in PURGE_REASONS))})
        """RegionStats of the regions this slot closed (and, at the end, of its last one)."""
        self.regenerators: list[PatternRegenerator] = []

    def touching(self, start: int, end: int) -> tuple[int, int]:
        """Chunks [first, end) the byte range touches."""
        if end <= start:
            return start // self.chunk, start // self.chunk
        return start // self.chunk, -(-end // self.chunk)

    def chunk_end(self, chunk: int) -> int:
        return min((chunk + 1) * self.chunk, self.size)


@dataclass
class Snapshot:
    """What a reader knew about a region when it started a use of it."""

    slot: Slot
    region: Any
    view: memoryview
    generation: int
    start: int
    end: int
    first: int
    last: int
    versions: list[int]
    content: bytes
    pattern: bytes
    volatile: list[bool]
    chunk: int
    chunk_atomic: bool
    discards_started: int
    quiet: bool
    read_start: int = 0
    read_end: int = 0

    def release(self) -> None:
        self.view.release()


@dataclass
class Check:
    wrong: int = 0
    torn: int = 0
    problem: str = ""


def _differing(left: bytes, right: bytes) -> int:
    return sum(1 for a, b in zip(left, right) if a != b)


def compare(snapshot: Snapshot, offset: int, data: bytes, strict: bool) -> Check:
    """Check ``data``, read at ``offset`` of the region, against the snapshot's model.

    Pinned chunks must hold the written bytes exactly. A page of a volatile chunk must be either the
    written bytes or the regenerated ones (on the memfd trap the whole chunk one or the other);
    unless ``strict`` (the read raced a discard), a page may also be torn between the two.
    """
    lo = offset - snapshot.start
    if data == snapshot.content[lo:lo + len(data)]:
        return Check()
    result = Check()
    end = offset + len(data)
    position = offset
    while position < end:
        chunk = position // snapshot.chunk
        chunk_stop = min(end, (chunk + 1) * snapshot.chunk)
        got = data[position - offset:chunk_stop - offset]
        written = snapshot.content[position - snapshot.start:chunk_stop - snapshot.start]
        if got != written:
            state = "volatile" if snapshot.volatile[chunk - snapshot.first] else "pinned"
            regenerated = snapshot.pattern[position - snapshot.start:chunk_stop - snapshot.start]
            if state == "pinned":
                result.wrong += _differing(got, written)
                result.problem = result.problem or (
                    f"pinned chunk {chunk} at offset {position}: {_differing(got, written)} of "
                    f"{len(got)} bytes differ from the bytes written"
                    + (" (they are the regenerator's)" if got == regenerated else ""))
            elif got == regenerated:
                pass
            elif snapshot.chunk_atomic and strict:
                wrong = min(_differing(got, written), _differing(got, regenerated))
                result.wrong += wrong
                result.problem = result.problem or (
                    f"volatile chunk {chunk} at offset {position} (memfd trap: whole chunks) "
                    f"is neither the bytes written nor the regenerated ones ({wrong} bytes off)")
            else:
                page_start = position
                while page_start < chunk_stop:
                    page_stop = min(chunk_stop, (page_start // PAGE + 1) * PAGE)
                    a, b = page_start - position, page_stop - position
                    got_page, written_page, regenerated_page = got[a:b], written[a:b], \
                        regenerated[a:b]
                    if got_page != written_page and got_page != regenerated_page:
                        if not strict and all(x == y or x == z for x, y, z in
                                              zip(got_page, written_page, regenerated_page)):
                            result.torn += 1
                        else:
                            wrong = min(_differing(got_page, written_page),
                                        _differing(got_page, regenerated_page))
                            result.wrong += wrong
                            result.problem = result.problem or (
                                f"volatile chunk {chunk}, page at offset {page_start}: neither the "
                                f"bytes written nor the regenerated ones ({wrong} bytes off"
                                f"{'' if strict else ', the read raced a discard'})")
                    page_start = page_stop
        position = chunk_stop
    return result


# --- the workers ---------------------------------------------------------------------------------


class Skip(Exception):
    """The operation does not apply now (no pinned chunk to write, the region is being replaced)."""


class Worker:
    """One thread's state: its random stream, its pipe and file, its counters."""

    def __init__(self, index: int, seed: int, directory: str) -> None:
        self.index = index
        self.rng = random.Random(seed * 1009 + index)
        self.pipe_r, self.pipe_w = os.pipe()
        try:
            fcntl.fcntl(self.pipe_w, 1031, 1 << 20)  # F_SETPIPE_SZ: room for SYSCALL_MAX
        except OSError:
            pass
        # Every pipe operation reads back what it wrote, so the data is always there; not
        # blocking means leftovers of a failed operation can be drained before the next one.
        os.set_blocking(self.pipe_r, False)
        self.file_fd = os.open(os.path.join(directory, f"worker-{index}"),
                               os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        self.operations: collections.Counter[str] = collections.Counter(
            {name: 0 for name in OPERATIONS})
        self.metrics: collections.Counter[str] = collections.Counter({name: 0 for name in METRICS})
        self.own: list[Slot] = []
        self.last: dict[str, float] = {}
        self.heartbeat = time.monotonic()
        self.current = "starting"

    def drain(self) -> None:
        """Drop what a failed operation left in the pipe."""
        try:
            while os.read(self.pipe_r, 1 << 20):
                pass
        except BlockingIOError:
            pass

    def close(self) -> None:
        for fd in (self.pipe_r, self.pipe_w, self.file_fd):
            os.close(fd)


def _reported_chunks(purged: list[tuple[int, int]], chunk_size: int, first: int, last: int,
                     volatile: Sequence[bool]) -> tuple[set[int], list[int]]:
    """The chunks a pin's report names as purged, and those among them it may not name: outside the
    pinned chunks [first, last), or not volatile when the pin began (``volatile[i]``: chunk
    ``first + i``)."""
    reported: set[int] = set()
    for start, size in purged:
        reported.update(range(start // chunk_size, -(-(start + size) // chunk_size)))
    stray = sorted(chunk for chunk in reported
                   if not first <= chunk < last or not volatile[chunk - first])
    return reported, stray

class Stress:
    """One backend's stress run, in this process (the child)."""

    def __init__(self, spec: str, options: StressOptions,
                 emit: Callable[[dict[str, Any]], None]) -> None:
        self.spec = spec
        self.options = options
        self.emit = emit
        self.stop = threading.Event()
        self.finished = threading.Event()
        self.failures: list[str] = []
        self.failure_lock = threading.Lock()
        self.warnings: list[str] = []
        self.warning_count = 0
        self.started = time.monotonic()
        self.main_heartbeat = time.monotonic()
        self.main_phase = "starting"
        self.report_lock = threading.Lock()
        self.directory = tempfile.mkdtemp(prefix="vrange-stress-")
        self.file_path = os.path.join(self.directory, "source")
        self.file_data = random.Random(options.seed ^ 0xF11E).randbytes(MAX_REGION + FILE_SLACK)
        with open(self.file_path, "wb") as file:
            file.write(self.file_data)
        self.salts = itertools.count(options.seed * 1000 + 1)
        self.workers = [Worker(index, options.seed, self.directory)
                        for index in range(options.threads)]
        self.slots = [Slot(index, index % options.threads) for index in range(options.regions)]
        for slot in self.slots:
            self.workers[slot.owner].own.append(slot)
        self.kernel_reclaims = spec in ("uffd", "sigbus:uffd") or spec == "sigbus" and \
            self._auto_trap() == "uffd"
        self.chunk_atomic = False
        # page_out needs MADV_PAGEOUT (Linux 5.4+) as well as a region the kernel reclaims.
        self.can_page_out = self.kernel_reclaims and features().madvise_accepted("PAGEOUT")
        self.operations = [name for name in OPERATIONS
                           if name != "page_out" or self.can_page_out]
        self.weights = [OPERATION_WEIGHTS[name] for name in self.operations]

    @staticmethod
    def _auto_trap() -> str | None:
        from ._backends import resolve_backend

        return resolve_backend("sigbus").trap

    # --- bookkeeping --------------------------------------------------------------------------

    def fail(self, worker: Worker | None, what: str) -> None:
        """Keep (and log) the first failures."""
        who = f"thread {worker.index}, {worker.current}" if worker else self.main_phase
        with self.failure_lock:
            if len(self.failures) >= MAX_FAILURES_KEPT:
                return
            self.failures.append(f"[{time.monotonic() - self.started:.2f} s, {who}] {what}")
        logger.error("%s: %s", self.spec, what)
        # Should the process die next, the parent has this failure.
        self.emit({"progress": self.report(complete=False).as_dict()})

    def account(self, worker: Worker, snapshot: Snapshot, offset: int, data: bytes,
                strict: bool, how: str) -> None:
        """Check ``data`` and count the result."""
        result = compare(snapshot, offset, data, strict)
        worker.metrics["checks"] += 1
        worker.metrics["bytes_checked"] += len(data)
        worker.metrics["torn_pages"] += result.torn
        if result.wrong:
            worker.metrics["wrong_bytes"] += result.wrong
            worker.metrics["wrong_checks"] += 1
            slot = snapshot.slot
            self.fail(worker, f"WRONG BYTES ({how}) region {slot.index} generation "
                              f"{snapshot.generation} ({slot.kind}, {slot.size} bytes, chunk "
                              f"{snapshot.chunk}): {result.problem}")

    def report(self, complete: bool) -> BackendReport:
        """The report so far (``complete``: the run has finished)."""
        operations: collections.Counter[str] = collections.Counter()
        metrics: collections.Counter[str] = collections.Counter()
        for worker in self.workers:
            operations.update(dict(worker.operations))
            metrics.update(dict(worker.metrics))
        totals: collections.Counter[str] = collections.Counter()
        python_calls = 0
        for slot in self.slots:  # closed regions only, until the end
            totals.update(dict(slot.totals))
            if complete:
                python_calls += sum(regenerator.calls for regenerator in slot.regenerators)
        hangs = metrics["fork_hangs"]
        crashes = metrics["fork_crashes"]
        return BackendReport(
            backend=self.spec,
            seconds=round(time.monotonic() - self.started, 2),
            operations={name: operations[name] for name in self.operations},
            faults=totals["faults_served"],
            bytes_regenerated=totals["bytes_regenerated"],
            python_regenerations=python_calls,
            purges_by_reason={key.removeprefix("purges_"): value for key, value in totals.items()
                              if key.startswith("purges_")},
            volatile_refills=totals["volatile_refills"],
            regeneration_errors=totals["regeneration_errors"],
            checks=metrics["checks"], bytes_checked=metrics["bytes_checked"],
            unverified=metrics["unverified"], torn_pages=metrics["torn_pages"],
            efault_retries=metrics["efault_retries"], starved=metrics["starved"],
            wrong_bytes=metrics["wrong_bytes"], wrong_checks=metrics["wrong_checks"],
            violations=metrics["violations"], errors=metrics["errors"],
            hangs=hangs, crashes=crashes, close_refused=metrics["close_refused"],
            fork_children=metrics["fork_children"], fork_hangs=metrics["fork_hangs"],
            fork_crashes=metrics["fork_crashes"], regions_made=metrics["regions_made"],
            failures=list(self.failures), library_warnings=list(self.warnings),
            library_warning_count=self.warning_count, complete=complete)

    # --- regions --------------------------------------------------------------------------------

    def make_region(self, worker: Worker, slot: Slot) -> None:
        """Make a new region for the slot (its model: every byte the regenerator's, pinned)."""
        from . import sources
        from .region import BackendName, Region

        rng = worker.rng
        kind = rng.choice(self.options.regenerators)
        if kind == "isolated" and len(self.options.regenerators) > 1 and sum(
                other.kind == "isolated" for other in self.slots if other is not slot) >= \
                max(1, len(self.slots) // 8):
            # Each Isolated source is a helper process, and every forked child starts its own
            # helpers: a few are enough.
            kind = rng.choice([other for other in self.options.regenerators
                               if other != "isolated"])
        chunk = rng.choice(CHUNK_SIZES)
        chunks = rng.randint(4, MAX_CHUNKS)
        size = chunks * chunk
        if chunk > 3 * PAGE and rng.random() < 1 / 3:
            size -= chunk - 3 * PAGE  # a short tail chunk of 3 pages
        salt = next(self.salts)
        regenerators: list[PatternRegenerator] = []
        source: Any
        if kind == "python":
            source = PatternRegenerator(
                salt, INJECT_EVERY if self.options.inject == "wrong-bytes" else 0)
            regenerators.append(source)
            expected = pattern_bytes(salt, 0, size)
        elif kind == "zeros":
            source = sources.Zeros()
            expected = bytes(size)
        elif kind == "file":
            file_offset = rng.randrange(FILE_SLACK // PAGE) * PAGE
            source = sources.File(self.file_path, file_offset)
            expected = self.file_data[file_offset:file_offset + size]
        elif kind == "isolated":
            source = sources.Isolated(isolated_pattern, salt)
            expected = pattern_bytes(salt, 0, size)
        else:
            raise ValueError(f"unknown regenerator kind {kind!r}")
        region = Region(size, source, backend=cast(BackendName, self.spec), chunk_size=chunk)
        chunk = region.chunk_size
        self.chunk_atomic = region.trap == "memfd"
        count = -(-size // chunk)
        with slot.lock:
            slot.region, slot.kind, slot.source = region, kind, source
            slot.size, slot.chunk, slot.chunks = size, chunk, count
            slot.pattern, slot.content = expected, bytearray(expected)
            slot.volatile = [False] * count
            slot.pins = [0] * count
            slot.versions = [0] * count
            slot.regenerators.extend(regenerators)
            slot.generation += 1
            slot.closing = False
        worker.metrics["regions_made"] += 1

    def _add_stats(self, slot: Slot) -> None:
        stats = slot.region.stats()
        slot.totals["faults_served"] += stats.faults_served
        slot.totals["bytes_regenerated"] += stats.bytes_regenerated
        slot.totals["volatile_refills"] += stats.volatile_refills
        slot.totals["regeneration_errors"] += stats.regeneration_errors
        for reason, count in stats.purges_by_reason.items():
            slot.totals[f"purges_{reason}"] += count

    def close_region(self, worker: Worker, slot: Slot) -> None:
        """Close the slot's region, also while other threads still use it: close() must then
        refuse with BufferError (they hold memoryviews) and the region keep working."""
        with slot.lock:
            slot.closing = True  # no new use starts
        deadline = time.monotonic() + 10
        while True:
            # Under the slot's lock no use ends (a use releases its memoryview under it): the
            # count of users is exact while close() runs.
            with slot.lock:
                users = slot.users
                if not users:
                    self._add_stats(slot)
                try:
                    slot.region.close()
                except BufferError:
                    worker.metrics["close_refused"] += 1
                    if not users:
                        raise  # nothing of ours exports it: vrange refused on its own
                else:
                    if users:
                        worker.metrics["violations"] += 1
                        self.fail(worker, f"close() of region {slot.index} succeeded while "
                                          f"{users} thread(s) held a memoryview of it")
                    slot.region = None
                    return
            if time.monotonic() > deadline:
                raise RuntimeError(f"region {slot.index} still used by {users} thread(s) after "
                                   "10 s")
            time.sleep(0.0005)

    # --- uses -------------------------------------------------------------------------------------

    def begin(self, worker: Worker, slot: Slot, start: int | None = None,
              end: int | None = None, length: int | None = None) -> Snapshot:
        """Start a use of the slot's region over [start, end) (random if not given): a memoryview
        that keeps the region open, and what the model says about the range."""
        rng = worker.rng
        with slot.lock:
            if slot.region is None or slot.closing:
                raise Skip("region being replaced")
            if start is None or end is None:
                start, end = self.random_range(rng, slot.size, length)
            first, last = slot.touching(start, end)
            versions = slot.versions[first:last]
            if any(version & 1 for version in versions):
                raise Skip("chunks being changed")
            low, high = first * slot.chunk, min(last * slot.chunk, slot.size)
            snapshot = Snapshot(
                slot=slot, region=slot.region, view=memoryview(slot.region),
                generation=slot.generation, start=low, end=high, first=first, last=last,
                versions=versions, content=bytes(slot.content[low:high]),
                pattern=slot.pattern[low:high], volatile=slot.volatile[first:last],
                chunk=slot.chunk, chunk_atomic=self.chunk_atomic,
                discards_started=slot.discards_started, quiet=slot.discards_active == 0,
                read_start=start, read_end=end)
            slot.users += 1
        return snapshot

    def end(self, snapshot: Snapshot) -> tuple[bool, bool]:
        """End a use: (the owner changed nothing it covered, no discard of the region raced it)."""
        slot = snapshot.slot
        with slot.lock:
            snapshot.release()
            slot.users -= 1
            stable = slot.generation == snapshot.generation and \
                slot.versions[snapshot.first:snapshot.last] == snapshot.versions
            quiet = snapshot.quiet and slot.discards_active == 0 and \
                slot.discards_started == snapshot.discards_started
        return stable, quiet

    @staticmethod
    def random_range(rng: random.Random, size: int, length: int | None = None) -> tuple[int, int]:
        """A random byte range: mostly small, sometimes page-aligned, sometimes the whole
        region."""
        roll = rng.random()
        if length is None:
            if roll < 0.05:
                return 0, size
            length = rng.choice((1, 100, PAGE, 3 * PAGE + 17, 16 << 10, 70 << 10, 200 << 10))
        length = max(1, min(length, size))
        start = rng.randrange(0, size - length + 1)
        if roll < 0.3:
            start = start // PAGE * PAGE
        return start, start + length

    def page_range(self, rng: random.Random, slot: Slot) -> tuple[int, int]:
        """A page-aligned (offset, length) inside the region, as the volatility calls take."""
        pages = slot.size // PAGE
        roll = rng.random()
        if roll < 0.1:
            return 0, slot.size
        if roll < 0.5:  # whole chunks
            first = rng.randrange(slot.chunks)
            last = rng.randint(first + 1, min(slot.chunks, first + 4))
            return first * slot.chunk, min(last * slot.chunk, slot.size) - first * slot.chunk
        first = rng.randrange(pages)
        count = rng.randint(1, min(pages - first, 3 * slot.chunk // PAGE))
        return first * PAGE, count * PAGE

    def own_slot(self, worker: Worker) -> Slot:
        if not worker.own:
            raise Skip("this thread owns no region")
        return worker.rng.choice(worker.own)

    def any_slot(self, worker: Worker) -> Slot:
        return worker.rng.choice(self.slots)

    def busy(self, slot: Slot, first: int, last: int) -> None:
        """The owner starts or ends a change of chunks [first, last)."""
        with slot.lock:
            for chunk in range(first, last):
                slot.versions[chunk] += 1

    # --- operations: reads from any region ---------------------------------------------------------

    def op_read(self, worker: Worker) -> None:
        snapshot = self.begin(worker, self.any_slot(worker))
        start, end = snapshot.read_start, snapshot.read_end
        try:
            data = bytes(snapshot.view[start:end])
        finally:
            stable, quiet = self.end(snapshot)
        if stable:
            self.account(worker, snapshot, start, data, quiet, "read")
        else:
            worker.metrics["unverified"] += 1

    def op_read_nogil(self, worker: Worker) -> None:
        """A copy out of the region by C code that released the GIL (ctypes.memmove): a fault
        with no GIL held, in user mode."""
        snapshot = self.begin(worker, self.any_slot(worker))
        start, end = snapshot.read_start, snapshot.read_end
        try:
            target = ctypes.create_string_buffer(end - start)
            ctypes.memmove(target, snapshot.region.address + start, end - start)
            data = target.raw
        finally:
            stable, quiet = self.end(snapshot)
        if stable:
            self.account(worker, snapshot, start, data, quiet, "read with the GIL released")
        else:
            worker.metrics["unverified"] += 1

    def _copy_out(self, worker: Worker, snapshot: Snapshot, start: int, end: int,
                  to_file: bool) -> list[tuple[int, bytes]]:
        """Copy [start, end) of the region out through raw system calls (a pipe, or a file at the
        same offset), read back from the other end: one piece per call. On EFAULT (the sigbus
        backend, a purged page) make the page present and go on from where the kernel stopped."""
        pieces: list[tuple[int, bytes]] = []
        position = start
        no_progress = 0
        while position < end:
            stop = min(end, position + SYSCALL_MAX)
            try:
                if to_file:
                    count = os.pwrite(worker.file_fd, snapshot.view[position:stop], position)
                else:
                    count = os.write(worker.pipe_w, snapshot.view[position:stop])
            except OSError as error:
                if error.errno != errno.EFAULT:
                    raise
                count = 0
                if self.spec == "uffd":
                    raise RuntimeError("EFAULT from a system call on the uffd backend (it should "
                                       "have waited for the refill)") from error
            if count == 0:
                worker.metrics["efault_retries"] += 1
                no_progress += 1
                if no_progress > NO_PROGRESS_RETRIES:
                    worker.metrics["starved"] += 1
                    break
                page = position // PAGE * PAGE
                snapshot.region.prefault(page, min(snapshot.slot.size, page + 4 * PAGE) - page)
                continue
            no_progress = 0
            if to_file:
                data = os.pread(worker.file_fd, count, position)
            else:
                data = b""
                while len(data) < count:
                    data += os.read(worker.pipe_r, count - len(data))
            pieces.append((position, data))
            position += count
        return pieces

    def op_pipe_write(self, worker: Worker) -> None:
        self._syscall_read(worker, to_file=False)

    def op_file_pwrite(self, worker: Worker) -> None:
        self._syscall_read(worker, to_file=True)

    def _syscall_read(self, worker: Worker, to_file: bool) -> None:
        snapshot = self.begin(worker, self.any_slot(worker))
        start, end = snapshot.read_start, snapshot.read_end
        try:
            pieces = self._copy_out(worker, snapshot, start, end, to_file)
        finally:
            stable, quiet = self.end(snapshot)
        if not stable:
            worker.metrics["unverified"] += 1
            return
        for offset, data in pieces:
            self.account(worker, snapshot, offset, data, quiet,
                         "os.pwrite to a file" if to_file else "os.write to a pipe")

    def op_prefault(self, worker: Worker) -> None:
        slot = self.any_slot(worker)
        snapshot = self.begin(worker, slot, 0, 0)
        try:
            offset, length = self.page_range(worker.rng, slot)
            snapshot.region.prefault(offset, length)
        finally:
            self.end(snapshot)

    def op_stats(self, worker: Worker) -> None:
        snapshot = self.begin(worker, self.any_slot(worker), 0, 0)
        try:
            stats = snapshot.region.stats()
        finally:
            self.end(snapshot)
        if stats.regeneration_errors:
            raise RuntimeError(f"{stats.regeneration_errors} regeneration error(s) counted")

    # --- operations: discards, from any thread ---------------------------------------------------

    def _discard(self, worker: Worker, kernel: bool) -> None:
        slot = self.any_slot(worker)
        snapshot = self.begin(worker, slot, 0, 0)
        offset, length = self.page_range(worker.rng, slot)
        first, last = slot.touching(offset, offset + length)
        with slot.lock:
            slot.discards_active += 1
            slot.discards_started += 1
            versions = slot.versions[first:last]
            volatile = slot.volatile[first:last]
        try:
            if kernel:
                from .testing import page_out

                page_out(snapshot.region, offset, length)
                discarded = None
            else:
                discarded = snapshot.region.purge(offset, length)
        finally:
            with slot.lock:
                slot.discards_active -= 1
                unchanged = slot.generation == snapshot.generation and \
                    slot.versions[first:last] == versions and \
                    not any(version & 1 for version in versions)
            stable, _ = self.end(snapshot)
        if discarded is not None and stable and unchanged:
            allowed = sum(slot.chunk_end(chunk) - chunk * slot.chunk
                          for chunk, is_volatile in zip(range(first, last), volatile)
                          if is_volatile)
            if discarded > allowed:
                worker.metrics["violations"] += 1
                self.fail(worker, f"purge({offset}, {length}) of region {slot.index} discarded "
                                  f"{discarded} bytes, but only {allowed} bytes of the chunks it "
                                  "touches are volatile")

    def op_purge(self, worker: Worker) -> None:
        self._discard(worker, kernel=False)

    def op_page_out(self, worker: Worker) -> None:
        self._discard(worker, kernel=True)

    # --- operations: the owner's --------------------------------------------------------------

    def _pinned_range(self, worker: Worker, slot: Slot, limit: int) -> tuple[int, int]:
        """A random byte range within a run of pinned chunks (the owner's view of its model)."""
        rng = worker.rng
        pinned = [chunk for chunk in range(slot.chunks) if not slot.volatile[chunk]]
        if not pinned:
            raise Skip("no pinned chunk")
        chunk = rng.choice(pinned)
        first = last = chunk
        while first > 0 and not slot.volatile[first - 1] and chunk - first < 3:
            first -= 1
        while last + 1 < slot.chunks and not slot.volatile[last + 1] and last - chunk < 3:
            last += 1
        low, high = first * slot.chunk, slot.chunk_end(last)
        length = min(limit, high - low, rng.choice((1, 33, PAGE, 5 * PAGE + 7, 40 << 10,
                                                     100 << 10, 1 << 30)))
        start = rng.randrange(low, high - length + 1)
        if rng.random() < 0.3:
            start = max(low, start // PAGE * PAGE)
            length = min(length, high - start)
        return start, start + length

    def _write(self, worker: Worker, how: str) -> None:
        """Write random bytes to pinned chunks of an own region (``how``: memcpy, memmove with the
        GIL released, a pipe read with os.readv, a file read with os.preadv,
        vrange.io.readinto), then read them back."""
        slot = self.own_slot(worker)
        if slot.region is None:
            raise Skip("no region")
        start, end = self._pinned_range(worker, slot, SYSCALL_MAX)
        data = worker.rng.randbytes(end - start)
        first, last = slot.touching(start, end)
        self.busy(slot, first, last)
        try:
            snapshot = self.begin_own(worker, slot, start, end)
            try:
                view = snapshot.view
                if how == "memcpy":
                    view[start:end] = data
                elif how == "memmove_nogil":
                    ctypes.memmove(snapshot.region.address + start, data, len(data))
                elif how == "io_readinto":
                    from . import io as vrange_io

                    os.write(worker.pipe_w, data)
                    done = 0
                    while done < len(data):
                        done += vrange_io.readinto(worker.pipe_r, view[start + done:end])
                else:
                    self._copy_in(worker, snapshot, start, end, data, how)
                with slot.lock:
                    slot.content[start:end] = data
                after = bytes(view[start:end])
            finally:
                self.end(snapshot)
        finally:
            self.busy(slot, first, last)
        if after != data:
            snapshot.content = bytes(slot.content[snapshot.start:snapshot.end])
            self.account(worker, snapshot, start, after, True, f"read back after {how}")
        else:
            worker.metrics["checks"] += 1
            worker.metrics["bytes_checked"] += len(after)

    def begin_own(self, worker: Worker, slot: Slot, start: int, end: int) -> Snapshot:
        """A use of an own region whose chunks this thread is changing (marked busy)."""
        with slot.lock:
            if slot.region is None:
                raise Skip("no region")
            first, last = slot.touching(start, end)
            low, high = first * slot.chunk, min(last * slot.chunk, slot.size)
            snapshot = Snapshot(
                slot=slot, region=slot.region, view=memoryview(slot.region),
                generation=slot.generation, start=low, end=high, first=first, last=last,
                versions=slot.versions[first:last], content=bytes(slot.content[low:high]),
                pattern=slot.pattern[low:high], volatile=slot.volatile[first:last],
                chunk=slot.chunk, chunk_atomic=self.chunk_atomic,
                discards_started=slot.discards_started, quiet=slot.discards_active == 0)
            slot.users += 1
        return snapshot

    def _copy_in(self, worker: Worker, snapshot: Snapshot, start: int, end: int, data: bytes,
                 how: str) -> None:
        """Put ``data`` into [start, end) of the region with os.readv from a pipe or os.preadv from
        a file (two iovecs). A pinned chunk never touched is still missing: on the sigbus backend
        the call fails with EFAULT there; make it present and go on."""
        view = snapshot.view
        if how == "pipe_readv":
            os.write(worker.pipe_w, data)
        else:
            os.pwrite(worker.file_fd, data, start)
        position = start
        no_progress = 0
        while position < end:
            middle = position + (end - position) // 2
            buffers = [view[position:middle], view[middle:end]]
            try:
                if how == "pipe_readv":
                    count = os.readv(worker.pipe_r, buffers)
                else:
                    count = os.preadv(worker.file_fd, buffers, position)
            except OSError as error:
                if error.errno != errno.EFAULT:
                    raise
                if self.spec == "uffd":
                    raise RuntimeError("EFAULT from a system call on the uffd backend (it should "
                                       "have waited for the refill)") from error
                count = 0
            if count == 0:
                worker.metrics["efault_retries"] += 1
                no_progress += 1
                if no_progress > NO_PROGRESS_RETRIES:
                    raise RuntimeError(f"{how} into pinned chunks made no progress after "
                                       f"{no_progress} EFAULTs and prefaults")
                page = position // PAGE * PAGE
                snapshot.region.prefault(page, -(-end // PAGE) * PAGE - page)
                continue
            no_progress = 0
            position += count

    def op_write(self, worker: Worker) -> None:
        self._write(worker, "memcpy")

    def op_write_nogil(self, worker: Worker) -> None:
        self._write(worker, "memmove_nogil")

    def op_pipe_readv(self, worker: Worker) -> None:
        self._write(worker, "pipe_readv")

    def op_file_preadv(self, worker: Worker) -> None:
        self._write(worker, "file_preadv")

    def op_io_readinto(self, worker: Worker) -> None:
        self._write(worker, "io_readinto")

    def op_io_write(self, worker: Worker) -> None:
        """vrange.io.write from pinned chunks (a new region's are missing: EFAULT on sigbus)."""
        from . import io as vrange_io

        slot = self.own_slot(worker)
        if slot.region is None:
            raise Skip("no region")
        start, end = self._pinned_range(worker, slot, SYSCALL_MAX)
        snapshot = self.begin(worker, slot, start, end)
        try:
            vrange_io.write(worker.pipe_w, snapshot.view[start:end])
            data = b""
            while len(data) < end - start:
                data += os.read(worker.pipe_r, end - start - len(data))
        finally:
            self.end(snapshot)
        self.account(worker, snapshot, start, data, True, "vrange.io.write to a pipe")

    def op_mark_volatile(self, worker: Worker) -> None:
        slot = self.own_slot(worker)
        if slot.region is None:
            raise Skip("no region")
        offset, length = self.page_range(worker.rng, slot)
        end = offset + length
        first = -(-offset // slot.chunk)
        last = slot.chunks if end == slot.size else end // slot.chunk
        if first >= last:
            slot.region.mark_volatile(offset, length)  # rounds inward to nothing
            return
        self.busy(slot, first, last)
        try:
            slot.region.mark_volatile(offset, length)
            with slot.lock:
                for chunk in range(first, last):  # one pin released; volatile once none is left
                    slot.pins[chunk] = max(slot.pins[chunk] - 1, 0)
                    slot.volatile[chunk] = not slot.pins[chunk]
        finally:
            self.busy(slot, first, last)

    def op_mark_nonvolatile(self, worker: Worker) -> None:
        """Pin a range, then check every chunk it widened to: a chunk not reported purged holds
        exactly what was written; a reported one, per page (memfd trap: per chunk) either that or
        the regenerator's bytes. The model then takes what is there."""
        slot = self.own_slot(worker)
        if slot.region is None:
            raise Skip("no region")
        offset, length = self.page_range(worker.rng, slot)
        first, last = slot.touching(offset, offset + length)
        self.busy(slot, first, last)
        try:
            snapshot = self.begin_own(worker, slot, first * slot.chunk,
                                      min(last * slot.chunk, slot.size))
            try:
                purged = snapshot.region.mark_nonvolatile(offset, length, report=True)
                observed = bytes(snapshot.view[snapshot.start:snapshot.end])
            finally:
                self.end(snapshot)
            reported, stray = _reported_chunks(purged, slot.chunk, first, last, snapshot.volatile)
            if stray:
                worker.metrics["violations"] += 1
                self.fail(worker, f"mark_nonvolatile({offset}, {length}) of region {slot.index} "
                                  f"reported chunks {stray} purged: they were pinned or outside "
                                  f"the range (report {purged})")
            # Chunks that were volatile and reported purged may hold either alternative; every
            # other chunk must hold what was written: check it as if it were pinned.
            snapshot.volatile = [was_volatile and chunk in reported for chunk, was_volatile in
                                 zip(range(first, last), snapshot.volatile)]
            self.account(worker, snapshot, snapshot.start, observed, True,
                         "mark_nonvolatile(report=True), then read")
            with slot.lock:
                slot.content[snapshot.start:snapshot.end] = observed
                for chunk in range(first, last):
                    slot.volatile[chunk] = False
                    slot.pins[chunk] += 1
        finally:
            self.busy(slot, first, last)

    def op_pinned(self, worker: Worker) -> None:
        """``with region.pinned(range, populate=either) as pin:`` over an own region, while other
        threads purge and page out: the report names only chunks that were volatile; inside the
        block every chunk reads as pinned (named ones may have reverted), ``purge`` of the range
        discards nothing, and a write through ``pin.view`` is kept; afterwards each chunk has its
        volatility back (the model's is unchanged)."""
        slot = self.own_slot(worker)
        if slot.region is None:
            raise Skip("no region")
        rng = worker.rng
        offset, length = self.page_range(rng, slot)
        first, last = slot.touching(offset, offset + length)
        data = rng.randbytes(rng.randint(1, min(length, 2 * PAGE)))
        at = offset + rng.randrange(length - len(data) + 1)
        self.busy(slot, first, last)
        try:
            snapshot = self.begin_own(worker, slot, first * slot.chunk,
                                      min(last * slot.chunk, slot.size))
            try:
                with snapshot.region.pinned(offset, length, populate=rng.random() < 0.5) as pin:
                    observed = bytes(snapshot.view[snapshot.start:snapshot.end])
                    discarded = snapshot.region.purge(offset, length)
                    pin.view[at - offset:at - offset + len(data)] = data
                    after = bytes(snapshot.view[snapshot.start:snapshot.end])
                    purged = pin.purged_ranges
            finally:
                self.end(snapshot)
            reported, stray = _reported_chunks(purged, slot.chunk, first, last, snapshot.volatile)
            if stray or discarded:
                worker.metrics["violations"] += 1
                self.fail(worker, f"pinned({offset}, {length}) of region {slot.index}: "
                                  + (f"reported chunks {stray} purged that were pinned or outside "
                                     f"the range (report {purged})" if stray else
                                     f"purge() inside the block discarded {discarded} bytes"))
            snapshot.volatile = [was_volatile and chunk in reported for chunk, was_volatile in
                                 zip(range(first, last), snapshot.volatile)]
            self.account(worker, snapshot, snapshot.start, observed, True,
                         "read inside a pinned() block")
            low = at - snapshot.start
            expected = observed[:low] + data + observed[low + len(data):]
            if after != expected:
                snapshot.content = expected
                snapshot.volatile = [False] * (last - first)
                self.account(worker, snapshot, snapshot.start, after, True,
                             "read back inside a pinned() block after a purge and a write")
            with slot.lock:
                slot.content[snapshot.start:snapshot.end] = after
        finally:
            self.busy(slot, first, last)

    def op_recreate(self, worker: Worker) -> None:
        slot = self.own_slot(worker)
        if slot.region is not None:
            self.close_region(worker, slot)
        self.make_region(worker, slot)

    def op_fork(self, worker: Worker) -> None:
        """Fork; the child reads a range of an own region, checks it and exits with the result;
        the parent waits (FORK_TIMEOUT) and kills it then."""
        slot = self.own_slot(worker)
        snapshot = self.begin(worker, slot)
        start, end = snapshot.read_start, snapshot.read_end
        read_fd, write_fd = os.pipe()
        try:
            pid = os.fork()
            if pid == 0:  # the child: no locks, no logging, os._exit
                status = 2
                try:
                    os.close(read_fd)
                    data = bytes(snapshot.view[start:end])
                    result = compare(snapshot, start, data, strict=True)
                    os.write(write_fd, json.dumps([result.wrong, result.problem]).encode())
                    status = 1 if result.wrong else 0
                finally:
                    os._exit(status)
            worker.metrics["fork_children"] += 1
            os.close(write_fd)
            write_fd = -1
            timeout = FORK_TIMEOUT
            deadline = time.monotonic() + timeout
            while True:
                waited, status = os.waitpid(pid, os.WNOHANG)
                if waited:
                    break
                worker.heartbeat = time.monotonic()  # waiting, for a bounded time: not stuck
                if time.monotonic() > deadline:
                    os.kill(pid, signal.SIGKILL)
                    os.waitpid(pid, 0)
                    worker.metrics["fork_hangs"] += 1
                    self.fail(worker, f"HANG: a forked child reading {end - start} bytes at "
                                      f"{start} of region {slot.index} ({slot.kind}) did not exit "
                                      f"in {timeout:.0f} s (killed)")
                    return
                time.sleep(0.002)
            answer = os.read(read_fd, 65536)
        finally:
            self.end(snapshot)
            os.close(read_fd)
            if write_fd >= 0:
                os.close(write_fd)
        if os.WIFSIGNALED(status):
            worker.metrics["fork_crashes"] += 1
            self.fail(worker, f"CRASH: a forked child reading region {slot.index} ({slot.kind}) "
                              f"died by {signal.Signals(os.WTERMSIG(status)).name}")
            return
        code = os.WEXITSTATUS(status)
        worker.metrics["checks"] += 1
        worker.metrics["bytes_checked"] += end - start
        if code == 1:
            wrong, problem = json.loads(answer)
            worker.metrics["wrong_bytes"] += wrong
            worker.metrics["wrong_checks"] += 1
            self.fail(worker, f"WRONG BYTES (read in a forked child) region {slot.index} "
                              f"({slot.kind}, chunk {slot.chunk}): {problem}")
        elif code != 0:
            worker.metrics["errors"] += 1
            self.fail(worker, f"a forked child reading region {slot.index} exited with status "
                              f"{code}")

    # --- the run ----------------------------------------------------------------------------------

    def next_operation(self, worker: Worker, pending: list[str]) -> str:
        """The first pending operation, else a weighted random one (a read instead of one done
        too recently: see MIN_INTERVAL)."""
        name = pending.pop() if pending else worker.rng.choices(self.operations, self.weights)[0]
        interval = MIN_INTERVAL.get(name)
        if interval and name in worker.last and time.monotonic() - worker.last[name] < interval:
            return "read"
        return name

    def work(self, worker: Worker) -> None:
        # Every operation once early, in a random order, so a short run covers them all.
        pending = [name for name in self.operations
                   if worker.own or name not in OWN_OPERATIONS]
        worker.rng.shuffle(pending)
        skipped: collections.Counter[str] = collections.Counter()
        inject = self.options.inject if worker.index == 0 and self.options.inject != "wrong-bytes" \
            else ""
        while not self.stop.is_set():
            if inject and time.monotonic() - self.started > 0.5:
                worker.current = f"injected {inject}"
                self.simulate(inject)
                inject = ""
            name = self.next_operation(worker, pending)
            worker.drain()
            worker.current = name
            worker.heartbeat = time.monotonic()
            try:
                getattr(self, f"op_{name}")(worker)
                worker.operations[name] += 1
                worker.last[name] = time.monotonic()
            except Skip:
                skipped[name] += 1
                if name in self.operations and worker.operations[name] == 0 and \
                        skipped[name] < 1000:
                    pending.insert(0, name)  # try again later
            except Exception as error:  # noqa: BLE001 - counted and described
                worker.metrics["errors"] += 1
                self.fail(worker, f"ERROR in {name}: {type(error).__name__}: {error}\n"
                          + "".join(traceback.format_exception(error)[-6:]))
                del error
            worker.heartbeat = time.monotonic()
        worker.current = "finished"

    @staticmethod
    def simulate(failure: str) -> None:
        """A simulated failure (``--inject``), for tests of the stress itself."""
        if failure == "hang":
            threading.Event().wait()  # blocks for ever, the GIL released
        elif failure == "gil-hang":
            import re

            re.match(r"(a+)+$", "a" * 64 + "b")  # backtracks for ages in one C call, GIL held
        elif failure == "crash":
            # To this thread: faulthandler dumps the crashing thread first, so its stack (in this
            # file) is in the report even when the dump of another, running thread is cut short.
            signal.pthread_kill(threading.get_ident(), signal.SIGSEGV)

    def watch(self) -> None:
        """End the process with a report when a thread makes no progress for too long."""
        limit = self.options.watchdog
        while not self.finished.wait(0.25):
            # The backstop: if this thread cannot run (a stuck thread holds the GIL), faulthandler's
            # own thread dumps every stack and exits.
            faulthandler.dump_traceback_later(limit * 1.5 + 1, exit=True)
            now = time.monotonic()
            stuck = [(f"thread {worker.index}", worker.current, now - worker.heartbeat)
                     for worker in self.workers
                     if worker.current != "finished" and now - worker.heartbeat > limit]
            if self.main_phase != "running" and now - self.main_heartbeat > limit:
                stuck.append(("main thread", self.main_phase, now - self.main_heartbeat))
            if stuck:
                what = "; ".join(f"{who} stuck in {op} for {seconds:.0f} s"
                                 for who, op, seconds in stuck)
                sys.stderr.write(f"vrange stress {self.spec}: HANG: {what}\n")
                faulthandler.dump_traceback(all_threads=True)
                report = self.report(complete=False)
                report.hangs += 1
                report.detail = f"hang: {what}"
                self.emit({"result": report.as_dict()})
                sys.stderr.flush()
                os._exit(HANG_EXIT_STATUS)
        faulthandler.cancel_dump_traceback_later()

    def run(self) -> BackendReport:
        """Run for ``options.seconds``; the report."""
        vrange_logger = logging.getLogger("vrange")
        counter = _WarningCounter(self)
        vrange_logger.addHandler(counter)
        # Armed here too: the watchdog thread may not get the GIL before a thread keeps it for ever.
        faulthandler.dump_traceback_later(self.options.watchdog * 1.5 + 1, exit=True)
        watchdog = threading.Thread(target=self.watch, name="vrange-stress-watchdog", daemon=True)
        watchdog.start()
        try:
            self.main_phase = "making regions"
            for slot in self.slots:
                self.main_heartbeat = time.monotonic()
                self.make_region(self.workers[slot.owner], slot)
            self.main_phase = "running"
            threads = [threading.Thread(target=self.work, args=(worker,), daemon=True,
                                        name=f"vrange-stress-{worker.index}")
                       for worker in self.workers]
            self.started = time.monotonic()
            for thread in threads:
                thread.start()
            deadline = self.started + self.options.seconds
            parent = os.getppid()
            while time.monotonic() < deadline and os.getppid() == parent:  # (the parent died)
                time.sleep(min(1.0, max(0.0, deadline - time.monotonic())))
                self.emit({"progress": self.report(complete=False).as_dict()})
            self.stop.set()
            self.main_phase = "waiting for the threads to finish"
            self.main_heartbeat = time.monotonic()
            for thread in threads:
                thread.join()
            seconds = time.monotonic() - self.started
            self.main_phase = "closing regions"
            closing_errors = 0
            for slot in self.slots:
                self.main_heartbeat = time.monotonic()
                if slot.region is not None:
                    try:
                        self._add_stats(slot)
                        slot.region.close()
                    except Exception as error:  # noqa: BLE001 - counted and described
                        closing_errors += 1
                        self.fail(None, f"ERROR closing region {slot.index}: "
                                        f"{type(error).__name__}: {error}")
                    slot.region = None
            report = self.report(complete=True)
            report.errors += closing_errors
            report.seconds = round(seconds, 2)
            return report
        finally:
            self.finished.set()
            watchdog.join()
            vrange_logger.removeHandler(counter)
            for worker in self.workers:
                worker.close()
            for name in os.listdir(self.directory):
                os.unlink(os.path.join(self.directory, name))
            os.rmdir(self.directory)


class _WarningCounter(logging.Handler):
    """Keeps the first warnings vrange logs during a run."""

    def __init__(self, stress: Stress) -> None:
        super().__init__(logging.WARNING)
        self.stress = stress

    def emit(self, record: logging.LogRecord) -> None:
        if record.name == logger.name:
            return  # the stress's own failures
        self.stress.warning_count += 1
        if len(self.stress.warnings) < MAX_FAILURES_KEPT:
            self.stress.warnings.append(record.getMessage()[:500])


# --- the child and the parent --------------------------------------------------------------------


def run_backend(spec: str, options: StressOptions,
                emit: Callable[[dict[str, Any]], None]) -> BackendReport:
    """Stress one backend in this process; ``emit`` gets ``{"progress": report}`` every second
    (and ``{"result": report}`` from the watchdog before it ends the process on a hang).

    Installs faulthandler (before any region, so vrange chains its SIGBUS handler to it) and forks:
    meant for a process of its own (``python -m vrange stress --child``)."""
    faulthandler.enable()
    return Stress(spec, options, emit).run()


def _excerpt(text: str, head: int = 3000, tail: int = 1500) -> str:
    """The start (what went wrong, the stack of the thread that did) and the end of ``text``."""
    text = text.strip()
    if len(text) <= head + tail:
        return text
    return f"{text[:head]}\n[... {len(text) - head - tail} characters ...]\n{text[-tail:]}"


def _classify_exit(report: BackendReport, returncode: int, stderr: str) -> None:
    tail = _excerpt(stderr)
    if returncode == HANG_EXIT_STATUS:
        report.detail = (report.detail or "hang") + "\n" + tail
        report.hangs = max(report.hangs, 1)
    elif returncode < 0:
        report.crashes += 1
        report.detail = f"crash: killed by {signal.Signals(-returncode).name}\n{tail}"
    elif "Timeout (" in stderr and "Thread 0x" in stderr:
        report.hangs += 1
        report.detail = f"hang: faulthandler's timer fired (no Python thread could run)\n{tail}"
    else:
        report.crashes += 1
        report.detail = f"crash: exited with status {returncode} without a report\n{tail}"


def run_child_process(spec: str, options: StressOptions,
                      progress: Callable[[BackendReport], None] | None = None) -> BackendReport:
    """Stress one backend in a child process (``python -m vrange stress --child``); a hang or a
    crash of the child is counted in the report it returns. The child's temporary files are made in
    a directory of this process's, removed afterwards; on Ctrl-C (KeyboardInterrupt) the child is
    killed with every process it started."""
    command = [sys.executable, "-m", "vrange", "stress", "--child", "--backend", spec,
               *options.arguments()]
    last: dict[str, Any] | None = None
    result: dict[str, Any] | None = None
    with tempfile.TemporaryDirectory(prefix="vrange-stress-") as scratch, \
            tempfile.TemporaryFile("w+") as stderr, \
            child_process(command, stdout=subprocess.PIPE, stderr=stderr, text=True,
                          env={**os.environ, "TMPDIR": scratch}) as process:
        assert process.stdout is not None

        def read() -> None:
            nonlocal last, result
            assert process.stdout is not None
            for line in process.stdout:
                try:
                    message = json.loads(line)
                except ValueError:
                    continue
                if "progress" in message:
                    last = message["progress"]
                    if progress is not None:
                        progress(BackendReport.from_dict(last))
                elif "result" in message:
                    result = message["result"]

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        limit = options.seconds + 2 * options.watchdog + 60
        try:
            process.wait(timeout=limit)
            killed = False
        except subprocess.TimeoutExpired:
            kill_process_group(process)
            killed = True
        except BaseException:  # Ctrl-C: the reader sees the end of the output before it closes
            kill_process_group(process)
            reader.join(timeout=10)
            raise
        reader.join(timeout=10)
        stderr.seek(0)
        errors = stderr.read()
    report = BackendReport.from_dict(result or last or {"backend": spec})
    report.backend = spec
    if killed:
        report.complete = False
        report.hangs += 1
        report.detail = f"hang: no exit after {limit:.0f} s (killed)\n{_excerpt(errors)}"
    elif result is None or process.returncode != 0:
        report.complete = False
        _classify_exit(report, process.returncode, errors)
    else:
        # What the child printed besides its own failures (already in the report): vrange's
        # messages on stderr, tracebacks.
        other = "\n".join(line for line in errors.splitlines()
                          if not line.startswith(f"{logger.name}: ")).strip()
        if other:
            report.detail = "stderr: " + _excerpt(other)
    return report


def run(options: StressOptions, specs: Sequence[str] | None = None,
        say: Callable[[str], None] | None = None,
        progress: Callable[[BackendReport], None] | None = None) -> list[BackendReport]:
    """Stress each backend spec (default: every one usable here) in a child process of its own,
    one after the other; their reports. ``progress`` gets each child's report every second."""
    chosen = list(specs) if specs else usable_specs()
    reports = []
    for spec in chosen:
        if say:
            say(f"stress {spec}: {options.seconds:g} s, {options.threads} threads, "
                f"{options.regions} regions ...")
        report = run_child_process(spec, options, progress)
        if say:
            say(f"  {summary_line(report)}")
        reports.append(report)
    return reports


def summary_line(report: BackendReport) -> str:
    """One line: what ran and what was found."""
    verdict = "ok" if report.ok else "FAILED"
    return (f"{verdict}: {report.total_operations} operations, {report.faults} faults, "
            f"{report.checks} checks, {report.wrong_bytes} wrong bytes, {report.violations} "
            f"violations, {report.errors} errors, {report.hangs} hangs, {report.crashes} crashes")


def format_reports(reports: Sequence[BackendReport]) -> str:
    """The reports as tables: one column per backend."""
    columns = [report.backend for report in reports]
    width = max([14, *(len(column) + 2 for column in columns)])

    def row(label: str, values: Sequence[object]) -> str:
        return f"{label:<26}" + "".join(f"{str(value):>{width}}" for value in values)

    def mib(value: int) -> str:
        return f"{value / (1 << 20):.1f} MiB"

    lines = [row("", columns), row("verdict", ["ok" if r.ok else "FAILED" for r in reports]),
             row("seconds", [f"{r.seconds:.1f}" for r in reports])]
    lines.append(row("operations", [r.total_operations for r in reports]))
    names = [name for name in OPERATIONS if any(name in r.operations for r in reports)]
    for name in names:
        lines.append(row(f"  {name}", [r.operations.get(name, "-") for r in reports]))
    lines.append(row("faults served", [r.faults for r in reports]))
    lines.append(row("bytes regenerated", [mib(r.bytes_regenerated) for r in reports]))
    lines.append(row("python regenerations", [r.python_regenerations for r in reports]))
    reasons = sorted({reason for r in reports for reason in r.purges_by_reason})
    for reason in reasons:
        lines.append(row(f"purges ({reason})", [r.purges_by_reason.get(reason, 0)
                                                for r in reports]))
    lines.append(row("volatile refills", [r.volatile_refills for r in reports]))
    lines.append(row("regions made", [r.regions_made for r in reports]))
    lines.append(row("forked children", [r.fork_children for r in reports]))
    lines.append(row("checks", [r.checks for r in reports]))
    lines.append(row("bytes checked", [mib(r.bytes_checked) for r in reports]))
    lines.append(row("unverified (raced owner)", [r.unverified for r in reports]))
    lines.append(row("torn pages (raced discard)", [r.torn_pages for r in reports]))
    lines.append(row("EFAULT retries", [r.efault_retries for r in reports]))
    lines.append(row("close() refused (in use)", [r.close_refused for r in reports]))
    lines.append(row("WRONG BYTES", [r.wrong_bytes for r in reports]))
    lines.append(row("violations", [r.violations for r in reports]))
    lines.append(row("errors", [r.errors for r in reports]))
    lines.append(row("hangs", [r.hangs for r in reports]))
    lines.append(row("crashes", [r.crashes for r in reports]))
    lines.append(row("library warnings", [r.library_warning_count for r in reports]))
    for report in reports:
        if report.failures or report.detail or report.library_warnings:
            lines.append("")
            lines.append(f"{report.backend}:")
            lines.extend(f"  {failure}" for failure in report.failures)
            lines.extend(f"  vrange warned: {warning}" for warning in report.library_warnings)
            if report.detail:
                lines.append("  " + report.detail.replace("\n", "\n  "))
    return "\n".join(lines)


# --- the command line ------------------------------------------------------------------------------


def _regenerator_list(text: str) -> tuple[str, ...]:
    kinds = tuple(kind.strip() for kind in text.split(",") if kind.strip())
    unknown = [kind for kind in kinds if kind not in REGENERATORS]
    if not kinds or unknown:
        raise argparse.ArgumentTypeError(f"choose among {', '.join(REGENERATORS)}")
    return kinds


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``python -m vrange stress``."""
    parser.add_argument("--seconds", type=float, default=DEFAULT_SECONDS,
                        help=f"how long to stress each backend (default {DEFAULT_SECONDS:g})")
    parser.add_argument("--backend", action="extend", nargs="+", metavar="SPEC", default=None,
                        help="backend specs to stress (uffd, sigbus:uffd, sigbus:memfd, sigbus; "
                             "default: every one usable here)")
    parser.add_argument("--threads", type=int, default=DEFAULT_THREADS,
                        help=f"worker threads (default {DEFAULT_THREADS})")
    parser.add_argument("--regions", type=int, default=DEFAULT_REGIONS,
                        help=f"regions open at once (default {DEFAULT_REGIONS})")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED,
                        help=f"seed of the random choices (default {DEFAULT_SEED})")
    parser.add_argument("--watchdog", type=float, default=DEFAULT_WATCHDOG,
                        help="report a hang when a thread makes no progress for this many seconds "
                             f"(default {DEFAULT_WATCHDOG:g})")
    parser.add_argument("--regenerators", type=_regenerator_list, default=REGENERATORS,
                        help=f"regenerator kinds, comma-separated (default {','.join(REGENERATORS)})")
    parser.add_argument("--json", action="store_true", help="print JSON instead of tables")
    parser.add_argument("--progress", action="store_true",
                        help="show each backend's progress every second on stderr even when it is "
                             "not a terminal")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--inject", choices=INJECTIONS, default="", help=argparse.SUPPRESS)


def options_from(args: argparse.Namespace) -> StressOptions:
    """StressOptions from parsed arguments (UsageError when out of range)."""
    if not args.seconds > 0 or args.threads < 1 or args.regions < 1 or not args.watchdog > 0:
        raise UsageError("--seconds, --threads, --regions and --watchdog must be positive")
    # Each worker thread opens descriptors and each region maps memory: past these a run fails for
    # want of them (counted as a crash), and an endless run never reports.
    if not args.seconds <= MAX_SECONDS or not args.watchdog <= MAX_SECONDS:
        raise UsageError(f"--seconds and --watchdog must be at most {MAX_SECONDS:.0f} (a day)")
    if args.threads > MAX_THREADS or args.regions > MAX_REGIONS:
        raise UsageError(f"--threads must be at most {MAX_THREADS} and --regions at most "
                         f"{MAX_REGIONS}")
    return StressOptions(seconds=args.seconds, threads=args.threads, regions=args.regions,
                         seed=args.seed, watchdog=args.watchdog,
                         regenerators=tuple(args.regenerators),
                         inject=args.inject)


def parse_specs(args: argparse.Namespace) -> Optional[list[str]]:
    """The backend specs asked for (None: every usable one); UsageError for an unknown one."""
    from ._backends import KNOWN_SPECS

    specs = list(args.backend) if args.backend else None
    for spec in specs or ():
        if spec not in KNOWN_SPECS or spec == "auto":
            raise UsageError(f"unknown backend spec {spec!r}: choose among uffd, sigbus, "
                             "sigbus:uffd, sigbus:memfd")
    return specs


def _progress_text(report: BackendReport, seconds: float) -> str:
    return (f"stress {report.backend}: {report.seconds:.0f}/{seconds:g} s, "
            f"{report.total_operations} operations, {report.faults} faults, {report.checks} "
            f"checks, {report.wrong_bytes} wrong bytes, {report.errors} errors")


def command(args: argparse.Namespace) -> int:
    """``python -m vrange stress``: 0 when every backend ran clean, 1 otherwise."""
    options = options_from(args)
    specs = parse_specs(args)
    if args.child:  # one backend, in this process: JSON lines for the parent
        if not specs or len(specs) != 1:
            raise UsageError("--child needs exactly one --backend")
        lock = threading.Lock()

        def emit(message: dict[str, Any]) -> None:
            with lock:  # the watchdog thread emits too
                sys.stdout.write(json.dumps(message) + "\n")
                sys.stdout.flush()

        emit({"result": run_backend(specs[0], options, emit).as_dict()})
        return 0
    status = StatusLine(sys.stderr) if show_progress(args) else None

    def say(line: str) -> None:
        if status is not None:
            status.clear()
        print(line, file=sys.stderr if args.json else sys.stdout, flush=True)

    def progress(report: BackendReport) -> None:
        if status is not None:
            status.show(_progress_text(report, options.seconds))

    reports = run(options, specs, say, progress)
    ok = bool(reports) and all(report.ok for report in reports)
    if args.json:
        print(json.dumps({"ok": ok, "options": options.__dict__,
                          "backends": [report.as_dict() for report in reports]}, indent=2))
    else:
        print()
        print(format_reports(reports) if reports else "No backend can run here.")
    return 0 if ok else 1
