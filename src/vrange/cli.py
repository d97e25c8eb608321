"""``python -m vrange``: features, demo, bench, stress, compat."""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import textwrap
import threading
from collections.abc import Sequence
from typing import Any

from . import __version__
from ._backends import features
from ._feature_report import Features, ProbeOutcome

LABEL_WIDTH = 32


def _yes_no(value: bool | None) -> str:
    return {True: "yes", False: "no", None: "unknown"}[value]


def _outcome(outcome: ProbeOutcome, ok_word: str = "ok") -> str:
    return ok_word if outcome.ok else f"no: {outcome.error}"


def _bytes(value: int | None) -> str:
    if value is None:
        return "none"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024  # type: ignore[assignment]
    raise AssertionError("unreachable")


def format_report(report: Features) -> str:
    """The feature report as a human-readable table."""
    width = max(60, min(shutil.get_terminal_size((100, 24)).columns, 120))
    lines: list[str] = []

    def heading(title: str) -> None:
        lines.extend(["", title])

    def row(label: str, value: str) -> None:
        wrapped = textwrap.wrap(value, width - LABEL_WIDTH - 2) or [""]
        lines.append(f"  {label:<{LABEL_WIDTH - 2}}{wrapped[0]}")
        lines.extend(" " * LABEL_WIDTH + more for more in wrapped[1:])

    uffd = report.userfaultfd
    lines.append(f"vrange {__version__} feature report (probed in {report.probe_seconds * 1000:.1f} ms)")
    heading("Kernel")
    row("release", f"{report.kernel_release} ({report.machine})")
    row("page size", str(report.page_size))
    row("transparent huge pages", report.thp_mode or "unknown")
    row("vm.max_map_count", str(report.max_map_count))
    mappings = report.mappings()
    row("mappings", f"{mappings.in_use} in use by this process; memfd-trap regions reserve "
                    f"{mappings.reserved} of the {mappings.budget} vrange may use")
    heading("userfaultfd")
    row("access", f"{uffd.access} (serves faults inside syscalls: {_yes_no(uffd.serves_syscalls)})")
    row("why", uffd.reason)
    for attempt in uffd.attempts:
        row(f"open via {attempt.method}", _outcome(attempt.outcome))
    row("vm.unprivileged_userfaultfd", str(uffd.unprivileged_userfaultfd_sysctl))
    row("CAP_SYS_PTRACE", _yes_no(uffd.cap_sys_ptrace))
    row("seccomp", uffd.seccomp_mode)
    row("device node", uffd.dev_node)
    row("API features", f"{uffd.api_features_mask:#x}: " + (" ".join(uffd.api_features) or "none"))
    row("API ioctls", " ".join(uffd.api_ioctls) or "none")
    row("range ioctls", " ".join(uffd.range_ioctls) or "none")
    heading("madvise (probed on a scratch mapping)")
    for advice in report.madvise:
        row(f"MADV_{advice.name}", _outcome(advice.outcome, "accepted"))
    heading("Memory")
    row("memfd_create", _outcome(report.memfd))
    row("PSI /proc/pressure/memory", _outcome(report.psi.readable, "readable")
        + f"; triggers: {_outcome(report.psi.triggers_writable, 'writable')}"
        + (f"; some avg10={report.psi.some_avg10} full avg10={report.psi.full_avg10}"
           if report.psi.readable.ok else ""))
    cgroup = report.cgroup
    row("memory cgroup", f"{cgroup.version} {cgroup.path or ''}".strip())
    row("memory limit", _bytes(cgroup.memory_limit_bytes)
        + (f" (set at {cgroup.limit_set_at})" if cgroup.limit_set_at else ""))
    row("memory usage", _bytes(cgroup.memory_usage_bytes))
    heading("Pressure policy (vrange.policy)")
    plan = report.pressure
    row("monitor signal", plan.signal)
    row("why", plan.reason)
    row("limit", _bytes(plan.limit_bytes))
    row("purges when usage passes", f"{_bytes(plan.high_water_bytes)}, down to "
        f"{_bytes(plan.low_water_bytes)} ({plan.usage_file})")
    heading("sigbus backend traps")
    for trap in report.sigbus_traps:
        state = "usable" if trap.usable else "not usable"
        reclaim = "the kernel reclaims" if trap.kernel_reclaims else "only vrange purges"
        row(f"{trap.name} trap", f"{state} ({reclaim}): {trap.reason}" if trap.usable
            else f"{state}: {trap.reason}")
    heading("Backends")
    for support in report.backends:
        trap_note = f" [{support.trap} trap]" if support.trap else ""
        reclaim = (" the kernel reclaims volatile pages." if support.kernel_reclaims
                   else " only vrange purges (the kernel cannot reclaim).") if support.usable else ""
        row(support.name + trap_note, ("usable:" + reclaim + " " if support.usable else "not usable: ")
            + support.reason)
    row("auto", report.auto_reason)
    heading("Fallbacks (features missing here, and what vrange does instead)")
    if not report.fallbacks:
        row("-", "none: every kernel feature vrange uses is here")
    for fallback in report.fallbacks:
        row(fallback.name, f"{fallback.missing}. {fallback.fallback}")
    if report.probe_errors:
        heading("Probe errors")
        for error in report.probe_errors:
            row("-", error)
    return "\n".join(lines)


def _command_features(args: argparse.Namespace) -> int:
    report = features()
    if args.json:
        print(json.dumps(report.as_dict(), indent=2, sort_keys=True))
    else:
        print(format_report(report))
    return 0


def _command_demo(args: argparse.Namespace) -> int:
    from .demo import run

    return 0 if run(args) else 1


def _command_bench(args: argparse.Namespace) -> int:
    from .bench import command

    return command(args)


def _command_stress(args: argparse.Namespace) -> int:
    from .stress import format_reports, options_from, parse_specs, run, run_backend

    try:
        options = options_from(args)
        specs = parse_specs(args)
    except ValueError as error:
        print(f"python -m vrange stress: {error}", file=sys.stderr)
        return 2
    if args.child:  # one backend, in this process: JSON lines for the parent
        if not specs or len(specs) != 1:
            print("python -m vrange stress --child: exactly one --backend", file=sys.stderr)
            return 2
        logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
        lock = threading.Lock()

        def emit(message: dict[str, Any]) -> None:
            with lock:  # the watchdog thread emits too
                sys.stdout.write(json.dumps(message) + "\n")
                sys.stdout.flush()

        emit({"result": run_backend(specs[0], options, emit).as_dict()})
        return 0

    def say(line: str) -> None:
        print(line, file=sys.stderr if args.json else sys.stdout, flush=True)

    reports = run(options, specs, say)
    ok = bool(reports) and all(report.ok for report in reports)
    if args.json:
        print(json.dumps({"ok": ok, "options": options.__dict__,
                          "backends": [report.as_dict() for report in reports]}, indent=2))
    else:
        print()
        print(format_reports(reports) if reports else "No backend can run here.")
    return 0 if ok else 1


def _command_compat(args: argparse.Namespace) -> int:
    from .compat.runner import main as run_compat

    return run_compat(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m vrange", description=__doc__)
    parser.add_argument("--version", action="version", version=f"vrange {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    features_parser = commands.add_parser("features", help="what this kernel and process may use")
    features_parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    features_parser.set_defaults(handler=_command_features)
    demo_parser = commands.add_parser(
        "demo", help="a decoded-tile cache three times larger than the memory it may use")
    from .demo import add_arguments

    add_arguments(demo_parser)
    demo_parser.set_defaults(handler=_command_demo)
    bench_parser = commands.add_parser(
        "bench", help="what vrange costs, each figure next to a baseline from the same run")
    from .bench import add_arguments as add_bench_arguments

    add_bench_arguments(bench_parser)
    bench_parser.set_defaults(handler=_command_bench)
    stress_parser = commands.add_parser(
        "stress", help="threads × regions doing everything at once, every byte checked")
    from .stress import add_arguments as add_stress_arguments

    add_stress_arguments(stress_parser)
    stress_parser.set_defaults(handler=_command_stress)
    compat_parser = commands.add_parser(
        "compat", help="the scenario matrix: every backend under every process and kernel profile",
        description="Run the same scenarios on every backend under every profile (each profile in "
                    "a process of its own, each cell in a forked child with an alarm) and print "
                    "the matrix. Exit status 1 if any cell failed, 2 for a bad option.")
    from .compat.runner import add_arguments as add_compat_arguments

    add_compat_arguments(compat_parser)
    compat_parser.set_defaults(handler=_command_compat)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.handler(args))


if __name__ == "__main__":
    sys.exit(main())
