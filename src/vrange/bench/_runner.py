"""Running the rows of ``python -m vrange bench``: selection, the progress line, Ctrl-C, and the
report (text and JSON)."""

from __future__ import annotations

import contextlib
import datetime
import fnmatch
import functools
import os
import platform
import signal
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, TextIO

from .. import __version__
from ._rows import FULL, GROUPS, QUICK, Resources, Row, Scale
from ._stats import SPREAD_RULE, Sample, Summary, compare, summarize

DEFAULT_REPEATS = 9
QUICK_REPEATS = 5


@dataclass
class RowResult:
    row: Row
    samples: list[Sample] = field(default_factory=list)
    skipped: str | None = None
    error: str | None = None

    @property
    def summary(self) -> Summary | None:
        return summarize([sample.ratio for sample in self.samples]) if self.samples else None

    @property
    def measured(self) -> float | None:
        return summarize([s.measured for s in self.samples]).median if self.samples else None

    @property
    def baseline(self) -> float | None:
        return summarize([s.baseline for s in self.samples]).median if self.samples else None

    def as_dict(self) -> dict[str, Any]:
        row = self.row
        summary = self.summary
        return {
            "name": row.name, "group": row.group, "what": row.what, "baseline": row.baseline,
            "unit": row.unit, "params": row.params,
            "target": None if row.target is None else {
                "ratio_at_most": row.target.limit, "text": row.target.text,
                "met": None if summary is None else row.target.met(summary.median),
                "trusted": summary is not None and not summary.wide},
            "skipped": self.skipped, "error": self.error,
            "measured_median": self.measured, "baseline_median": self.baseline,
            "ratio": None if summary is None else summary.as_dict(),
            "samples": [{"measured": s.measured, "baseline": s.baseline, "ratio": s.ratio,
                         "measured_first": s.measured_first} for s in self.samples],
        }


@dataclass
class BenchRun:
    results: list[RowResult]
    repeats: int
    quick: bool
    started: float
    seconds: float = 0.0
    interrupted: bool = False

    def as_dict(self, command: Sequence[str]) -> dict[str, Any]:
        return {
            "vrange": __version__,
            "date": datetime.datetime.fromtimestamp(self.started, datetime.timezone.utc).isoformat(),
            "command": list(command),
            "machine": machine(),
            "kernel": platform.release(),
            "python": sys.version,
            "quick": self.quick, "repeats": self.repeats, "seconds": self.seconds,
            "interrupted": self.interrupted,
            "ratio": "measured / baseline, both costs from the same run: lower is faster",
            "spread_rule": SPREAD_RULE,
            "rows": [result.as_dict() for result in self.results],
        }


def machine() -> dict[str, Any]:
    model = ""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            model = next((line.split(":", 1)[1].strip() for line in cpuinfo
                          if line.startswith("model name")), "")
    except OSError:
        pass
    return {"arch": platform.machine(), "cpu": model, "cpus": os.cpu_count(),
            "node": platform.node()}


def select(rows: list[Row], patterns: Sequence[str] | None, quick: bool) -> list[Row]:
    """Rows whose name matches any pattern (a glob, or a plain substring); without patterns every
    row, or under --quick the quick selection."""
    if not patterns:
        return [row for row in rows if row.quick] if quick else list(rows)

    def matches(name: str, pattern: str) -> bool:
        if any(char in pattern for char in "*?["):
            return fnmatch.fnmatchcase(name, pattern)
        return pattern in name

    return [row for row in rows if any(matches(row.name, pattern) for pattern in patterns)]


class Progress:
    """One status line on stderr, rewritten in place on a terminal, one line per row otherwise."""

    def __init__(self, stream: TextIO | None) -> None:
        self.stream = stream
        self.terminal = bool(stream and stream.isatty())
        self.width = 0

    def show(self, text: str, row_start: bool) -> None:
        if self.stream is None or (not self.terminal and not row_start):
            return
        if self.terminal:
            text = text[:118]
            self.stream.write("\r" + text.ljust(self.width))
            self.width = len(text)
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def clear(self) -> None:
        if self.stream is not None and self.terminal and self.width:
            self.stream.write("\r" + " " * self.width + "\r")
            self.stream.flush()
            self.width = 0


class StopRequested(Exception):
    """Ctrl-C was pressed: stop after the repeat in progress."""


class CtrlC:
    """What Ctrl-C does during a run: the first press only asks to stop (checked between repeats),
    so no KeyboardInterrupt lands in the middle of a fault, a region's creation or its close; a
    second press raises KeyboardInterrupt at once, unless ``finishing`` (the report is being
    printed: it is short, and the partial results are the point)."""

    def __init__(self) -> None:
        self.requested = threading.Event()
        self.finishing = False

    def on_sigint(self, number: int, frame: object) -> None:
        if self.requested.is_set() and not self.finishing:
            raise KeyboardInterrupt
        self.requested.set()


@contextlib.contextmanager
def ctrl_c_stops() -> Iterator[CtrlC]:
    """Install :class:`CtrlC` as the SIGINT handler (main thread only) for the block."""
    state = CtrlC()
    if threading.current_thread() is not threading.main_thread():
        yield state
        return
    previous = signal.signal(signal.SIGINT, state.on_sigint)
    try:
        yield state
    finally:
        signal.signal(signal.SIGINT, previous)


def run(rows: list[Row], repeats: int, quick: bool, progress: Progress,
        ctrl_c: CtrlC | None = None) -> BenchRun:
    """Run ``rows``; once ``ctrl_c`` says stop, stop after the repeat in progress (the current row
    is abandoned, everything it made is released) and return what was measured, with
    ``interrupted`` set (as on a KeyboardInterrupt)."""
    scale: Scale = QUICK if quick else FULL
    bench = BenchRun([], repeats, quick, time.time())
    started = time.perf_counter()
    resources = Resources()
    stop_requested = ctrl_c.requested.is_set if ctrl_c is not None else (lambda: False)
    def after_repeat(prefix: str, done: int) -> None:
        if stop_requested():
            raise StopRequested
        progress.show(f"{prefix} {done}/{repeats}", row_start=False)

    try:
        for number, row in enumerate(rows, 1):
            if stop_requested():
                raise StopRequested
            result = RowResult(row)
            if row.skip:
                result.skipped = row.skip
                bench.results.append(result)
                continue
            prefix = f"[{number}/{len(rows)}] {row.name}"
            progress.show(f"{prefix} ...", row_start=True)
            try:
                with row.setup(scale, resources) as (measure, baseline):
                    result.samples = compare(measure, baseline, repeats,
                                             functools.partial(after_repeat, prefix))
            except (StopRequested, KeyboardInterrupt):
                raise
            except Exception as error:  # noqa: BLE001 - one failing row must not end the run
                result.samples = []
                result.error = f"{type(error).__name__}: {error}"
            bench.results.append(result)
    except (StopRequested, KeyboardInterrupt):
        bench.interrupted = True
    finally:
        progress.clear()
        resources.close()
        bench.seconds = time.perf_counter() - started
    return bench


# --- the text report --------------------------------------------------------------------------------

def _number(value: float | None) -> str:
    if value is None:
        return "-"
    if value >= 100:
        return f"{value:.0f}"
    if value >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def format_run(bench: BenchRun) -> str:
    lines = [
        f"vrange {__version__} bench on {platform.release()} ({platform.machine()}, "
        f"{os.cpu_count()} CPUs), Python {platform.python_version()}"
        + (", --quick" if bench.quick else ""),
        "ratio = measured / baseline, both costs measured in the same run (lower is faster): the "
        f"median [p10-p90] of {bench.repeats} interleaved repeats; {SPREAD_RULE}.",
    ]
    name_width = max([len(result.row.name) for result in bench.results] + [24]) + 2
    group = None
    for result in bench.results:
        row = result.row
        if row.group != group:
            group = row.group
            lines += ["", GROUPS.get(group, group),
                      f"  {'row':<{name_width}}{'measured':>10}{'baseline':>10}  {'unit':<9}"
                      f"{'ratio':>7} {'p10-p90':<13} {'target':<14}note"]
        if result.skipped or result.error:
            lines.append(f"  {row.name:<{name_width}}{result.skipped or 'error: ' + str(result.error)}")
            continue
        summary = result.summary
        assert summary is not None
        target = ""
        if row.target is not None:
            target = ("ok" if row.target.met(summary.median) else "MISSED") + \
                ("?" if summary.wide else "") + f" {row.target.limit:.2f}"
        lines.append(
            f"  {row.name:<{name_width}}{_number(result.measured):>10}{_number(result.baseline):>10}"
            f"  {row.unit:<9}{summary.median:>7.2f} {f'{summary.p10:.2f}-{summary.p90:.2f}':<13} "
            f"{target:<14}{summary.note}".rstrip())
    lines += ["", "Rows (what each measures, against which baseline):"]
    for result in bench.results:
        lines.append(f"  - {result.row.name}: {result.row.what}; baseline: {result.row.baseline}"
                     + (f"; target {result.row.target.text}" if result.row.target else ""))
    measured = sum(1 for result in bench.results if result.samples)
    lines += ["", f"{measured} row(s) measured in {bench.seconds:.1f} s"
              + (" -- INTERRUPTED (Ctrl-C): partial results" if bench.interrupted else "")]
    return "\n".join(lines)


def progress_for(flag: bool, stream: TextIO = sys.stderr) -> Progress:
    return Progress(stream if flag or stream.isatty() else None)

