"""``python -m vrange bench``: what vrange costs, each figure next to a baseline from the same run.

Every row pairs a measured cost with a baseline (plain memory, an anonymous first-touch fault, the
raw madvise calls, a minimal C userfaultfd handler, a dict of bytes), repeated in interleaved,
alternating order; the report gives the median and p10-p90 spread of the per-repeat ratios and flags
rows too noisy to trust. Compare ratios, not microseconds across runs: the machines are shared.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading

from .._tool import INTERRUPTED_EXIT, UsageError, announce
from ._rows import GROUPS, Row, all_rows
from ._runner import (DEFAULT_REPEATS, QUICK_REPEATS, BenchRun, RowResult, ctrl_c_stops,
                      format_run, progress_for, run, select)
from ._stats import SPREAD_RULE, Sample, Summary, compare, percentile, summarize

__all__ = ["BenchRun", "GROUPS", "Row", "RowResult", "SPREAD_RULE", "Sample", "Summary",
           "add_arguments", "all_rows", "command", "compare", "format_run", "percentile", "run",
           "select", "summarize"]

def _command_line() -> list[str]:
    """How this run was started, as a user would type it."""
    if sys.argv and sys.argv[0].endswith("__main__.py"):
        return ["python", "-m", "vrange", *sys.argv[1:]]
    return list(sys.argv)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true",
                        help=f"a few rows, small sizes, {QUICK_REPEATS} repeats (a few seconds)")
    parser.add_argument("--rows", metavar="PATTERN", action="append",
                        help="only the rows whose name matches (glob, or substring); repeatable; "
                             "--list shows the names")
    parser.add_argument("--repeats", type=int, metavar="N",
                        help=f"repeats per row (default {DEFAULT_REPEATS}, --quick {QUICK_REPEATS})")
    parser.add_argument("--json", metavar="PATH", nargs="?", const="-",
                        help="also write every row with all its samples as JSON to PATH; "
                             "without PATH (or '-'), on stdout, the table going to stderr")
    parser.add_argument("--plot", metavar="DIR",
                        help="draw one chart per group into DIR (needs the [plot] extra)")
    parser.add_argument("--progress", action="store_true",
                        help="show progress on stderr even when it is not a terminal")
    parser.add_argument("--list", action="store_true", help="list the rows and exit")


def command(args: argparse.Namespace) -> int:
    """``python -m vrange bench``: 0, or 130 when Ctrl-C stopped the run (the rows measured so far
    are reported); a bad option raises UsageError."""
    repeats = args.repeats if args.repeats is not None else \
        (QUICK_REPEATS if args.quick else DEFAULT_REPEATS)
    if repeats < 1:
        raise UsageError("--repeats must be at least 1")
    if args.plot:
        from ._plot import PlotUnavailable, _pyplot

        try:
            _pyplot()  # fail before measuring, not after
        except PlotUnavailable as error:
            raise UsageError(str(error)) from None
    rows = select(all_rows(), args.rows, args.quick)
    if args.list:
        for row in rows:
            print(row.name + (f"  ({row.skip})" if row.skip else ""))
        return 0
    if not rows:
        raise UsageError("no row matches" if args.rows else "no backend can run here")
    progress = progress_for(args.progress)
    measured = sum(1 for row in rows if not row.skip)
    announce(args, f"measuring {measured} rows, {repeats} repeats each"
                   + ("" if progress.stream else " (--progress shows each row)")
                   + "; Ctrl-C stops and reports what was measured")
    with ctrl_c_stops() as ctrl_c:
        bench = run(rows, repeats, args.quick, progress, ctrl_c)
        ctrl_c.finishing = True  # a Ctrl-C from here on is ignored: the report is short
        code = _report(bench, args)
    if bench.interrupted and threading.current_thread() is threading.main_thread():
        # This command ends the process: the user's next Ctrl-C must not kill it during the
        # interpreter's shutdown (where SIGINT is back to its default action).
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    return code


def _report(bench: BenchRun, args: argparse.Namespace) -> int:
    report = format_run(bench)
    if args.json == "-":
        print(report, file=sys.stderr)
    else:
        print(report, flush=True)
    if args.json:
        data = json.dumps(bench.as_dict(_command_line()), indent=2, ensure_ascii=False)
        if args.json == "-":
            print(data)
        else:
            with open(args.json, "w") as out:
                out.write(data + "\n")
    if args.plot and not bench.interrupted:
        from ._plot import plot

        for path in plot(bench, args.plot):
            print(f"chart: {path}")
    return INTERRUPTED_EXIT if bench.interrupted else 0
