"""Running the matrix: a process per profile, a forked child per cell, and the output formats.

``python -m vrange compat`` is :func:`main`. The parent starts one process per profile
(``python -m vrange compat --child PROFILE``), which applies the profile to itself, probes
:func:`vrange.features` and runs every cell in a forked child with an alarm, writing one JSON line
per cell as it ends. The parent reads those lines (showing progress), fills in the cells of a
profile process that died, and prints a table or, with ``--json``, one JSON object per cell.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import select
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import date
from typing import IO, Any

import vrange

from .._tool import UsageError, announce, child_process, kill_process_group, show_progress
from . import scenarios
from .profiles import PROFILES, Profile
from .scenarios import SCENARIOS, NotApplicable, Scenario

__all__ = ["BACKENDS", "Cell", "ProfileInfo", "Selection", "add_arguments", "format_table", "main",
           "run"]

logger = logging.getLogger(__name__)

BACKENDS = ("uffd", "sigbus:uffd", "sigbus:memfd")
"""The backend specs: the matrix's columns (the sigbus backend once per trap)."""

RESULTS = ("pass", "fail", "n/a")
DEFAULT_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class Cell:
    """One scenario on one backend spec under one profile: ``pass``, ``fail`` or ``n/a``."""

    scenario: str
    backend: str
    profile: str
    kernel: str
    result: str
    reason: str

    def as_dict(self) -> dict[str, str]:
        """The cell as ``--json`` prints it (exactly these six keys)."""
        return asdict(self)


@dataclass
class ProfileInfo:
    """What a profile's process found: whether the profile applied and what vrange chose."""

    profile: str
    description: str
    kind: str
    applied: bool
    reason: str = ""
    userfaultfd: str = ""
    auto: str = ""
    seconds: float = 0.0


@dataclass(frozen=True)
class Selection:
    """Which part of the matrix to run."""

    profiles: tuple[str, ...] = tuple(PROFILES)
    backends: tuple[str, ...] = BACKENDS
    scenarios: tuple[str, ...] = tuple(SCENARIOS)
    timeout: float = DEFAULT_TIMEOUT_S

    @property
    def cells_per_profile(self) -> int:
        return len(self.backends) * len(self.scenarios)


# --- one cell (in a profile's process) ------------------------------------------------------------------


def _support(report: vrange.Features, spec: str) -> tuple[bool, str]:
    """Whether a backend spec can run here, and why not (from the feature report)."""
    name, _, trap = spec.partition(":")
    backend = report.backend(name)
    if not backend.usable:
        return False, backend.reason
    if trap:
        trap_support = report.trap(trap)
        return trap_support.usable, trap_support.reason
    return True, backend.reason


def _stderr_tail(file: IO[bytes], limit: int = 400) -> str:
    file.seek(0)
    text = file.read().decode(errors="replace").strip()
    return " | ".join(text[-limit:].splitlines()[-4:])


def run_cell(scenario: Scenario, spec: str, timeout: float) -> tuple[str, str]:
    """Run one scenario on one spec in a forked child with an alarm: ``(result, reason)``.

    A crash, a hang or a lost result is a ``fail`` naming it; the child's standard error (vrange's
    warnings, a regenerator's traceback) goes to a file whose end is quoted in a failure."""
    read_end, write_end = os.pipe()
    with tempfile.TemporaryFile() as errors:
        pid = os.fork()
        if pid == 0:  # pragma: no cover - runs in the child
            try:
                os.close(read_end)
                os.dup2(errors.fileno(), 2)
                signal.alarm(max(1, int(timeout)))  # a hang is a failure, not a stuck matrix
                scenarios.CELL_TIMEOUT_S = timeout
                try:
                    result = ("pass", scenario.run(spec) or "")
                except NotApplicable as why:
                    result = ("n/a", str(why))
                except BaseException as error:  # noqa: BLE001 - every failure is reported
                    result = ("fail", f"{type(error).__name__}: {error}".strip())
                os.write(write_end, json.dumps(result).encode())
            finally:
                os._exit(0)
        os.close(write_end)
        data = b""
        deadline = time.monotonic() + timeout + 10
        killed = eof = False
        while True:  # a grandchild may hold the pipe open: wait for the child, not for EOF
            if not eof:
                ready, _, _ = select.select([read_end], [], [], 0.1)
                if ready:
                    chunk = os.read(read_end, 65536)
                    data += chunk
                    eof = not chunk
                    if chunk:
                        continue
            else:
                time.sleep(0.02)
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            if time.monotonic() > deadline and not killed:
                os.kill(pid, signal.SIGKILL)
                killed = True
        while not eof and select.select([read_end], [], [], 0)[0]:
            chunk = os.read(read_end, 65536)
            data += chunk
            eof = not chunk
        os.close(read_end)
        if data:
            try:
                result, reason = json.loads(data)
                return str(result), str(reason)
            except ValueError:
                return "fail", f"unreadable result {data[:200]!r}"
        tail = _stderr_tail(errors)
        if os.WIFSIGNALED(status):
            name = signal.Signals(os.WTERMSIG(status)).name
            if name == "SIGALRM" or killed:
                what = f"hung: no result after {timeout:g} s"
            else:
                what = f"crashed: killed by {name}"
        else:
            what = f"exited {os.waitstatus_to_exitcode(status)} without a result"
        return "fail", what + (f" ({tail})" if tail else "")


def _import_everything_first() -> None:
    """Import what the scenarios use while this process can still read every file: the
    unprivileged profile cannot read a Python installed under a private home directory."""
    import ctypes  # noqa: F401
    import hashlib  # noqa: F401
    import traceback  # noqa: F401

    import vrange.io  # noqa: F401
    import vrange.policy  # noqa: F401
    import vrange.sources  # noqa: F401
    import vrange.testing  # noqa: F401


def run_profile_here(profile: Profile, selection: Selection,
                     emit: Callable[[dict[str, Any]], None]) -> None:
    """Apply ``profile`` to this process (for good) and run its cells, emitting a ``profile``
    message and then one ``cell`` message per cell."""
    _import_everything_first()
    kernel = os.uname().release
    try:
        why_not = profile.apply()
    except OSError as error:
        why_not = f"could not apply the profile: {error}"
    info = ProfileInfo(profile.name, profile.description, profile.kind, why_not is None,
                       why_not or "")
    report = None
    if why_not is None:
        report = vrange.features(refresh=True)
        info.userfaultfd = report.userfaultfd.access
        info.auto = report.auto_reason
    emit({"event": "profile", **asdict(info)})
    for name in selection.scenarios:
        scenario = SCENARIOS[name]
        for spec in selection.backends:
            if report is None:
                result, reason = "n/a", f"profile not applied: {why_not}"
            else:
                usable, support_reason = _support(report, spec)
                not_applicable = scenario.applies(spec)
                if not usable:
                    result, reason = "n/a", support_reason
                elif not_applicable is not None:
                    result, reason = "n/a", not_applicable
                else:
                    result, reason = run_cell(scenario, spec, selection.timeout)
            emit({"event": "cell", **Cell(name, spec, profile.name, kernel, result,
                                          reason).as_dict()})


# --- the whole matrix (in the parent) --------------------------------------------------------------------


@dataclass
class Matrix:
    """The result of :func:`run`: every cell, and what each profile's process found."""

    cells: list[Cell] = field(default_factory=list)
    profiles: list[ProfileInfo] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        """How many cells have each result."""
        return {result: sum(cell.result == result for cell in self.cells) for result in RESULTS}

    @property
    def failed(self) -> bool:
        return any(cell.result == "fail" for cell in self.cells)


def _child_command(name: str, selection: Selection) -> list[str]:
    command = [sys.executable, "-m", "vrange", "compat", "--child", name,
               "--timeout", repr(selection.timeout)]
    for scenario in selection.scenarios:
        command += ["--scenario", scenario]
    for backend in selection.backends:
        command += ["--backend", backend]
    return command


def _run_profile_process(profile: Profile, selection: Selection, matrix: Matrix,
                         on_cell: Callable[[Cell], None]) -> ProfileInfo:
    started = time.monotonic()
    info = ProfileInfo(profile.name, profile.description, profile.kind, False,
                       "its process gave no report")
    budget = selection.cells_per_profile * (selection.timeout + 15) + 60
    try:
        return _read_profile_process(profile, selection, matrix, on_cell, info, started, budget)
    except BaseException:  # Ctrl-C: the process and its cells are killed; so are their cgroups
        scenarios.remove_stale_cgroups()
        raise


def _read_profile_process(profile: Profile, selection: Selection, matrix: Matrix,
                          on_cell: Callable[[Cell], None], info: ProfileInfo, started: float,
                          budget: float) -> ProfileInfo:
    got: set[tuple[str, str]] = set()
    with tempfile.TemporaryFile() as errors, \
            child_process(_child_command(profile.name, selection), stdout=subprocess.PIPE,
                          stderr=errors, stdin=subprocess.DEVNULL) as process:
        assert process.stdout is not None
        deadline = started + budget
        timed_out = False
        for line in _lines_until(process, deadline):
            try:
                message = json.loads(line)
            except ValueError:
                logger.warning("profile %s: unexpected output %r", profile.name, line[:200])
                continue
            if message.get("event") == "profile":
                message.pop("event")
                info = ProfileInfo(**message)
            elif message.get("event") == "cell":
                message.pop("event")
                cell = Cell(**message)
                got.add((cell.scenario, cell.backend))
                matrix.cells.append(cell)
                on_cell(cell)
        if process.poll() is None:
            timed_out = True
            kill_process_group(process)
        status = process.wait()
        tail = _stderr_tail(errors)
    if len(got) < selection.cells_per_profile:
        ended = (f"did not finish in {budget:g} s" if timed_out else
                 f"ended ({'killed by ' + signal.Signals(-status).name if status < 0 else 'status ' + str(status)})")
        reason = f"the profile's process {ended} before this cell" + (f": {tail}" if tail else "")
        for scenario in selection.scenarios:
            for backend in selection.backends:
                if (scenario, backend) not in got:
                    cell = Cell(scenario, backend, profile.name, os.uname().release, "fail", reason)
                    matrix.cells.append(cell)
                    on_cell(cell)
    info.seconds = round(time.monotonic() - started, 1)
    return info


def _lines_until(process: subprocess.Popen[bytes], deadline: float) -> Iterable[str]:
    """The lines of a process's output as they come, until it ends or the deadline passes."""
    assert process.stdout is not None
    descriptor = process.stdout.fileno()
    pending = b""
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return
        ready, _, _ = select.select([descriptor], [], [], min(remaining, 1.0))
        if not ready:
            continue
        chunk = os.read(descriptor, 65536)
        if not chunk:
            break
        pending += chunk
        *lines, pending = pending.split(b"\n")
        for line in lines:
            if line.strip():
                yield line.decode(errors="replace")
    if pending.strip():
        yield pending.decode(errors="replace")


def run(selection: Selection | None = None, on_cell: Callable[[Cell], None] = lambda cell: None,
        on_profile: Callable[[ProfileInfo, list[Cell]], None] = lambda info, cells: None) -> Matrix:
    """Run the matrix: each selected profile in a process of its own, one after the other.

    ``on_cell`` is called for each cell as it ends, ``on_profile`` when a profile's process is done
    (with its cells). Returns every cell, filled in (a dead profile process makes its missing
    cells ``fail``)."""
    selection = selection or Selection()
    matrix = Matrix()
    for name in selection.profiles:
        first = len(matrix.cells)
        info = _run_profile_process(PROFILES[name], selection, matrix, on_cell)
        matrix.profiles.append(info)
        on_profile(info, matrix.cells[first:])
    return matrix


# --- output --------------------------------------------------------------------------------------------


def format_table(matrix: Matrix, selection: Selection, width: int | None = None) -> str:
    """The matrix as text: per profile, scenarios as rows and backend specs as columns, reasons as
    numbered notes, and the counts. The prose (the title, each profile's userfaultfd and auto
    choice, the notes) wraps at ``width`` (default: the terminal's, as the feature report), each
    continuation indented under its first line, clear of the grid's first column."""
    from ..cli import report_width

    line_width = report_width() if width is None else width

    def wrap(text: str, indent: str = "", hanging: str = "") -> list[str]:
        return textwrap.wrap(text, line_width, initial_indent=indent,
                             subsequent_indent=indent + hanging, break_on_hyphens=False)

    uname = os.uname()
    lines = wrap(f"vrange {vrange.__version__} compatibility matrix: Linux {uname.release} "
                 f"({uname.machine}), uid {os.geteuid()}, {date.today().isoformat()}")
    notes: dict[str, int] = {}
    width = max(len(name) for name in selection.scenarios) + 2
    column = 18
    by_key = {(cell.profile, cell.scenario, cell.backend): cell for cell in matrix.cells}
    for info in matrix.profiles:
        kind = " (simulated kernel)" if info.kind == "kernel" else ""
        lines += ["", *wrap(f"profile {info.profile}{kind}: {info.description}", "", "  ")]
        if info.applied:
            lines += wrap(f"userfaultfd: {info.userfaultfd}; auto: {info.auto}", "  ", "    ")
        else:
            lines += wrap(f"not applied: {info.reason}", "  ", "    ")
        lines.append(("  " + " " * width
                      + "".join(f"{spec:<{column}}" for spec in selection.backends)).rstrip())
        for scenario in selection.scenarios:
            row = f"  {scenario:<{width}}"
            for spec in selection.backends:
                cell = by_key.get((info.profile, scenario, spec))
                text = "?" if cell is None else cell.result
                if cell is not None and cell.result != "pass" and cell.reason:
                    text += f" [{notes.setdefault(cell.reason, len(notes) + 1)}]"
                row += f"{text:<{column}}"
            lines.append(row.rstrip())
    if notes:
        lines += ["", "Notes:"]
        for reason, number in notes.items():
            lines += wrap(f"[{number}] {reason}", "  ", " " * (len(str(number)) + 3))
    counts = matrix.counts()
    lines += ["", f"{len(matrix.cells)} cells: {counts['pass']} pass, {counts['n/a']} n/a, "
                  f"{counts['fail']} fail"]
    return "\n".join(lines)


class Progress:
    """Progress on standard error: one updating line on a terminal, otherwise one line per
    profile."""

    def __init__(self, stream: IO[str], total: int, updating: bool) -> None:
        self.stream, self.total, self.updating = stream, total, updating
        self.done = 0

    def cell(self, cell: Cell) -> None:
        self.done += 1
        if self.updating:
            text = f"compat {self.done}/{self.total} {cell.profile}: {cell.scenario} on " \
                   f"{cell.backend}: {cell.result}"
            self.stream.write("\r\033[K" + text[:150])
            self.stream.flush()

    def profile(self, info: ProfileInfo, cells: list[Cell]) -> None:
        if self.updating:
            return
        counts = {result: sum(cell.result == result for cell in cells) for result in RESULTS}
        self.stream.write(f"compat {self.done}/{self.total} profile {info.profile} done in "
                          f"{info.seconds:g} s: {counts['pass']} pass, {counts['n/a']} n/a, "
                          f"{counts['fail']} fail\n")
        self.stream.flush()

    def finish(self) -> None:
        if self.updating:
            self.stream.write("\r\033[K")
            self.stream.flush()


# --- command line --------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``python -m vrange compat``."""
    parser.add_argument("--json", action="store_true",
                        help="print one JSON object per cell (JSON Lines) instead of a table")
    parser.add_argument("--profile", action="append", metavar="NAME",
                        help="run this profile (repeatable; default: all)")
    parser.add_argument("--backend", action="append", metavar="SPEC",
                        help=f"run this backend spec (repeatable; default: {', '.join(BACKENDS)})")
    parser.add_argument("--scenario", action="append", metavar="NAME",
                        help="run this scenario (repeatable; default: all)")
    parser.add_argument("--list", action="store_true",
                        help="list the scenarios and profiles with descriptions, and exit")
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S, metavar="S",
                        help=f"seconds one cell may take before it fails as hung (default "
                             f"{DEFAULT_TIMEOUT_S:g})")
    parser.add_argument("--progress", action="store_true",
                        help="show progress on standard error even when it is not a terminal")
    parser.add_argument("--child", metavar="PROFILE", help=argparse.SUPPRESS)


def _chosen(given: Sequence[str] | None, known: Sequence[str], what: str) -> tuple[str, ...]:
    if not given:
        return tuple(known)
    unknown = [name for name in given if name not in known]
    if unknown:
        raise ValueError(f"unknown {what} {', '.join(map(repr, unknown))}; known: "
                         f"{', '.join(known)}")
    return tuple(dict.fromkeys(given))  # once each, in the order given


def selection_from(args: argparse.Namespace) -> Selection:
    """The selection the options name; ValueError for an unknown name or a bad timeout."""
    if not args.timeout > 0:
        raise ValueError(f"--timeout must be positive, not {args.timeout:g}")
    profiles = [args.child] if args.child else args.profile
    return Selection(_chosen(profiles, list(PROFILES), "profile"),
                     _chosen(args.backend, BACKENDS, "backend spec"),
                     _chosen(args.scenario, list(SCENARIOS), "scenario"), args.timeout)


def format_list(width: int | None = None) -> str:
    """The scenarios and profiles, with what each checks or simulates, in lines of at most
    ``width`` characters (default: the terminal's, as the feature report)."""
    from ..cli import report_width, table_lines

    width = report_width() if width is None else width
    label_width = max(len(name) for name in [*SCENARIOS, *PROFILES])
    lines = textwrap.wrap("Scenarios (each runs on " + ", ".join(BACKENDS) + "):", width)
    lines += table_lines([(name, scenario.description) for name, scenario in SCENARIOS.items()],
                         width, label_width)
    lines += ["", *textwrap.wrap("Profiles (each in a process of its own):", width)]
    lines += table_lines([(name, profile.description
                           + (" [simulated kernel]" if profile.kind == "kernel" else ""))
                          for name, profile in PROFILES.items()], width, label_width)
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    """``python -m vrange compat``: 0 when no cell failed, 1 when one did; a bad option raises
    UsageError."""
    if args.list:
        print(format_list())
        return 0
    try:
        selection = selection_from(args)
    except ValueError as error:
        raise UsageError(str(error)) from None
    if args.child:  # one profile, in this process: JSON lines for the parent
        def emit(message: dict[str, Any]) -> None:
            sys.stdout.write(json.dumps(message) + "\n")
            sys.stdout.flush()

        run_profile_here(PROFILES[args.child], selection, emit)
        return 0
    total = len(selection.profiles) * selection.cells_per_profile
    show = show_progress(args)
    announce(args, f"{total} cells ({len(selection.profiles)} profiles x "
                   f"{len(selection.scenarios)} scenarios x {len(selection.backends)} backend "
                   f"specs), each profile in a process of its own"
                   + ("" if show else " (--progress shows each profile)"))
    progress = Progress(sys.stderr, total, updating=sys.stderr.isatty())
    matrix = run(selection, on_cell=progress.cell if show else lambda cell: None,
                 on_profile=progress.profile if show else lambda info, cells: None)
    if show:
        progress.finish()
    if args.json:
        for cell in matrix.cells:
            print(json.dumps(cell.as_dict()))
    else:
        print(format_table(matrix, selection))
    return 1 if matrix.failed else 0
